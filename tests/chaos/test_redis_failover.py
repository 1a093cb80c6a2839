"""A Redis Cluster primary killed -9 under a running worker group (owned layout: one writer
per key, item state applied by its owners): its replica takes the slots over, the workers
ride it out, and every event is applied once; state equals a clean replay."""

import time

from infra.embedded import EmbeddedRedisCluster
from infra.redis_client import sync_redis
from schemas.keys import RedisKeys
from state.owner_commits import hop_settled
from stream.producer import InteractionProducer
from stream.simulator import UserSimulator
from tests.conftest import wait_for
from tests.state_check import applied, assert_live_equals_replay

TOTAL = 6000


def test_an_owned_worker_group_rides_out_a_primary_failover(settings, spawn):
    with EmbeddedRedisCluster(primaries=3, replicas=1) as cluster:
        s = settings.model_copy(update={"redis_url": cluster.url, "state_writer": "owned",
                                        "live_models": "session", "worker_batch_max": 20})
        client = sync_redis(cluster.url)
        events = list(UserSimulator(80, 200, seed=21).events(TOTAL, time.time() - TOTAL))
        with InteractionProducer(s.kafka_bootstrap, s.topic_interactions,
                                 max_batch_events=25) as producer:
            producer.send_many(events)

        def count() -> int:
            return applied(client, s.key_prefix)

        workers = [spawn(["worker", "--loglevel", "warn"], s) for _ in range(2)]
        wait_for(lambda: count() >= 1500, 90, "first events", proc=workers[0])
        victim = cluster.nodes[0]  # a primary, and the URL's first seed
        assert victim in cluster.primaries()
        victim.proc.kill()
        victim.proc.wait()
        at_kill = count()
        wait_for(lambda: len(cluster.primaries()) == 3, 30, "a replica to take over")
        for worker in workers:
            wait_for(lambda: count() >= TOTAL, 120, "the rest", proc=worker,
                     progress=lambda: f"{count()} of {TOTAL} applied, {at_kill} at the kill")
        wait_for(lambda: hop_settled(client, RedisKeys(s.key_prefix), s.topic_interactions,
                                     s.topic_partitions), 60, "owners caught up",
                 proc=workers[0])
        time.sleep(2)  # anything still redelivered must be skipped, not applied
        assert count() == TOTAL
        for worker in workers:
            assert worker.proc.poll() is None, worker.log()
        client.close()
        client = sync_redis(cluster.url)  # a new client: its first seed may be the victim
        assert_live_equals_replay(client, s.key_prefix, events, s.history_len,
                                  models=s.live_model_names, layout="owned")
        client.close()
