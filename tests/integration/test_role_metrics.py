"""Prometheus metrics of the feed builder and trainer roles (what infra/prometheus/alerts.yml
reads): feeds written and users queued, failed rounds by cause, events learned and versions;
a port already taken is one line and exit 2 for every role."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
from prometheus_client import REGISTRY

from infra.embedded import free_port
from online_models.two_tower import TwoTowerModel
from schemas.keys import RedisKeys
from serving.feeds import FeedBuilder, ImpressionLogUnavailable
from stream.simulator import UserSimulator
from stream.state import LiveState
from stream.trainer import Trainer
from tests.conftest import ROOT, metric, settings_env, wait_for
from tests.integration.test_trainer import _publish, _run


def _scrape(url: str) -> str | None:
    try:
        return httpx.get(url, timeout=2).text
    except httpx.HTTPError:
        return None


def _apply(settings, redis_client, users: int = 12) -> list[str]:
    events = list(UserSimulator(users, 60, seed=21).events(400, time.time() - 400))
    LiveState(settings, redis_client).apply_sync(events)
    return sorted({e.user_id for e in events})


def test_the_feeds_role_counts_feeds_written_and_the_users_left_queued(settings, spawn,
                                                                       redis_client):
    users = _apply(settings, redis_client)
    keys = RedisKeys(settings.key_prefix)
    redis_client.delete(keys.feed_queue)
    port = free_port()
    proc = spawn(["feeds"], settings.model_copy(update={"feeds_metrics_port": port}))
    url = f"http://127.0.0.1:{port}/metrics"
    wait_for(lambda: _scrape(url), 60, "feed builder metrics", proc=proc)
    redis_client.sadd(keys.feed_queue, *users)
    wait_for(lambda: all(redis_client.exists(keys.feed(u)) for u in users), 30, "feeds",
             proc=proc)
    text = wait_for(lambda: (t := _scrape(url)) and metric(
        t, "streamrec_feeds_written_total") == len(users) and t, 10, "feeds counted")
    assert metric(text, "streamrec_feed_queue_users") == 0
    assert metric(text, "streamrec_feed_round_seconds_count") >= 1
    assert metric(text, "streamrec_feed_rounds_failed_total") == 0
    assert "streamrec_on_demand_seconds" not in text  # the API's own are not exported here


def test_a_round_whose_lists_cannot_be_logged_counts_as_failed_and_keeps_its_users_queued(
        settings, redis_client):
    users = _apply(settings, redis_client)
    keys = RedisKeys(settings.key_prefix)

    class KafkaDown:
        def log(self, records):
            raise ImpressionLogUnavailable("impression log unavailable: no ack from Kafka")

    def value(name: str, **labels) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    failed = value("streamrec_feed_rounds_failed_total", cause="impression_log")
    written = value("streamrec_feeds_written_total")
    builder = FeedBuilder(settings, redis_client, impression_producer=KafkaDown())
    redis_client.delete(keys.feed_queue)
    redis_client.sadd(keys.feed_queue, *users)
    stop = threading.Event()
    runner = threading.Thread(target=builder.run, args=(stop,), daemon=True)
    runner.start()
    try:
        wait_for(lambda: value("streamrec_feed_rounds_failed_total", cause="impression_log")
                 > failed, 30, "a failed round counted")
    finally:
        stop.set()
        runner.join(10)
    assert value("streamrec_feeds_written_total") == written  # nothing served unlogged
    assert redis_client.scard(keys.feed_queue) == len(users)  # queued again
    assert value("streamrec_feed_queue_users") == len(users)
    assert not any(redis_client.exists(keys.feed(u)) for u in users)


def test_the_trainer_counts_events_learned_versions_and_when_the_last_was_published(
        settings, tmp_path):
    s = settings.model_copy(update={"trainer_dir": str(tmp_path / "ckpt")})
    _publish(s, list(UserSimulator(50, 150, seed=9).events(1500, time.time() - 3000,
                                                            events_per_s=1.0)))
    names = ("streamrec_trainer_events_learned_total", "streamrec_trainer_versions_total",
             "streamrec_trainer_publish_seconds_count")

    def value(name: str) -> float:
        return REGISTRY.get_sample_value(name, {"model": "two_tower"}) or 0.0

    before = {name: value(name) for name in names}
    trainer = Trainer(s, "two_tower",
                      model=TwoTowerModel(retrain_every=400, min_examples=300, epochs=2))
    started = value("streamrec_trainer_last_version_timestamp_seconds")
    assert abs(started - time.time()) < 5  # no version yet: the start counts
    try:
        _run(trainer, 1)
    finally:
        trainer.close()
    grown = {name: value(name) - before[name] for name in names}
    assert grown == {"streamrec_trainer_events_learned_total": trainer.events,
                     "streamrec_trainer_versions_total": len(trainer.published),
                     "streamrec_trainer_publish_seconds_count": len(trainer.published)}
    assert trainer.events > 0 and trainer.published
    assert value("streamrec_trainer_last_version_timestamp_seconds") > started


@pytest.mark.parametrize("role,variable,what", [
    (["feeds"], "STREAMREC_FEEDS_METRICS_PORT", "feed builder's metrics port"),
    (["worker"], "STREAMREC_WORKER_METRICS_PORT", "worker's metrics port"),
    (["api"], "STREAMREC_API_METRICS_PORT", "API's metrics port"),
    (["api", "--workers", "2"], "STREAMREC_API_METRICS_PORT", "API's metrics port"),
    (["api"], "STREAMREC_API_PORT", "API port")])
def test_a_port_already_taken_is_one_line_and_exit_2(settings, role, variable, what):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = settings_env(settings, **{variable: str(port)})
        run = subprocess.run([sys.executable, "-m", "infra.cli", *role], env=env, cwd=ROOT,
                             capture_output=True, text=True, timeout=60)
    assert run.returncode == 2, run.stderr[-2000:]
    assert len(run.stderr.strip().splitlines()) == 1, run.stderr[-2000:]
    assert f"{what} 127.0.0.1:{port}: Address already in use" in run.stderr
