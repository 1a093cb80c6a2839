"""Producer → Kafka → Faust worker → Redis → feed builder → HTTP, with malformed input mixed in."""

import time

import httpx
import msgspec
import pytest
from kafka import KafkaProducer

from infra.embedded import free_port
from online_models.trending import TRENDING_WEIGHTS, decayed
from schemas import dlq
from schemas.events import encode_event
from schemas.keys import RedisKeys
from stream.producer import InteractionProducer
from stream.simulator import MALFORMED_KINDS, UserSimulator, malformed_message
from tests.conftest import wait_for
from tests.integration.kafka_helpers import read_topic


def counters(client, keys):
    return {k.decode(): int(v) for k, v in client.hgetall(keys.stats).items()}


def test_every_valid_event_lands_and_every_malformed_one_is_dead_lettered(
        settings, redis_client, spawn):
    keys = RedisKeys(settings.key_prefix)
    worker = spawn(["worker", "--loglevel", "warn"], settings)
    events = list(UserSimulator(150, 400, seed=11).events(3000, time.time() - 3000))
    singles, enveloped = events[:100], events[100:]

    raw_producer = KafkaProducer(bootstrap_servers=settings.kafka_bootstrap)
    malformed = []
    with InteractionProducer(settings.kafka_bootstrap, settings.topic_interactions,
                             max_batch_events=200) as producer:
        for n, start in enumerate(range(0, len(enveloped), 100)):
            producer.send_many(enveloped[start:start + 100])
            for k in range(5):  # ~5 % of messages and events malformed
                message = malformed_message(MALFORMED_KINDS[(5 * n + k) % len(MALFORMED_KINDS)],
                                            5 * n + k, like=enveloped[start])
                malformed.append(message)
                raw_producer.send(settings.topic_interactions, value=message)
        producer.flush()
        assert producer.stats.events_sent == len(enveloped)
    for event in singles:  # one event per message, keyed by user like any plain producer
        raw_producer.send(settings.topic_interactions, key=event.user_id.encode(),
                          value=encode_event(event))
    raw_producer.flush()
    raw_producer.close()
    # valid halves of mixed envelopes: one click each on the event they were modelled on
    rescued_events = [enveloped[start] for n, start in enumerate(range(0, len(enveloped), 100))
                      for k in range(5)
                      if MALFORMED_KINDS[(5 * n + k) % len(MALFORMED_KINDS)] == "bad_envelope_event"]
    rescued = len(rescued_events)

    wait_for(lambda: counters(redis_client, keys).get("events_applied", 0) >= len(events) + rescued
             and counters(redis_client, keys).get("dlq_messages", 0) >= len(malformed),
             90, "worker to apply every event", proc=worker)
    stats = counters(redis_client, keys)
    assert stats["events_applied"] == len(events) + rescued  # nothing lost, nothing doubled
    assert stats["dlq_messages"] == len(malformed)

    # Redis reflects every valid event: histories and trending equal an oracle over the input.
    for user in {e.user_id for e in events}:
        mine = [e.item_id for e in events if e.user_id == user]
        stored = [x.decode() for x in redis_client.lrange(keys.user_history(user), 0, -1)]
        assert sorted(stored) == sorted(mine[::-1][:settings.history_len])
    meta = redis_client.hgetall(keys.trending_meta)
    now = float(meta[b"last_ts"])
    expected: dict[str, float] = {}
    for e in events:
        expected[e.item_id] = expected.get(e.item_id, 0.0) + TRENDING_WEIGHTS[e.type] * \
            0.5 ** ((now - e.timestamp) / settings.trending_half_life_s)
    for e in rescued_events:
        expected[e.item_id] += TRENDING_WEIGHTS["click"] * \
            0.5 ** ((now - e.timestamp) / settings.trending_half_life_s)
    for item, score in redis_client.zrange(keys.trending, 0, -1, withscores=True):
        got = decayed(score, float(meta[b"landmark"]), now, settings.trending_half_life_s)
        assert got == pytest.approx(expected[item.decode()], rel=1e-6, abs=1e-12)

    # Every malformed message is in the DLQ with its original bytes and a reason.
    records = [dlq.decode(r.value) for r in
               read_topic(settings.kafka_bootstrap, settings.topic_dlq, len(malformed))]
    assert len(records) == len(malformed)
    assert sorted(r.original for r in records) == sorted(malformed)
    assert all(r.reason and r.problems and r.source.topic == settings.topic_interactions
               for r in records)
    assert len({(r.source.partition, r.source.offset) for r in records}) == len(records)

    # Feeds are built for every active user and readable through Redis and HTTP.
    assert_feeds_built_and_served(spawn, settings, redis_client,
                                  sorted({e.user_id for e in events}))


def assert_feeds_built_and_served(spawn, settings, client, users: list[str], timeout_s=30.0,
                                  checked: int = 20) -> str:
    """Start a feed builder and an API: every user gets a feed, and the API serves the
    first ``checked`` users' feeds as stored. Returns the API's URL."""
    keys = RedisKeys(settings.key_prefix)
    spawn(["feeds"], settings)
    wait_for(lambda: all(client.exists(keys.feed(u)) for u in users), timeout_s, "feeds")
    port = free_port()
    api = spawn(["api", "--port", str(port), "--loglevel", "warning"], settings)
    url = f"http://127.0.0.1:{port}"
    wait_for(lambda: _get(f"{url}/readyz"), 30, "API ready", proc=api)
    for user in users[:checked]:
        stored = msgspec.json.decode(client.get(keys.feed(user)))
        served = httpx.get(f"{url}/v1/users/{user}/feed").json()
        assert served == stored and len(served["items"]) == settings.feed_size
    return url


def _get(url):
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False
