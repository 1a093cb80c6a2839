"""A worker started while Redis cannot be reached waits for it (warnings and a metric, no
exit), then applies every event: one Redis, and a Redis Cluster with the owned layout (whose
clients read the slot map as they are built)."""

import time

import httpx
import pytest

from infra.embedded import EmbeddedRedis, EmbeddedRedisCluster, free_port
from infra.redis_client import sync_redis
from schemas.keys import RedisKeys
from stream.producer import InteractionProducer
from stream.simulator import UserSimulator
from tests.conftest import metric, wait_for

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("layout", ["shared", "owned-cluster"])
def test_a_worker_started_before_redis_waits_for_it(settings, spawn, layout):
    if layout == "shared":
        server = EmbeddedRedis(port=free_port())
        update = {"redis_url": server.url}
    else:
        server = EmbeddedRedisCluster(3, appendonly=False)
        update = {"redis_url": server.url, "state_writer": "owned",
                  "live_models": "session,mf"}
    metrics_port = free_port()
    s = settings.model_copy(update={**update, "redis_retry_max_s": 0.5,
                                    "worker_metrics_port": metrics_port})
    keys = RedisKeys(s.key_prefix)
    worker = spawn(["worker", "--loglevel", "warn"], s)
    events = list(UserSimulator(40, 100, seed=5).events(1000, time.time() - 1000))
    with InteractionProducer(s.kafka_bootstrap, s.topic_interactions) as producer:
        producer.send_many(events)
        producer.flush()
    try:
        wait_for(lambda: "redis unavailable during building the worker's state" in worker.log(),
                 30, "the worker waiting for Redis", proc=worker)
        time.sleep(3)  # it keeps waiting: no exit
        assert worker.proc.poll() is None, worker.log()
        text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
        assert metric(text, "streamrec_redis_unavailable_total") >= 2  # what alerts read
        server.start()
        client = sync_redis(s.redis_url)
        wait_for(lambda: int(client.hget(keys.stats, "events_applied") or 0) >= len(events),
                 90, "every event applied once Redis is up", proc=worker)
        assert int(client.hget(keys.stats, "events_applied")) == len(events)
        client.close()
    finally:
        server.close()
