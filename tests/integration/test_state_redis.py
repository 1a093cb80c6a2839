"""LiveState and FeedBuilder against a real redis-server."""

import time

import msgspec
import numpy as np
import pytest

from online_models.trending import TRENDING_WEIGHTS, decayed
from schemas.events import Interaction
from schemas.keys import RedisKeys
from serving.feeds import FeedBuilder
from stream.simulator import UserSimulator
from stream.state import LiveState


def oracle(events, now, half_life):
    scores: dict[str, float] = {}
    for e in events:
        w = TRENDING_WEIGHTS[e.type]
        if w:
            scores[e.item_id] = scores.get(e.item_id, 0.0) + w * 0.5 ** ((now - e.timestamp) / half_life)
    return scores


def stored_trending(client, keys, now, half_life):
    meta = client.hgetall(keys.trending_meta)
    landmark = float(meta[b"landmark"])
    return {k.decode(): decayed(v, landmark, now, half_life)
            for k, v in client.zrange(keys.trending, 0, -1, withscores=True)}


def test_trending_and_histories_match_an_oracle(settings, redis_client):
    s = settings.model_copy(update={"trending_half_life_s": 600.0, "history_len": 5})
    state, keys = LiveState(s, redis_client), RedisKeys(s.key_prefix)
    events = list(UserSimulator(30, 100, seed=5).events(2000, 1.7e9, events_per_s=1.0))
    for start in range(0, len(events), 250):  # batches, as the worker applies them
        state.apply_sync(events[start:start + 250])
    now = max(e.timestamp for e in events)
    expected = oracle(events, now, 600.0)
    got = stored_trending(redis_client, keys, now, 600.0)
    assert set(got) == set(expected)
    for item, score in expected.items():
        assert got[item] == pytest.approx(score, rel=1e-6)
    for user in {e.user_id for e in events}:
        mine = [e.item_id for e in events if e.user_id == user]
        assert [x.decode() for x in redis_client.lrange(keys.user_history(user), 0, -1)] == \
            mine[::-1][:5]
        assert 0 < redis_client.ttl(keys.user_history(user)) <= s.history_ttl_s
    assert int(redis_client.hget(keys.stats, "events_applied")) == len(events)
    assert redis_client.scard(keys.feed_queue) == len({e.user_id for e in events})


def test_landmark_rebase_keeps_decayed_scores(settings, redis_client):
    """Events spanning 200 half-lives force rescaling; decayed values must not change."""
    s = settings.model_copy(update={"trending_half_life_s": 10.0})
    state, keys = LiveState(s, redis_client), RedisKeys(s.key_prefix)
    events = [Interaction(event_id=f"e{k}", user_id="u", item_id=f"i{k % 3}", type="click",
                          timestamp=1.7e9 + 10.0 * k) for k in range(200)]
    for e in events:
        state.apply_sync([e])
    now = events[-1].timestamp
    landmark = float(redis_client.hget(keys.trending_meta, "landmark"))
    assert landmark > events[0].timestamp  # it moved
    expected = oracle(events, now, 10.0)
    got = stored_trending(redis_client, keys, now, 10.0)
    for item in expected:
        assert got[item] == pytest.approx(expected[item], rel=1e-9)


