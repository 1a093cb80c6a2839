"""Redis Cluster operations under a running worker group (owned layout: one writer per key,
item state applied by its owners), a feed builder and an API.

- A primary killed -9: its replica takes the slots over and every process rides it out.
  Every event is applied once (state equals a clean replay), feeds are built again after
  it, and the API answers again within seconds.
- Slots resharded (keys included) back and forth while the workers apply: the same, and
  the same where every commit waits for a replica (``STREAMREC_REDIS_WAIT_REPLICAS=1``).
"""

import threading
import time

import httpx
import msgspec
import pytest

from infra.embedded import EmbeddedRedisCluster
from infra.redis_client import sync_redis
from schemas.keys import RedisKeys
from state.owner_commits import hop_settled
from stream.producer import InteractionProducer
from stream.simulator import UserSimulator
from tests.conftest import wait_for
from tests.integration.kafka_helpers import produce
from tests.integration.test_pipeline_e2e import assert_feeds_built_and_served
from tests.state_check import applied, assert_live_equals_replay

TOTAL = 14000


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_an_owned_worker_group_a_feed_builder_and_an_api_ride_out_a_primary_failover(
        settings, spawn):
    with EmbeddedRedisCluster(primaries=3, replicas=1) as cluster:
        s = settings.model_copy(update={"redis_url": cluster.url, "state_writer": "owned",
                                        "live_models": "session", "worker_batch_max": 20})
        client = sync_redis(cluster.url)
        keys = RedisKeys(s.key_prefix)
        events = list(UserSimulator(80, 200, seed=21).events(TOTAL, time.time() - TOTAL))
        first, rest = events[:2000], events[2000:]

        def count() -> int:
            return applied(client, s.key_prefix)

        produce(s, first)
        workers = [spawn(["worker", "--loglevel", "warn"], s) for _ in range(2)]
        wait_for(lambda: count() >= len(first), 90, "the first events", proc=workers[0])
        users = sorted({e.user_id for e in first})
        api = assert_feeds_built_and_served(spawn, s, client, users, timeout_s=60, checked=5)
        processes = list(spawn.started)  # the workers, the feed builder, the API

        produce(s, rest)
        wait_for(lambda: count() >= len(first) + 300, 60, "more events", proc=workers[0])
        victim = cluster.nodes[0]  # a primary, and the URL's first seed
        assert victim in cluster.primaries()
        killed_at, at_kill = time.time(), count()
        cluster.kill_primary(victim)  # and its replica took over
        assert at_kill < TOTAL - 2000, "the stream finished before the kill"
        for user in users[:5]:
            wait_for(lambda: _answers(f"{api}/v1/users/{user}/feed")
                     and _answers(f"{api}/v1/users/{user}/recommendations"), 30,
                     "the API to answer again")
        for worker in workers:
            wait_for(lambda: count() >= TOTAL, 120, "the rest", proc=worker,
                     progress=lambda: f"{count()} of {TOTAL} applied, {at_kill} at the kill")
        wait_for(lambda: hop_settled(client, keys, s.topic_interactions, s.topic_partitions),
                 60, "owners caught up", proc=workers[0])
        time.sleep(2)  # anything still redelivered must be skipped, not applied
        assert count() == TOTAL
        # the feeds of users with events after the failover are built again
        late = sorted({e.user_id for e in events[-300:]})[:10]
        wait_for(lambda: all(msgspec.json.decode(client.get(keys.feed(user)))["generated_at"]
                             > killed_at for user in late), 60, "feeds built again")
        for process in processes:
            assert process.proc.poll() is None, process.log()
        client.close()
        client = sync_redis(cluster.url)  # a new client: its first seed is the victim
        assert_live_equals_replay(client, s.key_prefix, events, s.history_len,
                                  models=s.live_model_names, layout="owned")
        client.close()


@pytest.mark.parametrize("wait_replicas", [0, 1], ids=["no-wait", "wait-1"])
def test_an_owned_worker_group_rides_out_slots_resharded_under_it(settings, spawn,
                                                                   wait_replicas):
    # wait-1: every commit (the owners' too) waits for a replica, through the redirections
    with EmbeddedRedisCluster(primaries=3, replicas=wait_replicas) as cluster:
        s = settings.model_copy(update={"redis_url": cluster.url, "state_writer": "owned",
                                        "live_models": "session", "worker_batch_max": 20,
                                        "redis_wait_replicas": wait_replicas})
        client = sync_redis(cluster.url)
        keys = RedisKeys(s.key_prefix)
        events = list(UserSimulator(80, 200, seed=22).events(TOTAL, time.time() - TOTAL))
        produce(s, events[:2000])

        def count() -> int:
            return applied(client, s.key_prefix)

        workers = [spawn(["worker", "--loglevel", "warn"], s) for _ in range(2)]
        wait_for(lambda: count() >= 2000, 90, "the first events", proc=workers[0])
        moved = []

        def reshard() -> None:  # 3,000 slots over and back while they apply: among them
            cluster.move_slots(2, 1, slots=3000)  # {wm} (watermarks, outboxes, redo records)
            moved.append(count())  # and {own:0} (an owner's positions, redo record, claim)
            cluster.move_slots(1, 2, slots=3000)
            moved.append(count())

        mover = threading.Thread(target=reshard)
        mover.start()
        with InteractionProducer(s.kafka_bootstrap, s.topic_interactions,
                                 max_batch_events=25) as producer:
            for start in range(2000, TOTAL, 500):  # paced: the resharding meets commits
                producer.send_many(events[start:start + 500])
                producer.flush()
                time.sleep(0.3)
        mover.join(120)
        assert len(moved) == 2 and moved[0] < TOTAL, moved
        for worker in workers:
            wait_for(lambda: count() >= TOTAL, 120, "the rest", proc=worker,
                     progress=lambda: f"{count()} of {TOTAL} applied, moved at {moved}")
        wait_for(lambda: hop_settled(client, keys, s.topic_interactions, s.topic_partitions),
                 60, "owners caught up", proc=workers[0])
        time.sleep(2)
        assert count() == TOTAL
        for worker in workers:
            assert worker.proc.poll() is None, worker.log()
        assert_live_equals_replay(client, s.key_prefix, events, s.history_len,
                                  models=s.live_model_names, layout="owned")
        client.close()
