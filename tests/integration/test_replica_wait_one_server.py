"""``STREAMREC_REDIS_WAIT_REPLICAS`` on one Redis server: a commit (and a pipelined send) is
done only once a replica acknowledged it; while none does, it waits and counts the waits."""

import threading
import time

from infra.embedded import EmbeddedRedis
from infra.redis_client import REPLICA_WAITS, ReplicaWait, sync_redis
from state.redis_store import WriteBatch, apply_commands


def test_a_commit_waits_until_a_replica_acknowledged_it():
    with EmbeddedRedis(appendonly=False) as primary, EmbeddedRedis(appendonly=False) as replica:
        client, replica_client = sync_redis(primary.url), sync_redis(replica.url)
        wait = ReplicaWait(1, 100)
        batch = WriteBatch()
        batch.hset("k:committed", {"a": b"1"})
        done: list = []
        waits_before = REPLICA_WAITS._value.get()

        def commit_then_send() -> None:
            done.append(batch.commit(client, ["k:watched"], [None], wait=wait))
            done.append(apply_commands(client, [("SET", "k:sent", b"2")], [], wait=wait))

        worker = threading.Thread(target=commit_then_send, daemon=True)
        worker.start()
        time.sleep(1.0)  # no replica yet: the commit is written, not done
        assert not done and client.hget("k:committed", "a") == b"1"
        assert REPLICA_WAITS._value.get() - waits_before >= 5  # one per 100 ms wait
        replica_client.replicaof("127.0.0.1", primary.port)
        worker.join(30)
        assert done == [True, [b"OK"]]
        assert replica_client.hget("k:committed", "a") == b"1"  # acknowledged: it has it
        assert replica_client.get("k:sent") == b"2"
        client.close()
        replica_client.close()
