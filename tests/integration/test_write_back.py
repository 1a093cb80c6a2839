"""One writer's state in memory, Redis as its read model: Redis ends equal to a replay."""

import time

import msgspec
import numpy as np
import pytest

from online_models.registry import build
from online_models.signals import SignalMapper
from online_models.store import MemoryStore
from state.redis_store import RedisStore, WriteBatch
from state.write_back import UntimedKeySweeper, WriteBackStore, sweep_untimed_keys
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


def test_a_member_set_to_the_score_it_has_is_not_written_again(redis_client, unique):
    """Catalogues set members' scores batch after batch (popularity: 1.0 for every item
    seen): only members whose score changed reach Redis."""
    store = WriteBackStore(RedisStore(redis_client, f"t{unique}", "x",
                                      sorted_set_tables=("catalog",)), complete=True)
    for scores in ({"a": 1.0, "b": 1.0}, {"a": 1.0, "b": 2.0}):
        batch = WriteBatch()
        with store.deferred(batch):
            store.set_rows("catalog", {"all": scores})
        assert batch.commit(redis_client, [f"t{unique}:w"], [None])
        if scores["b"] == 1.0:  # what the next flush would overwrite, were "a" written again
            redis_client.zadd(store.reader.key("catalog", "all"), {"a": 7.0})
    reader = RedisStore(redis_client, f"t{unique}", "x", sorted_set_tables=("catalog",))
    assert reader.get_rows("catalog", ["all"]) == [{"a": 7.0, "b": 2.0}]


def _expiring_writer(client, prefix, clock, held_keys=1_000_000, complete=True,
                     others_may_write=False):
    reader = RedisStore(client, prefix, "x", local_ttl_s=100, shared_ttl_s=1000,
                        rows_as_strings=True, expires_by_writer=True)
    return WriteBackStore(reader, complete=complete, held_keys=held_keys,
                          clock=lambda: clock[0], others_may_write=others_may_write)


def _commit(store, client, prefix):
    batch = WriteBatch()
    store.flush(batch)
    assert batch.commit(client, [f"{prefix}:w"], [None])


def test_a_writer_that_expires_keys_itself_deletes_them_once_idle_past_their_ttl(
        redis_client, unique):
    prefix, clock = f"t{unique}", [1000.0]
    store = _expiring_writer(redis_client, prefix, clock)
    store.set_local_rows("sess", {"s1": {"a": 1.0}, "s2": {"b": 1.0}})  # user side: 100 s
    store.set_rows("nb", {"i1": {"i2": 0.5}})  # item side: 1000 s
    store.set_local_vectors("user", ["u1"], np.ones((1, 4)))
    store.set_vectors("item", ["i1"], np.ones((1, 4)))
    _commit(store, redis_client, prefix)
    names = [store.reader.key(table, key) for table, key in (
        ("sess", "s1"), ("sess", "s2"), ("nb", "i1"), ("user", "u1"), ("item", "i1"))]
    assert [redis_client.pttl(n) for n in names] == [-1] * 5  # no TTL: MSET
    assert redis_client.hgetall(store.reader.expiry_key) == {
        b"sess": b"100000", b"nb": b"1000000", b"user": b"100000", b"item": b"1000000"}
    clock[0] = 1050.0
    store.set_local_rows("sess", {"s2": {"b": 2.0}})
    _commit(store, redis_client, prefix)
    clock[0] = 1100.0  # s1 and u1 idle 100 s: deleted at this commit; s2 written 50 s ago
    store.set_local_rows("sess", {"s3": {"c": 1.0}})
    _commit(store, redis_client, prefix)
    assert [bool(redis_client.exists(n)) for n in names] == [False, True, True, False,
                                                                      True]
    assert store.get_local_rows("sess", ["s1", "s2"]) == [{}, {"b": 2.0}]  # gone in memory too
    assert not store.get_local_vectors("user", ["u1"], 4)[1][0]
    clock[0] = 2050.0  # the item side's 1000 s have passed too
    store.set_local_rows("sess", {"s4": {"d": 1.0}})
    _commit(store, redis_client, prefix)
    assert not any(redis_client.exists(n) for n in names)
    assert redis_client.exists(store.reader.key("sess", "s4"))


