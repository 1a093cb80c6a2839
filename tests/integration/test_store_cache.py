"""RedisStore's worker-side shortcuts on a real redis-server: cached local rows and vectors,
remembered claims, prefetched shared vectors, and recorded writes."""

import numpy as np
import pytest
import redis

from state.redis_store import RedisStore, WriteBatch


def test_local_rows_are_served_from_the_cache_until_forgotten(redis_client, unique):
    store = RedisStore(redis_client, f"t{unique}", "session", cache_local_rows=2)
    reader = RedisStore(redis_client, f"t{unique}", "session")  # serving: no cache
    store.set_local_rows("sess", {"a": {"x": 1.0}, "b": {"y": 2.0}})
    assert reader.get_local_rows("sess", ["a", "b", "c"]) == [{"x": 1.0}, {"y": 2.0}, {}]
    redis_client.delete(store.key("sess", "a"))  # Redis changes behind the owner's back
    assert store.get_local_rows("sess", ["a"]) == [{"x": 1.0}]  # cached
    store.forget_cached()
    assert store.get_local_rows("sess", ["a", "b"]) == [{}, {"y": 2.0}]


def test_the_local_row_cache_is_bounded_least_recently_written_first(redis_client, unique):
    store = RedisStore(redis_client, f"t{unique}", "session", cache_local_rows=2)
    store.set_local_rows("sess", {"a": {"x": 1.0}, "b": {"x": 2.0}})
    store.set_local_rows("sess", {"a": {"x": 3.0}, "c": {"x": 4.0}})  # evicts b
    for key in ("a", "b", "c"):
        redis_client.delete(store.key("sess", key))
    assert store.get_local_rows("sess", ["a", "b", "c"]) == [{"x": 3.0}, {}, {"x": 4.0}]


def test_an_empty_local_row_deletes_it(redis_client, unique):
    store = RedisStore(redis_client, f"t{unique}", "cooc", cache_local_rows=10)
    store.set_local_rows("win", {"s": {"i": 1.0}})
    store.set_local_rows("win", {"s": {}})
    assert not redis_client.exists(store.key("win", "s"))
    assert store.get_local_rows("win", ["s"]) == [{}]


def test_local_vectors_are_cached_as_copies(redis_client, unique):
    store = RedisStore(redis_client, f"t{unique}", "mf", cache_local_rows=10)
    vectors = np.arange(6, dtype=np.float32).reshape(2, 3)
    store.set_local_vectors("user", ["u", "v"], vectors)
    vectors[:] = -1  # the caller's buffer changes afterwards
    redis_client.delete(store.key("user", "u"))
    got, found = store.get_local_vectors("user", ["u", "v", "w"], 3)
    assert found.tolist() == [True, True, False]
    np.testing.assert_array_equal(got[:2], np.arange(6, dtype=np.float32).reshape(2, 3))


def test_prefetched_vectors_are_used_once(redis_client, unique):
    store = RedisStore(redis_client, f"t{unique}", "mf")
    store.set_vectors("item", ["a", "b"], np.ones((2, 2), np.float32))
    store.prefetch_vectors("item", ["a"])
    store.set_vectors("item", ["a", "b"], np.full((2, 2), 5, np.float32))
    got, _ = store.get_vectors("item", ["a", "b"], 2)  # a as prefetched, b read now
    np.testing.assert_array_equal(got, [[1, 1], [5, 5]])
    got, _ = store.get_vectors("item", ["a"], 2)
    np.testing.assert_array_equal(got, [[5, 5]])


def test_vectors_of_several_tables_are_prefetched_in_one_read(redis_client, unique):
    store = RedisStore(redis_client, f"t{unique}", "mf")
    store.set_vectors("user", ["u"], np.full((1, 2), 2, np.float32))
    store.set_vectors("item", ["a", "b"], np.ones((2, 2), np.float32))
    reads = redis_client.info("commandstats").get("cmdstat_mget", {}).get("calls", 0)
    store.prefetch_vector_tables({"user": ["u", "nobody"], "item": ["b", "a"]})
    assert redis_client.info("commandstats")["cmdstat_mget"]["calls"] == reads + 1
    store.set_vectors("item", ["a"], np.full((1, 2), 5, np.float32))  # after the read
    users, found = store.get_vectors("user", ["u", "nobody"], 2)
    items, _ = store.get_vectors("item", ["a", "b"], 2)
    np.testing.assert_array_equal(users, [[2, 2], [0, 0]])
    assert found.tolist() == [True, False]
    np.testing.assert_array_equal(items, [[1, 1], [1, 1]])  # as prefetched


def test_claims_are_remembered_until_forgotten(redis_client, unique):
    store = RedisStore(redis_client, f"t{unique}", "cooc")
    assert store.claim("meta", "landmark", "t", 10.0) == 10.0
    assert store.claim("meta", "landmark", "t", 20.0) == 10.0  # first writer wins
    redis_client.delete(store.key("meta", "landmark"))
    assert store.claim("meta", "landmark", "t", 30.0) == 10.0  # remembered
    store.forget_cached()
    assert store.claim("meta", "landmark", "t", 30.0) == 30.0


def test_write_batches_record_and_commit_as_one_transaction(redis_client, unique):
    store = RedisStore(redis_client, f"t{unique}", "session")
    writes = WriteBatch()
    with store.deferred(writes):
        store.incr_rows("sr", {"a": {"b": 1.5}})
        store.set_local_rows("sess", {"s": {"a": 1.0}})
    assert store.get_rows("sr", ["a"]) == [{}]  # recorded, not written
    assert writes.commit(redis_client, [f"t{unique}:mark"], [None])
    assert store.get_rows("sr", ["a"]) == [{"b": 1.5}]
    assert store.get_local_rows("sess", ["s"]) == [{"a": 1.0}]


