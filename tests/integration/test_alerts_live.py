"""The shipped alert rules evaluated by a real Prometheus (Debian's, installed by `make test`)
scraping a real worker: Redis's memory is exported, a malformed message fires
StreamrecDeadLetters, and a worker killed makes StreamrecWorkerDown pending on the real `up`
series."""

from __future__ import annotations

import shutil
import subprocess
import time

import httpx
import pytest
from kafka import KafkaProducer

from infra.embedded import free_port, terminate
from tests.conftest import ROOT, wait_for


def alerts(url: str) -> dict[str, str]:
    """Alert name → state (pending or firing) as Prometheus holds them now."""
    try:
        answer = httpx.get(f"{url}/api/v1/alerts", timeout=2).json()
    except (httpx.HTTPError, ValueError):
        return {}
    return {a["labels"]["alertname"]: a["state"] for a in answer["data"]["alerts"]}


@pytest.fixture
def prometheus(tmp_path):
    """start(targets) runs Prometheus on the shipped rules, scraping ``targets`` (job →
    host:port) every second; returns its URL."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("prometheus not found: `make test` installs it (Debian package prometheus)")
    started = []

    def start(targets: dict[str, str]) -> str:
        config = tmp_path / "prometheus.yml"
        jobs = "".join(f"  - job_name: {job}\n    static_configs:\n"
                       f"      - targets: [\"{target}\"]\n" for job, target in targets.items())
        config.write_text("global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
                          f"rule_files: [\"{ROOT / 'infra' / 'prometheus' / 'alerts.yml'}\"]\n"
                          f"scrape_configs:\n{jobs}")
        port = free_port()
        with (tmp_path / "prometheus.log").open("w") as log:
            started.append(subprocess.Popen(
                [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{port}"], stdout=subprocess.DEVNULL,
                stderr=log))
        url = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            if started[-1].poll() is not None:
                pytest.fail((tmp_path / "prometheus.log").read_text()[-2000:])
            try:
                return httpx.get(f"{url}/-/ready", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(ready, 30, "Prometheus ready")
        return url

    yield start
    for proc in started:
        terminate(proc)


def _query(url: str, query: str) -> list[dict]:
    """An instant query's result (empty while Prometheus cannot answer)."""
    try:
        return httpx.get(f"{url}/api/v1/query", params={"query": query},
                         timeout=2).json()["data"]["result"]
    except (httpx.HTTPError, ValueError, KeyError):
        return []


def _up(url: str) -> bool:
    return [r["value"][1] for r in _query(url, 'up{job="streamrec-worker"}')] == ["1"]


def test_a_dead_letter_fires_its_alert_and_a_killed_worker_makes_one_pending(settings, spawn,
                                                                             prometheus):
    port = free_port()
    worker = spawn(["worker", "--loglevel", "warn"], settings,
                   STREAMREC_WORKER_METRICS_PORT=str(port))
    url = prometheus({"streamrec-worker": f"127.0.0.1:{port}"})
    wait_for(lambda: _up(url), 60, "the worker scraped", proc=worker)
    memory = wait_for(lambda: _query(url, "streamrec_redis_used_memory_bytes"), 30,
                      "Redis's memory exported")
    assert [float(r["value"][1]) > 0 for r in memory] == [True]  # the one Redis of the test
    time.sleep(2)  # a few scrapes of the dead-letter counter at 0
    worker_alerts = {"StreamrecDeadLetters", "StreamrecWorkerDown", "StreamrecNoWorker"}
    assert not worker_alerts & set(alerts(url))  # (no feed builder here: that one is pending)

    producer = KafkaProducer(bootstrap_servers=settings.kafka_bootstrap)
    producer.send(settings.topic_interactions, key=b"u1", value=b'{"user_id": 7}')
    producer.flush()
    producer.close()
    wait_for(lambda: alerts(url).get("StreamrecDeadLetters") == "firing", 60,
             "StreamrecDeadLetters firing", proc=worker)

    worker.kill()
    wait_for(lambda: alerts(url).get("StreamrecWorkerDown") == "pending", 30,
             "StreamrecWorkerDown pending (firing after its 2 minutes)")
    assert alerts(url).get("StreamrecNoWorker") == "pending"