@pytest.mark.parametrize("half_life, span_s", [(600.0, 2000.0), (10.0, 4000.0)])
def test_live_trending_and_first_seen_equal_the_replayed_model(settings, redis_client,
                                                               half_life, span_s):
    """The worker writes the same TrendingModel that replay learns: after the same batches,
    Redis's trending scores, landmark and first-seen times equal the model's rows (the second
    case rebases the landmark many times; both trim at 60 items and 600 first-seen times)."""
    from online_models.signals import SignalMapper
    from online_models.trending import TrendingModel

    s = settings.model_copy(update={"trending_half_life_s": half_life,
                                    "trending_max_items": 60})
    state, keys = LiveState(s, redis_client), RedisKeys(s.key_prefix)
    model, mapper = TrendingModel(half_life, 60), SignalMapper()
    events = list(UserSimulator(40, 5000, seed=9).events(3000, 1.7e9,
                                                       events_per_s=3000 / span_s))
    for start in range(0, len(events), 200):
        state.apply_sync(events[start:start + 200])
        model.learn(mapper.map(events[start:start + 200]))
    meta = redis_client.hgetall(keys.trending_meta)
    assert float(meta[b"landmark"]) == model.store.get_rows("meta", ["landmark"])[0]["t"]
    live = {k.decode(): v for k, v in redis_client.zrange(keys.trending, 0, -1, withscores=True)}
    replayed = model.store.get_rows("pop", ["all"])[0]
    assert 60 <= len(live) <= 66 and set(live) == set(replayed)
    assert live == pytest.approx(replayed, rel=1e-9)
    first = {k.decode(): v for k, v in
             redis_client.zrange(keys.item_first_seen, 0, -1, withscores=True)}
    assert 600 <= len(first) <= 660 and first == model.store.get_rows("first", ["all"])[0]


def test_trending_is_trimmed_to_its_bound(settings, redis_client):
    s = settings.model_copy(update={"trending_max_items": 50})
    state, keys = LiveState(s, redis_client), RedisKeys(s.key_prefix)
    state.apply_sync([Interaction(event_id=f"e{k}", user_id="u", item_id=f"i{k}", type="click",
                                  timestamp=1.7e9 + k) for k in range(500)])
    state.apply_sync([Interaction(event_id="z", user_id="u", item_id="i0", type="click",
                                  timestamp=1.7e9 + 500)])
    assert redis_client.zcard(keys.trending) <= 55


def test_feeds_exclude_seen_items_and_follow_the_contract(settings, redis_client):
    s = settings.model_copy(update={"feed_size": 10, "explore_policy": "none"})
    state, keys = LiveState(s, redis_client), RedisKeys(s.key_prefix)
    events = list(UserSimulator(40, 200, seed=2).events(3000, time.time() - 3000))
    state.apply_sync(events)
    builder = FeedBuilder(s, redis_client)
    built = 0
    while n := builder.refresh_round():
        built += n
    users = {e.user_id for e in events}
    assert built == len(users) and redis_client.scard(keys.feed_queue) == 0
    trending = [item for item, _ in builder.trending(1000)]
    for user in users:
        raw = redis_client.get(keys.feed(user))
        doc = msgspec.json.decode(raw)
        assert set(doc) == {"user_id", "items", "recommendation_id", "generated_at", "source",
                            "model_version", "policy"}
        assert doc["policy"] == "greedy"
        seen = set([e.item_id for e in events if e.user_id == user][-s.history_len:])
        items = [i["item_id"] for i in doc["items"]]
        assert len(items) == 10 and not set(items) & seen and set(items) <= set(trending)
        assert [i["position"] for i in doc["items"]] == list(range(10))
        assert all(i["propensity"] == 1.0 and i["reason"] == "trending" for i in doc["items"])
        assert 0 < redis_client.ttl(keys.feed(user)) <= s.feed_ttl_s
    assert np.isfinite([i["score"] for i in doc["items"]]).all()


def test_first_seen_keeps_the_first_time_of_every_item_in_batches_of_thousands(
        settings, redis_client):
    """The script looks items up 2,000 at a time: a batch of 5,000 (half seen before) keeps
    the earlier time of each seen item and sets the others'."""
    state, keys = LiveState(settings, redis_client), RedisKeys(settings.key_prefix)
    t0 = 1.7e9

    def clicks(items, ts):
        return [Interaction(event_id=f"e{ts}-{i}", user_id="u", item_id=i, type="click",
                            timestamp=ts) for i in items]

    state.apply_sync(clicks([f"i{n}" for n in range(0, 5000, 2)], t0))
    state.apply_sync(clicks([f"i{n}" for n in range(5000)], t0 + 60))
    first = {k.decode(): v for k, v in
             redis_client.zrange(keys.item_first_seen, 0, -1, withscores=True)}
    assert first == {f"i{n}": t0 + 60 * (n % 2) for n in range(5000)}