def test_a_write_batch_commits_only_when_the_watched_values_are_as_expected(redis_client,
                                                                           unique):
    store = RedisStore(redis_client, f"t{unique}", "session")
    mark = f"t{unique}:mark"
    writes = WriteBatch()
    with store.deferred(writes):
        store.incr_rows("sr", {"a": {"b": 0.1}})
    writes.set(mark, 7)
    assert not writes.commit(redis_client, [mark], [b"6"])  # another writer moved it
    assert store.get_rows("sr", ["a"]) == [{}] and redis_client.get(mark) is None
    redis_client.script_flush()  # Redis restarted: the batch's script must be loaded again
    assert writes.commit(redis_client, [mark], [None])
    assert store.get_rows("sr", ["a"]) == [{"b": 0.1}] and redis_client.get(mark) == b"7"


def test_a_failing_command_in_a_write_batch_raises(redis_client, unique):
    key = f"t{unique}:list"
    redis_client.rpush(key, "x")
    writes = WriteBatch()
    writes.sadd(key, "member")  # WRONGTYPE: fails inside EXEC
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        writes.commit(redis_client, [f"t{unique}:mark"], [None])
    assert redis_client.ping()  # the pool still works


def test_prefetched_local_state_is_cached_absent_included(redis_client, unique):
    store = RedisStore(redis_client, f"t{unique}", "mf", cache_local_rows=10)
    store.set_vectors("user", ["u"], np.ones((1, 2), np.float32))
    redis_client.set(store.key("sess", "s"), b"\x81\xa1a\xcb?\xf0\x00\x00\x00\x00\x00\x00")
    store.prefetch_local_vectors("user", ["u", "nobody"])
    store.prefetch_local_rows("sess", ["s", "new"])
    redis_client.delete(store.key("user", "u"), store.key("sess", "s"))  # only the cache knows
    got, found = store.get_local_vectors("user", ["u", "nobody"], 2)
    assert found.tolist() == [True, False] and got.tolist() == [[1, 1], [0, 0]]
    assert store.get_local_rows("sess", ["s", "new"]) == [{"a": 1.0}, {}]


def test_shared_reads_read_each_row_once_per_scope_and_thread(redis_client, unique):
    import threading

    writer = RedisStore(redis_client, f"t{unique}", "session")
    reader = RedisStore(redis_client, f"t{unique}", "session")
    writer.incr_rows("isess", {"a": {"s1": 1.0}})
    writer.set_local_rows("sess", {"s1": {"a": 1.0}})
    with reader.shared_reads():
        assert reader.get_rows("isess", ["a", "b"]) == [{"s1": 1.0}, {}]
        writer.incr_rows("isess", {"a": {"s2": 1.0}, "b": {"s2": 1.0}})
        writer.set_local_rows("sess", {"s1": {"a": 2.0}})
        assert reader.get_local_rows("sess", ["s1"]) == [{"a": 2.0}]  # first read: Redis
        writer.set_local_rows("sess", {"s1": {"a": 3.0}})
        # read once: the scope answers as it first read, absent rows included
        assert reader.get_rows("isess", ["b", "a", "a"]) == [{}, {"s1": 1.0}, {"s1": 1.0}]
        assert reader.get_local_rows("sess", ["s1"]) == [{"a": 2.0}]
        with reader.shared_reads():  # nested: the same scope
            assert reader.get_rows("isess", ["a"]) == [{"s1": 1.0}]
        assert reader.get_rows("isess", ["a"]) == [{"s1": 1.0}]
        seen = []  # another thread is outside this scope
        thread = threading.Thread(target=lambda: seen.append(reader.get_rows("isess", ["a"])))
        thread.start(), thread.join()
        assert seen == [[{"s1": 1.0, "s2": 1.0}]]
    assert reader.get_rows("isess", ["a", "b"]) == [{"s1": 1.0, "s2": 1.0}, {"s2": 1.0}]
    assert reader.get_local_rows("sess", ["s1"]) == [{"a": 3.0}]


def test_a_serving_pass_reads_the_rows_its_sources_share_once(redis_client, unique):
    from collections import Counter

    from online_models.session import SessionModel
    from online_models.signals import SignalMapper
    from schemas.events import Interaction
    from serving.recommender import Recommender, Request

    model = SessionModel().bind(RedisStore(redis_client, f"t{unique}", "session"))
    clicks = [Interaction(event_id=f"e{n}", user_id=s, item_id=i, type="click",
                          timestamp=1e9 + n, session_id=s)
              for n, (s, i) in enumerate([("s1", "a"), ("s1", "b"), ("s2", "b"), ("s2", "c"),
                                          ("s3", "a"), ("s3", "c")])]
    model.learn(SignalMapper().map(clicks))
    reads = Counter()
    for name in ("_read_rows", "_read_local"):
        def counted(table, keys, read=getattr(model.store, name)):
            reads.update((table, key) for key in keys)
            return read(table, keys)
        setattr(model.store, name, counted)
    # session candidates and read-time co-occurrence both read the sessions of a and b
    [row] = Recommender(trending=lambda n: [], session=model, cooc=model).candidates(
        [Request("u", ("a", "b"))])
    assert row["session"] and row["cooc"]
    assert {("isess", "a"), ("sess", "s1"), ("df", "c")} <= set(reads)
    assert max(reads.values()) == 1