def test_a_writer_others_may_follow_hands_idle_keys_to_redis_with_their_full_ttl(
        redis_client, unique):
    """A worker group's writer (``others_may_write``): keys go without TTLs; once unwritten
    for a tenth of their TTL they get the full TTL from then (never deleted, never an earlier
    deadline: another worker may have written them since) and leave memory; a later write
    clears the TTL; keys past ``held_keys`` get the full TTL too, not their own deadline."""
    prefix, clock = f"t{unique}", [1000.0]
    store = _expiring_writer(redis_client, prefix, clock, complete=False,
                             others_may_write=True)
    store.set_local_rows("sess", {"s1": {"a": 1.0}, "s2": {"b": 1.0}})  # TTL 100 s
    store.set_local_vectors("user", ["u1"], np.ones((1, 4)))
    _commit(store, redis_client, prefix)
    names = [store.reader.key(t, k) for t, k in (("sess", "s1"), ("sess", "s2"),
                                                   ("user", "u1"))]
    assert [redis_client.pttl(n) for n in names] == [-1] * 3
    clock[0] = 1005.0
    store.set_local_rows("sess", {"s2": {"b": 2.0}})
    _commit(store, redis_client, prefix)
    redis_client.set(names[0], msgspec.msgpack.encode({"z": 9.0}))  # another writer's, since
    clock[0] = 1010.0  # s1 and u1 unwritten here for 10 s: handed over; s2 for 5 s
    store.set_local_rows("sess", {"s3": {"c": 1.0}})
    _commit(store, redis_client, prefix)
    ttls = [redis_client.pttl(n) for n in names]
    assert 98_000 < ttls[0] <= 100_000 and ttls[1] == -1 and 98_000 < ttls[2] <= 100_000
    assert store.get_local_rows("sess", ["s1"]) == [{"z": 9.0}]  # read again: not held
    assert store.get_local_vectors("user", ["u1"], 4)[1][0]  # still in Redis
    store.set_local_rows("sess", {"s1": {"a": 3.0}})  # written again: untimed again
    _commit(store, redis_client, prefix)
    assert redis_client.pttl(names[0]) == -1

    clock[0] = 2000.0
    many = _expiring_writer(redis_client, prefix, clock, held_keys=4, others_may_write=True)
    for n in range(6):
        many.set_local_rows("sess", {f"m{n}": {"a": 1.0}})
        _commit(many, redis_client, prefix)
    ttls = [redis_client.pttl(many.reader.key("sess", f"m{n}")) for n in range(6)]
    assert all(98_000 < ttl <= 100_000 for ttl in ttls[:2]) and ttls[2:] == [-1] * 4, ttls


def test_keys_past_the_writers_capacity_are_handed_to_redis_ttls(redis_client, unique):
    prefix, started = f"t{unique}", time.time()
    clock = [started]
    store = _expiring_writer(redis_client, prefix, clock, held_keys=4)
    for n in range(8):  # one key per commit, a second apart
        clock[0] = started + n
        store.set_local_rows("sess", {f"s{n}": {"a": float(n)}})
        _commit(store, redis_client, prefix)
    ttls = [redis_client.pttl(store.reader.key("sess", f"s{n}")) for n in range(8)]
    # at 5 keys (> 4) the 2 oldest get PEXPIREAT written + 100 s, again at the 7th key
    assert all(ttl == -1 for ttl in ttls[4:]), ttls
    for n, ttl in enumerate(ttls[:4]):
        assert (n + 100) * 1000 - 2000 < ttl <= (n + 100) * 1000, (n, ttls)
    assert list(store.written.last_written["sess"]) == ["s4", "s5", "s6", "s7"]


