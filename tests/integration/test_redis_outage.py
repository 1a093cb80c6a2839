"""A Redis outage mid-stream pauses the worker; nothing is lost once Redis is back."""

import time

from infra.embedded import EmbeddedRedis
from infra.redis_client import sync_redis
from schemas.keys import RedisKeys
from stream.producer import InteractionProducer
from stream.simulator import UserSimulator
from tests.conftest import wait_for


def test_worker_rides_out_a_redis_restart_without_losing_events(settings, spawn, tmp_path):
    redis_dir = tmp_path / "redis"
    redis_dir.mkdir()
    server = EmbeddedRedis(workdir=str(redis_dir)).start()
    s = settings.model_copy(update={"redis_url": server.url, "redis_retry_max_s": 0.5})
    keys = RedisKeys(s.key_prefix)
    client = sync_redis(s.redis_url)
    worker = spawn(["worker", "--loglevel", "warn"], s)
    events = list(UserSimulator(60, 200, seed=21).events(4000, time.time() - 4000))
    first, second = events[:2000], events[2000:]
    try:
        with InteractionProducer(s.kafka_bootstrap, s.topic_interactions) as producer:
            producer.send_many(first)
            producer.flush()
            wait_for(lambda: int(client.hget(keys.stats, "events_applied") or 0) >= len(first),
                     60, "first half applied", proc=worker)
            server.stop()  # outage: graceful stop keeps the AOF complete
            producer.send_many(second)
            producer.flush()
            time.sleep(3)  # the worker meets the outage and retries
            assert worker.proc.poll() is None, worker.log()
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
