"""Item neighbourhoods published by the feed builder (serving/neighbour_rows.py) on a real
Redis: serving reads them instead of counting, lists stay the same, only what serving asked
for is published, and it expires."""

import threading
import time

import pytest

from online_models.session import SessionModel
from schemas.events import Interaction
from schemas.keys import RedisKeys
from serving.feeds import FeedBuilder
from serving.neighbour_rows import NeighbourhoodPublisher
from stream.simulator import UserSimulator
from stream.state import LiveState, SourceMessage


@pytest.fixture
def state(settings, redis_client):
    settings = settings.model_copy(update={"explore_policy": "none"})
    events = list(UserSimulator(60, 80, seed=5).events(1200, time.time() - 600))
    LiveState.for_worker(settings).apply_messages([SourceMessage("interactions", 0, 0, events)])
    return settings, sorted({e.user_id for e in events})


def lists(feeds):
    return [[(i.item_id, i.score, i.reason) for i in feed.items] for feed in feeds]


def test_serving_reads_published_neighbourhoods_and_lists_stay_the_same(state, redis_client,
                                                                       monkeypatch):
    settings, users = state
    keys = RedisKeys(settings.key_prefix)
    counted = lists(FeedBuilder(settings.model_copy(update={"neighbourhoods_interval_s": 0}),
                                redis_client).compute(users, 10, source="on_demand"))
    assert not redis_client.exists(keys.neighbourhoods_wanted)  # off: nothing asked for

    # nothing published yet: the lists are counted here, and their items marked wanted
    assert lists(FeedBuilder(settings, redis_client).compute(users, 10, source="on_demand")
                 ) == counted
    wanted = {m.decode() for m in redis_client.zrange(keys.neighbourhoods_wanted, 0, -1)}
    publisher = NeighbourhoodPublisher.for_settings(settings, redis_client)
    assert publisher.publish() == len(wanted) > 20
    assert all(redis_client.exists(keys.neighbourhood(item)) for item in wanted)

    counting = []
    original = SessionModel._count_neighbourhoods
    monkeypatch.setattr(SessionModel, "_count_neighbourhoods", lambda model, items, *rest: (
        counting.extend(items) or original(model, items, *rest)))
    assert lists(FeedBuilder(settings, redis_client).compute(users, 10, source="on_demand")
                 ) == counted
    assert counting == []  # every neighbourhood came published


def test_only_wanted_items_are_published_for_a_few_intervals(state, redis_client):
    settings, _ = state
    settings = settings.model_copy(update={"neighbourhoods_interval_s": 0.5,
                                           "neighbourhoods_wanted_s": 30,
                                           "neighbourhoods_max_items": 3})
    keys = RedisKeys(settings.key_prefix)
    publisher = NeighbourhoodPublisher.for_settings(settings, redis_client)
    assert publisher.publish() == 0  # nobody asked
    now = time.time()
    redis_client.zadd(keys.neighbourhoods_wanted, {"i1": now - 40, "i2": now - 3, "i3": now - 2,
                                                   "i4": now - 1, "i5": now})
    assert publisher.wanted() == ["i5", "i4", "i3"]  # too old (i1) and past the cap (i2) go
    assert publisher.publish() == 3
    assert not redis_client.exists(keys.neighbourhood("i1"), keys.neighbourhood("i2"))
    assert 0 < redis_client.pttl(keys.neighbourhood("i5")) <= 1500  # three intervals
    assert redis_client.zcard(keys.neighbourhoods_wanted) == 3


def test_the_feed_builder_publishes_what_serving_asked_for(state, redis_client):
    settings, users = state
    settings = settings.model_copy(update={"neighbourhoods_interval_s": 0.2})
    keys = RedisKeys(settings.key_prefix)
    FeedBuilder(settings, redis_client).compute(users[:5], 10, source="on_demand")
    wanted = [m.decode() for m in redis_client.zrange(keys.neighbourhoods_wanted, 0, -1)]
    assert wanted
    builder, stop = FeedBuilder(settings, redis_client), threading.Event()
    runner = threading.Thread(target=builder.run, args=(stop,))
    runner.start()
    try:
        deadline = time.monotonic() + 10
        while (not all(redis_client.exists(keys.neighbourhood(i)) for i in wanted)
               and time.monotonic() < deadline):
            time.sleep(0.05)
        assert all(redis_client.exists(keys.neighbourhood(i)) for i in wanted)
    finally:
        stop.set()
        runner.join(10)


