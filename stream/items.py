"""The items agent: item descriptions from the ``items`` topic (:mod:`schemas.items`) to the
front ends' item key and the content models' state; invalid messages go to the dead-letter
topic with their reasons, like invalid events.

A description is the item's whole state (an upsert keyed by item id, on a compacted topic):
applying one twice changes nothing and an older one never replaces a newer one, so redelivery
after a crash is harmless (at-least-once delivery, exactly-once effect). The content models
used here are their own instances, bound without TTLs (a catalogue must not expire with
inactivity); they share the Redis thread with the interaction pipeline, so the two never run
Redis work at the same time.
"""

from __future__ import annotations


import msgspec

from infra.redis_client import mget_any, mset_any, sync_redis
from online_models.base import OnlineModel
from state.redis_store import build_live_models
from schemas.items import ItemRecord, latest_per_item, split_items
from schemas.keys import RedisKeys
from stream import metrics
from stream.app import app, settings
from stream.ingest import (consume_batches, dead_letter, deliver_dead_letters, message_bytes,
                           on_redis_thread)
from stream.topics import items_topic

_models: list[OnlineModel] | None = None
_client = None


def content_models() -> list[OnlineModel]:
    """The live models that learn item descriptions (built once, without TTLs)."""
    global _models, _client
    if _models is None:
        _client = sync_redis(settings.redis_url)
        built = build_live_models(settings, _client)
        _models = [m for m in built.values()
                   if type(m).learn_items is not OnlineModel.learn_items]
    return _models


def apply_descriptions(client, keys: RedisKeys, models: list[OnlineModel],
                       records: list[ItemRecord]) -> int:
    """Store each item's newest description (never replacing a newer stored one) and let the
    models learn them; returns how many item keys changed."""
    latest = latest_per_item(records)
    if not latest:
        return 0
    items = list(latest)
    stored = mget_any(client, [keys.item_description(i) for i in items])
    newer = {}
    for item, raw in zip(items, stored):
        if raw is None or msgspec.json.decode(raw).get("timestamp", 0) <= latest[item].timestamp:
            newer[keys.item_description(item)] = msgspec.json.encode(latest[item])
    if newer:
        mset_any(client, newer)
    for model in models:
        model.learn_items(list(latest.values()))
    return len(newer)


async def process_item_batch(messages) -> tuple[int, int]:
    """Dead-letter the invalid messages (delivered before the batch can be acked), apply the
    valid descriptions; returns (descriptions, messages dead-lettered)."""
    records: list[ItemRecord] = []
    letters = []
    for event in messages:
        raw = message_bytes(event)
        good, bad = split_items(raw, settings.max_message_bytes)
        records += good
        if bad:
            letters.append(dead_letter(raw, bad, event.message, len(good)))
    await deliver_dead_letters(letters, count_in_redis=True)
    if records:
        models = content_models()
        await on_redis_thread("item descriptions", apply_descriptions, _client,
                              RedisKeys(settings.key_prefix), models, records)
    metrics.ITEMS_IN.inc(len(records))
    return len(records), len(letters)


@app.agent(items_topic)
async def ingest_items(stream) -> None:
    await consume_batches(stream, process_item_batch, "items")
