"""Every Redis key family is bounded: random-id floods through the exactly-once write path
(LiveState with the live models, as the worker runs them) on a private redis-server."""

import time

import pytest

from infra.embedded import EmbeddedRedis
from infra.redis_client import sync_redis
from infra.settings import Settings
from state.redis_store import build_on_redis
from schemas.events import Interaction
from schemas.keys import RedisKeys
from stream.state import LiveState, SourceMessage

#: Families without a TTL, each with a size bound of its own (docs/redis-keys.md).
FIXED = (":{trend}:", ":{items}:first_seen", ":{feedq}:dirty", ":{stats}:", ":{wm}:",
         ":{bandit}:")


def random_id_messages(n_events: int, per_message: int = 500, seed: int = 0):
    """Every event a new user, session and item, as an attacker (or a bug) would send."""
    now = time.time() - n_events
    events = [Interaction(event_id=f"e{seed}-{n}", user_id=f"u{seed}-{n}",
                          item_id=f"i{seed}-{n}", type="click", timestamp=now + n,
                          session_id=f"s{seed}-{n}", recommendation_id="r", position=3)
              for n in range(n_events)]
    return [SourceMessage("interactions", 0, n, events[start:start + per_message])
            for n, start in enumerate(range(0, n_events, per_message))]


@pytest.fixture
def private_redis():
    with EmbeddedRedis(appendonly=False) as server:
        yield server


def flood(settings: Settings, client, messages) -> LiveState:
    models = build_on_redis(settings.live_model_names, client, settings.key_prefix,
                            cache_local_rows=10_000, local_ttl_s=settings.user_state_ttl_s,
                            shared_ttl_s=settings.item_state_ttl_s)
    state = LiveState(settings, client, list(models.values()))
    for start in range(0, len(messages), 4):
        state.apply_messages(messages[start:start + 4])
    return state


def test_every_key_expires_or_belongs_to_a_bounded_family(private_redis):
    settings = Settings(redis_url=private_redis.url, key_prefix="kb", feed_queue_max=1000,
                        trending_max_items=500)
    client = sync_redis(private_redis.url)
    flood(settings, client, random_id_messages(20_000))
    keys = RedisKeys("kb")
    fixed, expiring = [], 0
    for key in client.scan_iter(count=1000):
        ttl = client.pttl(key)
        if ttl == -1:
            assert any(family in key.decode() for family in FIXED), f"{key!r} has no TTL"
            fixed.append(key.decode())
        else:
            assert ttl > 0, key
            expiring += 1
    assert expiring > 20_000  # the flood's state exists, all of it expiring
    assert len(fixed) <= 8, fixed  # trending z/meta, first_seen, feed queue, stats, watermark
    assert client.scard(keys.feed_queue) == 1000  # capped
    assert client.zcard(keys.trending) <= 550
    assert client.zcard(keys.item_first_seen) <= 10 * 500
    assert not client.exists(keys.bandit_clicks)  # engagements with items never shown
    assert int(client.hget(keys.stats, "events_applied")) == 20_000


def test_memory_stays_under_maxmemory_and_nothing_is_refused(private_redis):
    """200k random-id events into a Redis capped at 48 MB (volatile-lru, the production
    policy): the coldest expiring keys are evicted, no write is refused, every event counts
    once, watermarks survive and a user active at the end still has state."""
    settings = Settings(redis_url=private_redis.url, key_prefix="km", feed_queue_max=10_000)
    client = sync_redis(private_redis.url)
    limit = 48 * 2 ** 20
    client.config_set("maxmemory", limit)
    messages = random_id_messages(200_000)
    flood(settings, client, messages)
    info = client.info("memory")
    stats = client.info("stats")
    assert info["used_memory"] <= limit * 1.05
    assert stats["evicted_keys"] > 0  # the cap was reached and keys were evicted to hold it
    keys = RedisKeys("km")
    assert int(client.hget(keys.stats, "events_applied")) == 200_000
    assert int(client.get(keys.watermark("interactions", 0))) == len(messages) - 1
    last = messages[-1].events[-1]
    assert client.lrange(keys.user_history(last.user_id), 0, -1) == [last.item_id.encode()]
    print(f"\n200k random-id events: {info['used_memory'] / 2**20:.1f} MB used, "
          f"{client.dbsize():,} keys, {stats['evicted_keys']:,} evicted")