def test_a_round_goes_a_chunk_a_step_so_feed_rounds_interleave(state, redis_client):
    settings, _ = state
    settings = settings.model_copy(update={"neighbourhoods_interval_s": 60})
    keys = RedisKeys(settings.key_prefix)
    publisher = NeighbourhoodPublisher.for_settings(settings, redis_client)
    publisher.chunk = 2
    redis_client.zadd(keys.neighbourhoods_wanted, {f"i{n}": time.time() for n in range(5)})
    written = []
    for _ in range(3):
        assert publisher.until_due() == 0
        more = publisher.step()
        written.append(sum(redis_client.exists(keys.neighbourhood(f"i{n}")) for n in range(5)))
    assert written == [2, 4, 5] and not more
    assert publisher.until_due() > 50  # the next round in an interval
    assert publisher.step() is False and publisher.publish() == 5  # a whole round on demand


def test_a_round_counts_only_the_neighbourhoods_whose_sessions_changed(state, redis_client):
    """Unchanged samples: the published rows are kept (TTLs renewed), not counted; a session
    that gains an item gets its items counted again; a published row that is gone, or one
    kept for ``recount_s``, is counted again. Serving's lists equal those counted in place."""
    settings, users = state
    settings = settings.model_copy(update={"neighbourhoods_recount_s": 60})
    keys = RedisKeys(settings.key_prefix)
    FeedBuilder(settings, redis_client).compute(users, 10, source="on_demand")
    publisher = NeighbourhoodPublisher.for_settings(settings, redis_client)
    wanted = publisher.publish()
    assert publisher.counted == wanted > 20 and publisher.kept == 0

    publisher.interval_s = 60  # the rows kept get three intervals: 180 s
    assert publisher.publish() == wanted
    assert (publisher.counted, publisher.kept) == (0, wanted)  # nothing changed
    assert all(redis_client.pttl(keys.neighbourhood(i)) > 60_000 for i in publisher._round)

    # one session gains an item: its items' neighbourhoods change, no other
    item = publisher._round[0]
    [sessions] = publisher.model.store.get_rows("isess", [item])
    session = sorted(sessions)[0]
    event = Interaction(event_id="grows", user_id=session, session_id=session,
                        item_id="a-new-item", type="click", timestamp=time.time())
    LiveState.for_worker(settings).apply_messages([SourceMessage("interactions", 0, 10**6,
                                                                 [event])])
    holding = {i for i, row in zip(publisher._round, publisher.model.store.get_rows(
        "isess", publisher._round)) if session in row}
    redis_client.delete(keys.neighbourhood(publisher._round[-1]))  # gone (evicted, say)
    assert publisher.publish() == wanted
    assert publisher.counted == len(holding | {publisher._round[-1]}) < wanted
    assert publisher.kept == wanted - publisher.counted
    assert all(redis_client.exists(keys.neighbourhood(i)) for i in publisher._round)

    counted_here = lists(FeedBuilder(settings.model_copy(update={
        "neighbourhoods_interval_s": 0}), redis_client).compute(users, 10, source="on_demand"))
    assert lists(FeedBuilder(settings, redis_client).compute(users, 10, source="on_demand")
                 ) == counted_here

    publisher.recount_s = 0  # kept long enough: counted again, changed or not
    assert publisher.publish() == wanted and publisher.counted == wanted


