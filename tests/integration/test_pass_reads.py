"""What one serving pass reads from Redis: the users' MF vectors ride with their histories,
and the session items' vectors come from serving's own item-vector index."""

import time

import numpy as np
import pytest

from online_models.base import Query
from state.redis_store import RedisStore
from serving.feeds import FeedBuilder
from stream.simulator import UserSimulator
from stream.state import LiveState, SourceMessage


@pytest.fixture
def state(settings, redis_client):
    settings = settings.model_copy(update={"explore_policy": "none",
                                           "neighbourhoods_interval_s": 0})
    events = list(UserSimulator(60, 80, seed=7).events(1200, time.time() - 600))
    LiveState.for_worker(settings).apply_messages([SourceMessage("interactions", 0, 0, events)])
    return settings, sorted({e.user_id for e in events})


def test_a_pass_reads_no_vector_apart_and_folds_in_what_redis_holds(state, redis_client,
                                                                     monkeypatch):
    settings, users = state
    builder = FeedBuilder(settings, redis_client)
    mf = builder.recommender.mf
    histories = builder.histories(users)
    items = sorted({i for h in histories for i in h})
    vectors, found = mf.store.get_vectors("item", items, mf.factors)
    assert found.all()
    builder.ann.upsert(items, vectors)  # what the vector tail would have indexed
    queries = [Query(u, h[-10:]) for u, h in zip(users, histories)]
    read_from_redis = mf.query_vectors(queries)  # users and items read from the store

    reads = []
    mget = RedisStore._mget
    monkeypatch.setattr(RedisStore, "_mget", lambda store, table, keys: (
        keys and reads.append((store.base.rsplit(":", 1)[-1], table))
        or mget(store, table, keys)))
    prefetch = RedisStore.prefetch_vector_tables
    monkeypatch.setattr(RedisStore, "prefetch_vector_tables", lambda store, tables: (
        reads.extend((store.base.rsplit(":", 1)[-1], t) for t in tables)
        or prefetch(store, tables)))
    builder.histories(users, user_vectors=True)
    folded = mf.query_vectors(queries, item_vectors=builder.ann.vectors)
    assert reads == []  # users' vectors came with the histories, items' from the index
    np.testing.assert_allclose(folded, read_from_redis, rtol=1e-6)
    assert folded.any(axis=1).all()

    feeds = builder.compute(users[:8], 10, source="on_demand")
    assert all(feed.items for feed in feeds)
    assert [r for r in reads if r[0] == "mf"] == []  # a whole pass: no MF vector read apart
