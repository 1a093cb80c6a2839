"""Shared fixtures: real services started per test session, unique names per test."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from infra.embedded import (EmbeddedKafka, EmbeddedRedis, EmbeddedRedisCluster,
                            ensure_streamrec_topics, free_port, terminate)
from infra.redis_client import sync_redis
from infra.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


def pytest_collection_modifyitems(items):
    for item in items:
        if "/integration/" in str(item.fspath):
            item.add_marker(pytest.mark.integration)
        if "/chaos/" in str(item.fspath):
            item.add_marker(pytest.mark.chaos)
        if "/browser/" in str(item.fspath):
            item.add_marker(pytest.mark.browser)


@pytest.fixture(scope="session")
def redis_server():
    with EmbeddedRedis() as server:
        yield server


@pytest.fixture(scope="session")
def redis_cluster():
    """A real Redis Cluster: 3 primaries (redis-server --cluster-enabled yes)."""
    with EmbeddedRedisCluster(primaries=3) as started:
        yield started


@pytest.fixture(scope="session")
def kafka_server():
    with EmbeddedKafka() as server:
        yield server


@pytest.fixture
def unique() -> str:
    return uuid.uuid4().hex[:10]


@pytest.fixture
def settings(redis_server, kafka_server, unique) -> Settings:
    """Settings isolated to this test: own topics, consumer group and Redis key prefix."""
    s = Settings(kafka_bootstrap=kafka_server.bootstrap, redis_url=redis_server.url,
                 topic_interactions=f"interactions-{unique}", topic_dlq=f"dlq-{unique}",
                 topic_item_vectors=f"vectors-{unique}", topic_impressions=f"impr-{unique}",
                 topic_items=f"items-{unique}", topic_item_deltas=f"deltas-{unique}",
                 app_id=f"streamrec-{unique}", key_prefix=f"t{unique}", topic_partitions=4,
                 kafka_session_timeout_s=6, kafka_rebalance_timeout_s=6,
                 cluster_claim_window_s=0.25)
    ensure_streamrec_topics(s)
    return s


@pytest.fixture
def redis_client(redis_server):
    client = sync_redis(redis_server.url)
    yield client
    client.close()


def settings_env(s: Settings, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMREC_")}
    for name, value in s.model_dump().items():
        env[f"STREAMREC_{name.upper()}"] = str(value)
    env.update(extra)
    return env


class Process:
    """A streamrec role in a subprocess, with its log, that a test can kill and restart."""

    def __init__(self, role: list[str], env: dict[str, str], log_path: Path) -> None:
        self.role, self.env, self.log_path = role, env, log_path
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Process":
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "infra.cli", *self.role],
                                         env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                         cwd=ROOT, start_new_session=True)
        return self

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        terminate(self.proc, 15)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]


@pytest.fixture
def spawn(tmp_path):
    """spawn(role, settings) starts a streamrec process role; all are stopped after the test."""
    started: list[Process] = []

    def _spawn(role: list[str], s: Settings, **extra_env: str) -> Process:
        extra_env.setdefault("STREAMREC_WORKER_WEB_PORT", str(free_port()))
        extra_env.setdefault("STREAMREC_WORKER_DATA_DIR", str(tmp_path / f"data-{len(started)}"))
        proc = Process(role, settings_env(s, **extra_env),
                       tmp_path / f"{role[0]}-{len(started)}.log").start()
        started.append(proc)
        return proc

    _spawn.started = started  # every process started so far
    yield _spawn
    for proc in started:
        proc.stop()


def wait_for(predicate, timeout_s: float, what: str, interval_s: float = 0.1, proc=None,
             progress=None):
    """Poll ``predicate`` until truthy; fail with ``what`` (``progress()``: where it got to)
    and a process log on timeout."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.proc.poll() is not None:
            pytest.fail(f"{what}: process exited with {proc.proc.returncode}\n{proc.log()}")
        time.sleep(interval_s)
    pytest.fail(f"timed out after {timeout_s}s waiting for {what}"
                + (f" ({progress()})" if progress is not None else "")
                + (f"\n{proc.log()}" if proc is not None else ""))


def metric(text: str, name: str, **labels: str) -> float:
    """A sample's value in a /metrics page (Prometheus text, read with prometheus_client's
    parser): the samples named ``name`` carrying ``labels``, summed; 0 where there are none."""
    from prometheus_client.parser import text_string_to_metric_families

    return sum(sample.value for family in text_string_to_metric_families(text)
               for sample in family.samples if sample.name == name
               and all(sample.labels.get(key) == value for key, value in labels.items()))