def test_a_writer_taking_over_gives_keys_without_a_ttl_their_tables_ttl(redis_client,
                                                                        unique):
    prefix, clock = f"t{unique}", [time.time()]
    first = _expiring_writer(redis_client, prefix, clock)
    first.set_local_rows("sess", {f"s{n}": {"a": 1.0} for n in range(2500)})
    first.set_vectors("item", ["i1"], np.ones((1, 4)))
    _commit(first, redis_client, prefix)
    timed = first.reader.key("sess", "timed")
    redis_client.set(timed, b"x", px=5000)  # a key with a TTL keeps it
    other = RedisStore(redis_client, prefix, "y").key("sess", "s1")
    redis_client.set(other, b"x")  # another model's key: not this writer's
    # the first writer is gone; the next one takes over what it wrote
    second = _expiring_writer(redis_client, prefix, clock)
    second.take_over()
    assert UntimedKeySweeper().request([second]).result(30) >= 2500
    ttls = [redis_client.pttl(first.reader.key("sess", f"s{n}")) for n in range(2500)]
    assert all(90_000 < ttl <= 100_000 for ttl in ttls)
    assert 990_000 < redis_client.pttl(first.reader.key("item", "i1")) <= 1_000_000
    assert 0 < redis_client.pttl(timed) <= 5000
    assert redis_client.pttl(other) == -1


def test_a_sweep_scans_each_namespace_once_for_all_its_tables_and_writers(redis_client,
                                                                           unique):
    """A SCAN walks the whole keyspace (~0.6 s of Redis per million keys) whatever it
    matches: the sweep of a worker's stores (user side and owners, the same namespaces)
    walks it once per namespace, not once per table and store."""
    prefix, clock = f"t{unique}", [time.time()]
    user_side, owner = (_expiring_writer(redis_client, prefix, clock) for _ in range(2))
    user_side.set_local_rows("sess", {f"s{n}": {"a": 1.0} for n in range(30)})
    user_side.set_local_vectors("user", ["u1", "u2"], np.ones((2, 4)))
    owner.set_rows("nb", {f"i{n}": {"i0": 0.5} for n in range(20)})
    for store in (user_side, owner):
        _commit(store, redis_client, f"{prefix}{id(store)}")
    untracked = RedisStore(redis_client, prefix, "x").key("other", "k")
    redis_client.set(untracked, b"x")  # a table the writers never listed: left alone
    scans = []
    scan_iter = redis_client.scan_iter
    redis_client.scan_iter = lambda **kw: scans.append(kw["match"]) or scan_iter(**kw)
    try:
        given = sweep_untimed_keys([user_side, owner, user_side])
    finally:
        del redis_client.scan_iter
    assert scans == [f"{user_side.reader.base}:*"] and given == 30 + 2 + 20
    assert all(90_000 < redis_client.pttl(user_side.reader.key("sess", f"s{n}")) <= 100_000
               for n in range(30))
    assert 90_000 < redis_client.pttl(user_side.reader.key("user", "u2")) <= 100_000
    assert 990_000 < redis_client.pttl(owner.reader.key("nb", "i7")) <= 1_000_000
    assert redis_client.pttl(untracked) == -1


def test_keys_deleted_as_idle_stay_absent_while_the_delete_is_in_flight(redis_client, unique):
    """The commit that deletes idle keys may still be in flight when the next batch is
    computed: the writer must not read the old rows back from Redis meanwhile, even when its
    table is over ``held_keys`` and drops its oldest held keys."""
    prefix, clock = f"t{unique}", [time.time()]
    store = _expiring_writer(redis_client, prefix, clock, held_keys=3, complete=False)
    reader = store.reader
    for n in range(1, 4):  # s1, s2, s3: one commit each
        clock[0] += 1
        store.set_local_rows("sess", {f"s{n}": {"a": float(n)}})
        _commit(store, redis_client, prefix)
    clock[0] += 150  # all three idle now
    store.set_local_rows("sess", {"s4": {"a": 4.0}})
    in_flight = WriteBatch()
    store.flush(in_flight)  # queues the DEL of s1..s3; not committed yet
    assert redis_client.exists(reader.key("sess", "s1"))
    assert store.get_local_rows("sess", ["s1", "s2", "s3"]) == [{}, {}, {}]
    assert in_flight.commit(redis_client, [f"{prefix}:w"], [None])
    assert not any(redis_client.exists(reader.key("sess", f"s{n}")) for n in range(1, 4))
