"""A Redis outage mid-stream pauses the worker; nothing is lost once Redis is back."""

import time

import httpx
import pytest

from infra.embedded import EmbeddedRedis, free_port
from infra.redis_client import sync_redis
from schemas.keys import RedisKeys
from stream.producer import InteractionProducer
from stream.simulator import UserSimulator
from tests.conftest import metric, wait_for


def start_worker(server, settings, spawn, **update):
    """A worker on ``server``'s Redis (retrying every 0.5 s at most), a client of that Redis
    and the key names."""
    s = settings.model_copy(update={"redis_url": server.url, "redis_retry_max_s": 0.5,
                                    **update})
    return (s, RedisKeys(s.key_prefix), sync_redis(s.redis_url),
            spawn(["worker", "--loglevel", "warn"], s))


def send_until_applied(producer, events, client, keys, worker) -> None:
    """Produce ``events`` and wait until the worker has applied (at least) that many."""
    producer.send_many(events)
    producer.flush()
    wait_for(lambda: int(client.hget(keys.stats, "events_applied") or 0) >= len(events),
             60, f"{len(events)} events applied", proc=worker)


@pytest.mark.parametrize("writer", [{}, {"state_writer": "single", "state_writer_lease_s": 1.0}],
                         ids=["shared", "single"])  # single: the lease is renewed in the outage
def test_worker_rides_out_a_redis_restart_without_losing_events(settings, spawn, tmp_path,
                                                                writer):
    redis_dir = tmp_path / "redis"
    redis_dir.mkdir()
    server = EmbeddedRedis(workdir=str(redis_dir)).start()
    metrics_port = free_port()
    s, keys, client, worker = start_worker(server, settings, spawn,
                                           worker_metrics_port=metrics_port, **writer)
    events = list(UserSimulator(60, 200, seed=21).events(4000, time.time() - 4000))
    first, second = events[:2000], events[2000:]
    try:
        with InteractionProducer(s.kafka_bootstrap, s.topic_interactions) as producer:
            send_until_applied(producer, first, client, keys, worker)
            server.stop()  # outage: graceful stop keeps the AOF complete
            producer.send_many(second)
            producer.flush()
            time.sleep(3)  # the worker meets the outage and retries
            assert worker.proc.poll() is None, worker.log()
            text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
            assert metric(text, "streamrec_redis_unavailable_total") >= 1  # what alerts read
            server.start()
        client = sync_redis(s.redis_url)
        wait_for(lambda: int(client.hget(keys.stats, "events_applied") or 0) >= len(events),
                 60, "second half applied after the restart", proc=worker)
        assert "redis unavailable" in worker.log()
        for user in {e.user_id for e in events}:
            history = {x.decode() for x in client.lrange(keys.user_history(user), 0, -1)}
            mine = [e.item_id for e in events if e.user_id == user][::-1][:s.history_len]
            assert set(mine) <= history
    finally:
        client.close()
        server.close()


def test_worker_waits_while_redis_is_at_maxmemory_and_loses_nothing(settings, spawn, tmp_path):
    """Redis refuses writes (maxmemory reached, nothing left to evict): the worker keeps
    running, logs an error, counts streamrec_redis_oom_total and applies nothing half-way;
    once memory is raised, every event is applied exactly once."""
    server = EmbeddedRedis(appendonly=False).start()
    web_port = free_port()
    s, keys, client, worker = start_worker(server, settings, spawn,
                                           worker_metrics_port=web_port)
    events = list(UserSimulator(60, 200, seed=22).events(3000, time.time() - 3000))
    first, second = events[:1000], events[1000:]
    try:
        with InteractionProducer(s.kafka_bootstrap, s.topic_interactions) as producer:
            send_until_applied(producer, first, client, keys, worker)
            client.config_set("maxmemory", 1)  # every write is now refused
            producer.send_many(second)
            producer.flush()
            wait_for(lambda: "maxmemory" in worker.log(), 60, "the OOM noticed", proc=worker)
            time.sleep(2)
            assert worker.proc.poll() is None, worker.log()
            assert int(client.hget(keys.stats, "events_applied")) == len(first)  # no half-way
            metrics = httpx.get(f"http://127.0.0.1:{web_port}/metrics", timeout=5).text
            assert metric(metrics, "streamrec_redis_oom_total") >= 1, metrics[-2000:]
            client.config_set("maxmemory", 0)
        wait_for(lambda: int(client.hget(keys.stats, "events_applied") or 0) >= len(events),
                 60, "the rest applied once memory is back", proc=worker)
        time.sleep(1)
        assert int(client.hget(keys.stats, "events_applied")) == len(events)  # exactly once
        assert worker.proc.poll() is None
    finally:
        client.close()
        server.close()
