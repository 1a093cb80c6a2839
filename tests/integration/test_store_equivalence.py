"""Same events, memory store vs Redis store: identical state, identical recommendations."""

import numpy as np
import pytest

from online_models.base import Query
from online_models.registry import build
from online_models.signals import SignalMapper
from online_models.store import MemoryStore
from state.redis_store import RedisStore
from stream.simulator import UserSimulator
from tests.state_check import read_rows

STORE_BACKED = ["session", "cooc", "cooc_read", "mf", "als", "popularity", "trending", "random", "content"]


@pytest.mark.parametrize("name", STORE_BACKED)
def test_memory_and_redis_stores_give_identical_models(name, redis_client, unique):
    events = list(UserSimulator(40, 120, seed=6, impressions=True).events(2500, 1.7e9, 2.0))
    memory = build(name).bind(MemoryStore())
    live = build(name).bind(RedisStore(redis_client, f"t{unique}", name))
    descriptions = UserSimulator(40, 120, seed=6).item_descriptions(1.7e9)
    memory.learn_items(descriptions)
    live.learn_items(descriptions)
    for start in range(0, len(events), 400):  # the mapper is per model, as in a worker
        memory.learn(SignalMapper().map(events[start:start + 400]))
        live.learn(SignalMapper().map(events[start:start + 400]))
    for table, rows in memory.store.rows.items():
        keys = sorted(rows)
        assert read_rows(live.store, live, table, keys) == [rows[k] for k in keys], table
        assert live.store.row_count(table) == len(keys), table
    for table, vectors in memory.store.vectors.items():
        keys = sorted(vectors)
        got, found = live.store.get_vectors(table, keys, len(next(iter(vectors.values()))))
        assert found.all() and np.array_equal(got, np.stack([vectors[k] for k in keys])), table
    queries = [Query(e.user_id, tuple(x.item_id for x in events[i:i + 4]))
               for i, e in enumerate(events[:200:10])]
    a, b = memory.recommend(queries, 10), live.recommend(queries, 10)
    assert [r.items for r in a] == [r.items for r in b]
    assert all(np.array_equal(x.scores, y.scores) for x, y in zip(a, b))


def test_redis_row_keys_are_cluster_safe_and_encoded(redis_client, unique):
    store = RedisStore(redis_client, f"t{unique}", "ns:{x}")
    store.incr_rows("cooc", {"a:b{c}": {"m": 1.0}})
    [key] = [k.decode() for k in redis_client.scan_iter(match=f"t{unique}:m:*")]
    assert key == f"t{unique}:m:ns%3A%7Bx%7D:cooc:{{a%3Ab%7Bc%7D}}"
    assert store.get_rows("cooc", ["a:b{c}"]) == [{"m": 1.0}]
    assert store.keys("cooc", ["a:b{c}", "plain", "a:b{c}"]) == [
        store.key("cooc", k) for k in ("a:b{c}", "plain", "a:b{c}")]  # remembered names


def test_scores_from_numpy_scalars_are_stored_as_plain_numbers(redis_client, unique):
    redis_store, memory_store = RedisStore(redis_client, f"t{unique}", "n"), MemoryStore()
    for store in (redis_store, memory_store):
        store.incr_rows("r", {"a": {"x": np.float32(0.5), "y": np.int64(2), "z": 1}})
        store.incr_rows("r", {"a": {"x": np.float64(0.25)}})
    assert redis_store.get_rows("r", ["a"]) == memory_store.get_rows("r", ["a"]) == [
        {"x": 0.75, "y": 2.0, "z": 1.0}]
    with pytest.raises(TypeError, match="cannot store a object as a score"):
        redis_store.incr_rows("r", {"a": {"x": object()}})


def test_concurrent_vector_changes_add_up_in_both_stores(redis_client):
    """Two workers read the same item vector, each computes a change: neither is lost."""
    rng = np.random.default_rng(0)
    base = rng.normal(size=(3, 8)).astype(np.float32)
    first, second = (rng.normal(size=(3, 8)).astype(np.float32) for _ in range(2))
    redis_store = RedisStore(redis_client, "vecadd", "mf")
    memory_store = MemoryStore()
    for store in (redis_store, memory_store):
        store.add_vectors("item", ["a", "b", "c"], first, base)   # worker 1 (creates them)
        store.add_vectors("item", ["a", "b", "c"], second, base)  # worker 2, same stale read
    got_redis, found = redis_store.get_vectors("item", ["a", "b", "c"], 8)
    got_memory, _ = memory_store.get_vectors("item", ["a", "b", "c"], 8)
    assert found.all()
    np.testing.assert_array_equal(got_redis, got_memory)  # bit for bit
    np.testing.assert_allclose(got_redis, base + first + second, rtol=1e-5)


def test_long_rows_add_bit_for_bit_and_trim_like_memory(redis_client, unique):
    """Thousands of members a row, scores using every bit, trimmed: Redis equals memory."""
    rng = np.random.default_rng(3)
    redis_store, memory_store = RedisStore(redis_client, f"t{unique}", "w"), MemoryStore()
    for step in range(3):
        members = rng.choice(6000, size=4500, replace=False)
        deltas = {"wide": {f"m{m}": float(v) for m, v in
                           zip(members, rng.random(4500) * 10.0 ** rng.integers(-8, 8, 4500))},
                  "lone": {"only": float(rng.random()) / 3},
                  "few": {"p": 1 / 3, "q": -2 / 7}}
        for store in (redis_store, memory_store):
            store.incr_rows("r", deltas, keep_top=3000)
            store.incr_rows("untrimmed", {"lone": {"n": 0.1 * (step + 1)}})
            store.set_rows("s", {"wide": {f"m{m}": 1.0 / (m + 1) for m in members}},
                           keep_top=2500)
    for table, keys in (("r", ["wide", "lone", "few"]), ("untrimmed", ["lone"]), ("s", ["wide"])):
        assert redis_store.get_rows(table, keys) == memory_store.get_rows(table, keys), table
    assert len(memory_store.get_rows("r", ["wide"])[0]) <= 3300
