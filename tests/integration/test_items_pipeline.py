"""Item descriptions end to end (real broker, Redis and worker): the SDK publishes them, the
worker stores each item's newest and the content model learns them, invalid ones become dead
letters, and the serving pipeline recommends an item nobody touched, saying why."""

import time

import msgspec
from kafka import KafkaProducer

from schemas import dlq
from schemas.items import ItemRecord
from schemas.keys import RedisKeys
from serving.feeds import FeedBuilder
from serving.recommender import Request
from stream.producer import InteractionProducer, ItemPublisher
from stream.simulator import UserSimulator
from tests.conftest import wait_for
from tests.integration.kafka_helpers import read_topic


def test_descriptions_reach_redis_the_content_model_and_the_feed(settings, redis_client, spawn):
    s = settings.model_copy(update={"live_models": "session,cooc,content"})
    keys = RedisKeys(s.key_prefix)
    worker = spawn(["worker", "--loglevel", "warn"], s)
    now = time.time() - 600
    sim = UserSimulator(20, 60, seed=4)
    catalogue = sim.item_descriptions(now)
    liked = catalogue[0]
    fresh = ItemRecord(item_id="fresh", timestamp=now, categories=liked.categories,
                       title="Brand new")
    with ItemPublisher(s.kafka_bootstrap, s.topic_items) as items:
        items.send_many(catalogue + [fresh])
        items.flush()
        items.send_many([{**msgspec.to_builtins(fresh), "timestamp": now - 60,
                          "categories": ["stale"]}])  # older: must not replace it
        items.flush()
    raw = KafkaProducer(bootstrap_servers=s.kafka_bootstrap)
    raw.send(s.topic_items, key=b"bad", value=b'{"item_id": "bad", "timestamp": "soon"}')
    raw.flush()
    raw.close()
    peer = next(r for r in catalogue[1:] if set(r.categories) & set(liked.categories))
    with InteractionProducer(s.kafka_bootstrap, s.topic_interactions) as events:
        events.send_many([{"event_id": f"like-{n}", "user_id": user, "item_id": item,
                           "type": "like", "timestamp": now + n}
                          for n, (user, item) in enumerate([("fan", liked.item_id),
                                                            ("other", peer.item_id)])])
        events.flush()

    def described(item):
        stored = redis_client.get(keys.item_description(item))
        return msgspec.json.decode(stored) if stored else None

    wait_for(lambda: all(described(r.item_id) for r in catalogue + [fresh])
             and redis_client.hget(keys.stats, "events_applied") == b"2", 90,
             "descriptions and events to apply", proc=worker)
    [letter] = [dlq.decode(r.value) for r in read_topic(s.kafka_bootstrap, s.topic_dlq, 1)]
    assert letter.reason.startswith("timestamp:") and letter.source.topic == s.topic_items
    wait_for(lambda: redis_client.hget(keys.stats, "dlq_item_messages") == b"1", 10,
             "the dead letter counted in the stats front ends read", proc=worker)
    wait_for(lambda: described("fresh")["categories"] == liked.categories, 10,
             "the older description to be ignored", proc=worker)
    assert described("fresh")["categories"] == liked.categories

    builder = FeedBuilder(s, redis_client)
    [sources] = builder.recommender.candidates([Request("fan", (liked.item_id,))])
    content = {item: reason for item, _, reason in sources["content"]}
    assert "fresh" in content  # nobody touched it: only its description brings it
    assert content["fresh"].startswith("because you like ")
    shared = (set(peer.categories) & set(liked.categories)).pop()
    assert (peer.item_id, f"popular in {shared}") in [(i, why) for i, _, why in
                                                      sources["trending"]]
    assert worker.proc.poll() is None, worker.log()


def test_long_term_models_the_worker_runs_become_candidate_sources(settings, redis_client):
    from state.redis_store import build_on_redis
    from online_models.signals import SignalMapper
    from schemas.events import Interaction

    s = settings.model_copy(update={"live_models": "session,als,history"})
    likes = [Interaction(event_id=f"e{n}", user_id=f"u{n % 6}", item_id=f"i{(n * 7) % 11}",
                         type="like", timestamp=1.7e9 + n) for n in range(120)]
    for model in build_on_redis(s.live_model_names, redis_client, s.key_prefix).values():
        model.learn(SignalMapper().map(likes))  # as the worker's live state would
    builder = FeedBuilder(s, redis_client)
    assert sorted(builder.recommender.model_sources) == ["als", "history"]
    [sources] = builder.recommender.candidates([Request("u1", ("i0",))])
    assert sources["als"] and {why for _, _, why in sources["als"]} == {"for you"}
    assert sources["history"] and {why for _, _, why in sources["history"]} == {
        "from your favourites"}
    [feed] = builder.compute(["u1"], k=5)
    assert {item.reason for item in feed.items} & {"for you", "from your favourites"}