def test_first_seen_times_feed_the_freshness_boost(settings, redis_client):
    s = settings.model_copy(update={"explore_policy": "none", "feed_size": 2,
                                    "freshness_weight": 0.1})
    state, keys = LiveState(s, redis_client), RedisKeys(s.key_prefix)
    t0 = 1.7e9

    def click(n, item, ts):
        return Interaction(event_id=f"e{n}", user_id=f"u{n}", item_id=item, type="click",
                           timestamp=ts)

    # "old" and "new" are equally popular now; "old" was first seen two days earlier
    state.apply_sync([click(0, "old", t0)])
    state.apply_sync([click(1, "old", t0 + 2 * 86400), click(2, "new", t0 + 2 * 86400)])
    first = dict(redis_client.zrange(keys.item_first_seen, 0, -1, withscores=True))
    assert first == {b"old": t0, b"new": t0 + 2 * 86400}
    builder = FeedBuilder(s, redis_client)
    ages = builder.item_ages(["old", "new", "never"])
    assert ages == {"old": 2 * 86400, "new": 0.0}
    [feed] = builder.compute(["someone"])
    assert [i.item_id for i in feed.items][:1] == ["new"]  # the boost breaks the tie


def test_thompson_sampling_learns_from_engagements_counted_by_the_worker(settings, redis_client):
    s = settings.model_copy(update={"explore_policy": "thompson-sampling",
                                    "explore_positions": "1", "feed_size": 3})
    state, keys = LiveState(s, redis_client), RedisKeys(s.key_prefix)
    t0 = 1.7e9
    popular = [Interaction(event_id=f"p{n}", user_id=f"v{n}", item_id=f"i{n % 12}",
                           type="click", timestamp=t0 + n) for n in range(120)]
    state.apply_sync(popular)
    builder = FeedBuilder(s, redis_client)
    feeds = builder.compute([f"w{n}" for n in range(200)])
    builder.write(feeds)
    shown = [f.items[1].item_id for f in feeds]
    assert {k.decode(): int(v) for k, v in redis_client.hgetall(keys.bandit_shows).items()} == \
        {i: shown.count(i) for i in set(shown)}
    assert all(f.policy == "thompson-sampling" and 0 < f.items[1].propensity <= 1 for f in feeds)
    # users engage with one explored item whenever it is shown; the others are ignored
    fixed = {i.item_id for f in feeds for i in f.items if i.position != 1}
    winner = sorted(set(shown) - fixed)[0]
    engaged = [Interaction(event_id=f"c{n}", user_id=f.user_id, item_id=winner, type="click",
                           timestamp=t0 + 100, recommendation_id=f.recommendation_id, position=1)
               for n, f in enumerate(feeds) if f.items[1].item_id == winner]
    engaged.append(Interaction(event_id="elsewhere", user_id="x", item_id="elsewhere",
                               type="click", timestamp=t0 + 100, recommendation_id="r",
                               position=0))
    state.apply_sync(engaged)
    assert redis_client.hget(keys.bandit_clicks, winner) == str(len(engaged) - 1).encode()
    assert redis_client.hget(keys.bandit_clicks, "elsewhere") is None  # 0 is not reserved
    options = sorted(set(shown))
    before = dict(zip(options, builder.recommender.explorer.win_probabilities(options)))
    assert before[winner] > 0.9  # every show engaged: Thompson now draws it almost always
    assert before[winner] > shown.count(winner) / len(shown)


def test_embedded_redis_runs_the_production_config(redis_client):
    """Tests, benches and the demo measure the Redis settings docker-compose deploys."""
    from infra.embedded import REDIS_CONF

    lines = [line.split(None, 1) for line in REDIS_CONF.read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    settings = {name: value.strip().strip('"') for name, value in lines}
    assert settings["maxmemory-policy"] == "volatile-lru"
    for name in ("maxmemory-policy", "appendfsync", "zset-max-listpack-entries"):
        assert redis_client.config_get(name)[name] == settings[name], name
    assert redis_client.config_get("appendonly")["appendonly"] == "yes"
