"""A Redis Cluster primary killed -9 while its replica lags (frozen with SIGSTOP, then let go
so that it takes the slots over): Redis replication is asynchronous, so the replica lacks the
commits the primary acknowledged since. With ``STREAMREC_REDIS_WAIT_REPLICAS=1`` a commit is
done only once a replica of every node it wrote acknowledged it: the worker waits while the
replica is frozen, meets the kill, applies the chunk again on the new primary, and the state
equals a clean replay. Without it, the worker acknowledged commits the failover lost (the
documented limit the setting lifts)."""

import os
import signal
import time

import pytest

from infra.embedded import EmbeddedRedisCluster
from infra.redis_client import sync_redis
from schemas.keys import RedisKeys
from stream.simulator import UserSimulator
from tests.conftest import wait_for
from tests.integration.kafka_helpers import produce
from tests.state_check import applied, assert_live_equals_replay

TOTAL = 4000


def _replica_of(cluster: EmbeddedRedisCluster, client, key: str):
    """The cluster node that is the primary holding ``key``, and its replica."""
    primary = client.get_node_from_key(key)
    info = client.get_redis_connection(primary).info("replication")
    replica_port = info["slave0"]["port"]
    by_port = {node.port: node for node in cluster.nodes}
    return by_port[primary.port], by_port[replica_port]


def _settled(count, quiet_s: float = 1.5, timeout_s: float = 30.0) -> int:
    """Wait until ``count()`` stopped moving for ``quiet_s``; its value."""
    deadline, last, since = time.monotonic() + timeout_s, count(), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = count()
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            break
    return last


@pytest.mark.parametrize("wait_replicas", [1, 0], ids=["wait-1", "no-wait"])
def test_a_failover_to_a_lagging_replica_loses_no_commit_with_replica_wait(
        settings, spawn, wait_replicas):
    with EmbeddedRedisCluster(primaries=3, replicas=1) as cluster:
        s = settings.model_copy(update={
            "redis_url": cluster.url, "state_writer": "single", "state_writer_lease_s": 10.0,
            "live_models": "session", "worker_batch_max": 20,
            "redis_wait_replicas": wait_replicas, "redis_wait_timeout_ms": 200})
        client = sync_redis(cluster.url)
        keys = RedisKeys(s.key_prefix)
        events = list(UserSimulator(60, 150, seed=31).events(TOTAL, time.time() - TOTAL))
        first, rest = events[:2000], events[2000:]

        def count() -> int:
            try:
                return applied(client, s.key_prefix)
            except Exception:  # noqa: BLE001 - the stats' node failing over
                return -1

        produce(s, first)
        worker = spawn(["worker", "--loglevel", "warn"], s)
        wait_for(lambda: count() >= len(first), 90, "the first events", proc=worker)
        primary, replica = _replica_of(cluster, client, keys.watermark(s.topic_interactions, 0))
        os.kill(replica.proc.pid, signal.SIGSTOP)  # replication to it stops
        try:
            # 48 MB more than the sockets between them hold (loopback buffers up to ~36 MB):
            # the replication stream backs up in the primary, as behind a slow replica
            for n in range(6):
                client.set(f"{s.key_prefix}:{{wm}}:filler:{n}", os.urandom(8 << 20))
            produce(s, rest)
            at_kill = _settled(count)
            primary.kill()
        finally:
            os.kill(replica.proc.pid, signal.SIGCONT)  # it takes the slots over
        wait_for(lambda: len(cluster.primaries()) == 3, 60, "the replica promoted")
        primary.start()  # back as the new primary's replica: WAIT can be answered again
        cluster.wait_ok(60)
        client.close()
        client = sync_redis(cluster.url)
        if wait_replicas:
            assert at_kill < TOTAL, "the commits did not wait for the frozen replica"
            wait_for(lambda: count() >= TOTAL, 90, "every event applied", proc=worker,
                     progress=lambda: f"{count()} of {TOTAL}, {at_kill} at the kill")
            time.sleep(2)  # anything redelivered must be skipped, not applied
            assert count() == TOTAL
            assert "replicas of" in worker.log_path.read_text()  # the waits were logged
            assert_live_equals_replay(client, s.key_prefix, events, s.history_len,
                                      models=s.live_model_names, layout="single")
        else:
            assert at_kill == TOTAL, "every commit was acknowledged before the kill"
            time.sleep(10)
            with pytest.raises(AssertionError) as lost:  # the failover lost acknowledged commits
                assert_live_equals_replay(client, s.key_prefix, events, s.history_len,
                                          models=s.live_model_names, layout="single")
            print(f"no wait: {count()} counted; {str(lost.value)[:300]}")
        print(f"at the kill {at_kill}")
        assert worker.proc.poll() is None, worker.log()
        client.close()