def test_unchanged_neighbourhoods_are_recounted_spread_over_the_rounds(state, redis_client):
    """Counted together (the first round), unchanged neighbourhoods are not all recounted
    together ``recount_s`` later — a round that recounts every item costs ~3× one that does
    not, a tail on the core serving shares — but each once, ½–1 of ``recount_s`` after, then
    every ``recount_s``."""
    settings, users = state
    FeedBuilder(settings, redis_client).compute(users, 10, source="on_demand")
    now = [0.0]
    model = NeighbourhoodPublisher.for_settings(settings, redis_client).model
    publisher = NeighbourhoodPublisher(model, redis_client, RedisKeys(settings.key_prefix),
                                       interval_s=1.0, wanted_s=60.0, max_items=10_000,
                                       recount_s=10.0, clock=lambda: now[0], seed=3)
    wanted = publisher.publish()
    assert publisher.counted == wanted > 20
    counted = []
    for second in range(1, 11):  # a round a second for recount_s, nothing changed
        now[0] = float(second)
        assert publisher.publish() == wanted
        counted.append(publisher.counted)
    assert counted[:4] == [0] * 4  # under half of recount_s: all kept
    assert sum(counted) == wanted  # each recounted once, by recount_s
    assert max(counted) <= wanted / 2, counted  # spread over the rounds
    later = []
    for second in range(11, 21):  # then each recount_s after its last count: spread still
        now[0] = float(second)
        publisher.publish()
        later.append(publisher.counted)
    assert later == counted, (counted, later)


def test_a_round_reads_each_members_session_count_once_not_once_a_chunk(state, redis_client,
                                                                        monkeypatch):
    """Most members recur across a round's items: reading their session counts once a chunk
    was a fifth of the publisher's CPU."""
    settings = state[0].model_copy(update={"serving_rows_max_age_s": 60})  # a slow round too
    keys = RedisKeys(settings.key_prefix)
    publisher = NeighbourhoodPublisher.for_settings(settings, redis_client)
    publisher.chunk = 2
    read = []
    counts = publisher.model._session_counts
    monkeypatch.setattr(publisher.model, "_session_counts",
                        lambda items: read.extend(items) or counts(items))
    redis_client.zadd(keys.neighbourhoods_wanted, {f"i{n}": time.time() for n in range(10)})
    assert publisher.publish() == 10
    assert read and len(read) == len(set(read))


def test_lists_are_served_while_redis_refuses_serving_writes():
    """Redis at maxmemory refuses writes: serving's two on its list path (marking the
    neighbourhoods it wants, counting exploration's shows) must not fail it (lists are
    computed and logged, each refusal counted)."""
    from infra.embedded import EmbeddedRedis
    from infra.redis_client import REDIS_OOM, sync_redis
    from infra.settings import Settings

    with EmbeddedRedis(appendonly=False) as server:
        settings = Settings(redis_url=server.url, explore_policy="none")
        client = sync_redis(server.url)
        events = list(UserSimulator(30, 60, seed=2).events(400, time.time() - 600))
        LiveState.for_worker(settings).apply_messages(
            [SourceMessage("interactions", 0, 0, events)])
        users = sorted({e.user_id for e in events})
        counted = lists(FeedBuilder(settings.model_copy(
            update={"neighbourhoods_interval_s": 0}), client).compute(users, 10))
        client.config_set("maxmemory-policy", "noeviction")
        client.config_set("maxmemory", client.info("memory")["used_memory"])
        refused = REDIS_OOM._value.get()
        builder = FeedBuilder(settings, client)
        assert lists(builder.compute(users, 10)) == counted
        assert REDIS_OOM._value.get() > refused
        assert not client.exists(RedisKeys(settings.key_prefix).neighbourhoods_wanted)
        # exploration's show counts are skipped the same way: the lists, logged, are served
        explored = FeedBuilder(settings.model_copy(update={"explore_policy": "epsilon-greedy",
                                                           "explore_epsilon": 1.0}), client)
        feeds = explored.compute(users, 10)
        assert any(item.reason == "exploring" for feed in feeds for item in feed.items)
        refused = REDIS_OOM._value.get()
        explored.log_served(feeds)
        assert REDIS_OOM._value.get() > refused
        assert not client.exists(RedisKeys(settings.key_prefix).bandit_shows)
        client.close()
