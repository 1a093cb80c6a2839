"""One writer's state in memory, Redis as its read model: Redis ends equal to a replay."""

import numpy as np
import pytest

from online_models.registry import build
from online_models.signals import SignalMapper
from online_models.store import MemoryStore
from state.redis_store import RedisStore, WriteBatch
from state.write_back import WriteBackStore
from stream.simulator import UserSimulator
from tests.state_check import assert_store_holds

MODELS = ["session", "cooc", "mf", "popularity"]


def _events():
    return list(UserSimulator(40, 120, seed=8, impressions=True).events(3000, 1.7e9, 2.0))


def _assert_redis_equals(replayed, client, prefix, name, as_strings):
    model = build(name)  # stores laid out as build_on_redis lays them out (catalogues: zsets)
    live = model.bind(RedisStore(client, prefix, name, rows_as_strings=as_strings,
                                 sorted_set_tables=model.sorted_set_tables))
    assert_store_holds(live.store, replayed)


@pytest.mark.parametrize("as_strings", [False, True], ids=["zsets", "strings"])
@pytest.mark.parametrize("name", MODELS)
def test_flushed_read_model_equals_a_replay_and_survives_a_lost_memory(name, as_strings,
                                                                       redis_client, unique):
    events, prefix = _events(), f"t{unique}"
    replayed = build(name).bind(MemoryStore())
    # long rows are trimmed in memory: the read model must drop those members too
    reader = RedisStore(redis_client, prefix, name, local_ttl_s=60, shared_ttl_s=60,
                        rows_as_strings=as_strings,
                        sorted_set_tables=replayed.sorted_set_tables)
    owner = build(name).bind(WriteBackStore(reader, complete=True))
    written = []
    for n, start in enumerate(range(0, len(events), 300)):
        replayed.learn(SignalMapper().map(events[start:start + 300]))
        batch = WriteBatch()
        with owner.store.deferred(batch):
            owner.learn(SignalMapper().map(events[start:start + 300]))
        written.append(len(batch.commands))
        if n == 4 and name == "mf":  # its negatives are random: compare what is read back
            users = sorted(owner.store.vectors["user"])
            held = owner.store.get_local_vectors("user", users, owner.factors)[0]
            batch.commit(redis_client, [f"{prefix}:nothing"], [None])
            owner.store.forget_cached()
            assert np.array_equal(owner.store.get_local_vectors("user", users, owner.factors)[0],
                                  held)
            continue
        if n == 4:
            owner.store.forget_cached()  # this batch never reached Redis: memory is dropped
            replayed = build(name).bind(MemoryStore())  # ... and the replay restarts from
            for s in range(0, start, 300):              # what Redis holds
                replayed.learn(SignalMapper().map(events[s:s + 300]))
            owner.learn(SignalMapper().map(events[start:start + 300]))  # redo, reading Redis
            batch = WriteBatch()
            with owner.store.deferred(batch):
                pass
            replayed.learn(SignalMapper().map(events[start:start + 300]))
        assert batch.commit(redis_client, [f"{prefix}:nothing"], [None])
    _assert_redis_equals(replayed, redis_client, prefix, name, as_strings)
    assert owner.store.pending() == 0
    if name != "popularity":  # every key written carries the TTL its kind of state gets
        ttls = [redis_client.pttl(k) for k in redis_client.scan_iter(f"{prefix}:*", count=1000)]
        assert ttls and all(0 < t <= 60_000 for t in ttls)


def test_coalescing_writes_a_member_once_per_flush(redis_client, unique):
    store = WriteBackStore(RedisStore(redis_client, f"t{unique}", "x"), complete=True)
    batch = WriteBatch()
    with store.deferred(batch):
        for _ in range(50):
            store.incr_rows("cooc", {"a": {"b": 1.0, "c": 0.5, "d": 0.25}}, keep_top=1)
    assert len(batch.commands) == 1  # one script call: ZADD b, ZREM the trimmed c and d
    assert batch.commit(redis_client, [f"t{unique}:w"], [None])
    reader = RedisStore(redis_client, f"t{unique}", "x")
    assert reader.get_rows("cooc", ["a"]) == [{"b": 50.0}]
    reader.incr_rows("cooc", {"a": {"c": 1.0}})  # a member the writer trimmed, back in Redis
    batch = WriteBatch()
    with store.deferred(batch):
        store.incr_rows("cooc", {"a": {"c": 0.5}}, keep_top=1)
    assert batch.commit(redis_client, [f"t{unique}:w"], [None])
    assert reader.get_rows("cooc", ["a"]) == [{"b": 50.0, "c": 0.5}]  # the writer's row wins
