"""Applies batches of source messages to the live state in Redis, exactly once in effect.

For a batch of messages (topic, partition, offset, valid events) the worker, in one
optimistic transaction per batch:

1. ``WATCH``es the batch's per-partition offset watermarks and reads them; messages at or below
   their partition's watermark were applied before (redelivery after a crash or rebalance) and
   are skipped;
2. looks the remaining events' ids up in the seen-sets (one set per ``dedup_ttl_s`` bucket of
   event time, so a retried send — same id, same timestamp — meets its original); an id found
   is a producer duplicate and is dropped (as is a repeat inside the batch);
3. lets every live model learn the new events through a :class:`RedisStore` whose writes are
   *deferred* into the transaction, and queues the skeleton state (trending, histories, feed
   queue, counters);
4. ``MULTI`` … ``EXEC``: all state changes, the new watermarks and the dedup keys commit
   together or not at all. If another worker moved a watermark meanwhile (a rebalance), EXEC
   fails and the batch is recomputed from fresh reads.

Limits (documented in the README): one Redis primary — MULTI cannot span Redis Cluster slots;
Redis itself can lose up to ~1 s of writes on power loss with AOF ``everysec``, in which case
the watermark and the state it covers are lost together; the worker re-consumes those offsets
from Kafka at its next partition assignment (:mod:`stream.ingest`), as long as Kafka still
retains them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import redis

from infra.settings import Settings
from online_models.base import OnlineModel
from online_models.signals import SignalMapper
from online_models.store import queue_script
from online_models.trending import REBASE_AFTER_HALF_LIVES, TRENDING_WEIGHTS, batch_deltas
from schemas.events import ENGAGEMENT_TYPES, Interaction
from schemas.keys import RedisKeys

#: KEYS: trending zset, meta hash. ARGV: half_life, reference_ts, max_items, rebase_after,
#: then item, delta pairs. Rescales in place (ZUNIONSTORE with WEIGHTS) when the landmark is old.
TRENDING_LUA = """
local hl = tonumber(ARGV[1])
local ref = tonumber(ARGV[2])
local max_items = tonumber(ARGV[3])
local rebase_after = tonumber(ARGV[4])
local landmark = tonumber(redis.call('HGET', KEYS[2], 'landmark'))
if not landmark then
  landmark = ref
  redis.call('HSET', KEYS[2], 'landmark', tostring(landmark), 'half_life_s', ARGV[1])
end
local age = (ref - landmark) / hl
if age < -rebase_after then
  return tostring(landmark)  -- events this old weigh < 2^-64 of current ones: nothing to add
end
if age > rebase_after then
  redis.call('ZUNIONSTORE', KEYS[1], 1, KEYS[1], 'WEIGHTS', tostring(2 ^ (-age)))
  landmark = ref
  age = 0
  redis.call('HSET', KEYS[2], 'landmark', tostring(landmark))
end
local last = tonumber(redis.call('HGET', KEYS[2], 'last_ts'))
if (not last) or ref > last then
  redis.call('HSET', KEYS[2], 'last_ts', ARGV[2])
end
local factor = 2 ^ age
for i = 5, #ARGV, 2 do
  redis.call('ZINCRBY', KEYS[1], tonumber(ARGV[i + 1]) * factor, ARGV[i])
end
local size = redis.call('ZCARD', KEYS[1])
if size > max_items * 1.1 then
  redis.call('ZREMRANGEBYRANK', KEYS[1], 0, size - max_items - 1)
end
return tostring(landmark)
"""

#: KEYS: history lists. ARGV: max length, TTL, then per key its item count and items (oldest
#: first, so the newest ends up at the head).
HISTORY_LUA = """
local keep, ttl = tonumber(ARGV[1]) - 1, tonumber(ARGV[2])
local a = 3
for k = 1, #KEYS do
  local n = tonumber(ARGV[a])
  redis.call('LPUSH', KEYS[k], unpack(ARGV, a + 1, a + n))
  redis.call('LTRIM', KEYS[k], 0, keep)
  redis.call('EXPIRE', KEYS[k], ttl)
  a = a + n + 1
end
return 0
"""

_WEIGHT_OF = dict(TRENDING_WEIGHTS)


@dataclass
class SourceMessage:
    """One Kafka message after validation: its position and what it carried."""

    topic: str
    partition: int
    offset: int
    events: list[Interaction] = field(default_factory=list)
    invalid_events: int = 0  # dead-lettered parts (counted once, like the effects)


@dataclass
class ApplyResult:
    applied_events: int = 0
    redelivered_messages: int = 0
    duplicate_events: int = 0
    changed_item_vectors: list[str] = field(default_factory=list)


class LiveState:
    """Applies message batches to Redis (key contract: :mod:`schemas.keys`), exactly once.

    ``models`` are online models bound to :class:`online_models.store.RedisStore`s on the same
    server. Not thread-safe: one batch at a time per instance (the worker's single executor).
    """

    def __init__(self, settings: Settings, client, models: list[OnlineModel] = ()) -> None:
        self.settings = settings
        self.keys = RedisKeys(settings.key_prefix)
        self.client = client
        self.models = list(models)
        self.mapper = SignalMapper()
        self._trending = client.register_script(TRENDING_LUA)
        self._history = client.register_script(HISTORY_LUA)
        self._reserved = frozenset(settings.exploration_positions)

    def _queue(self, pipe, events: list[Interaction]) -> None:
        s, keys = self.settings, self.keys
        items = np.array([e.item_id for e in events], dtype=object)
        timestamps = np.fromiter((e.timestamp for e in events), float, len(events))
        weights = np.fromiter((_WEIGHT_OF[e.type] for e in events), float, len(events))
        reference = float(timestamps.max())
        uniq, deltas = batch_deltas(items, timestamps, weights, reference, s.trending_half_life_s)
        if len(uniq):
            args: list = [s.trending_half_life_s, reference, s.trending_max_items,
                          REBASE_AFTER_HALF_LIVES]
            for item, delta in zip(uniq.tolist(), deltas.tolist()):
                args += (item, delta)
            queue_script(pipe, self._trending, [keys.trending, keys.trending_meta], args)
        first_seen: dict[str, float] = {}
        for item, ts in zip(items.tolist(), timestamps.tolist()):
            if ts < first_seen.get(item, float("inf")):
                first_seen[item] = ts
        pipe.zadd(keys.item_first_seen, first_seen, nx=True)
        pipe.zremrangebyrank(keys.item_first_seen, 0, -(10 * s.trending_max_items) - 1)
        histories: dict[str, list[str]] = {}
        rewarded: dict[str, int] = {}  # engagements at exploration positions, per item
        for e in events:  # stream order: Kafka keeps each user's events in order
            if e.type != "impression":
                histories.setdefault(e.user_id, []).append(e.item_id)
            if (e.recommendation_id is not None and e.position in self._reserved
                    and e.type in ENGAGEMENT_TYPES):
                rewarded[e.item_id] = rewarded.get(e.item_id, 0) + 1
        if histories:
            args = [s.history_len, s.history_ttl_s]
            for seen in histories.values():
                args.append(len(seen))
                args += seen
            queue_script(pipe, self._history, [keys.user_history(u) for u in histories], args)
            pipe.sadd(keys.feed_queue, *histories)
        for item, clicks in rewarded.items():
            pipe.hincrby(keys.bandit_clicks, item, clicks)
        pipe.hincrby(keys.stats, "events_applied", len(events))
        pipe.hincrby(keys.stats, "batches", 1)

    def apply_sync(self, events: list[Interaction]) -> None:
        """Apply events without exactly-once bookkeeping (tools and tests; no models)."""
        if not events:
            return
        with self.client.pipeline(transaction=False) as pipe:
            self._queue(pipe, events)
            pipe.execute()

    def apply_messages(self, messages: list[SourceMessage]) -> ApplyResult:
        """Apply a batch exactly once in effect (see module doc); retries on WATCH conflicts.

        Raises the client's connection errors: the caller retries the whole batch later.
        """
        while True:
            try:
                return self._apply_once(messages)
            except redis.WatchError:
                continue

    def _apply_once(self, messages: list[SourceMessage]) -> ApplyResult:
        keys, result = self.keys, ApplyResult()
        partitions = sorted({(m.topic, m.partition) for m in messages})
        marks = [keys.watermark(t, p) for t, p in partitions]
        with self.client.pipeline(transaction=True) as pipe:
            pipe.watch(*marks)
            watermark = {tp: int(v) if v is not None else -1
                         for tp, v in zip(partitions, pipe.mget(marks))}
            fresh = [m for m in messages if m.offset > watermark[(m.topic, m.partition)]]
            result.redelivered_messages = len(messages) - len(fresh)
            candidates = [e for m in fresh for e in m.events]
            buckets: dict[int, list[str]] = {}
            for e in candidates:
                buckets.setdefault(int(e.timestamp // self.settings.dedup_ttl_s), []) \
                    .append(e.event_id)
            seen: set[str] = set()
            for bucket, ids in buckets.items():
                flags = pipe.smismember(keys.seen_events(bucket), ids)
                seen.update(i for i, flag in zip(ids, flags) if flag)
            events, batch_ids = [], set()
            for event in candidates:
                if event.event_id not in seen and event.event_id not in batch_ids:
                    events.append(event)
                    batch_ids.add(event.event_id)
            result.duplicate_events = len(candidates) - len(events)
            signals = self.mapper.map(events) if events else None
            pipe.multi()
            for model in self.models if signals is not None else ():
                with model.store.deferred(pipe):
                    report = model.learn(signals)
                result.changed_item_vectors += report.changed_item_vectors
            if events:
                self._queue(pipe, events)
                for bucket, ids in buckets.items():
                    new_ids = [i for i in ids if i in batch_ids]
                    if new_ids:
                        pipe.sadd(keys.seen_events(bucket), *new_ids)
                        pipe.expire(keys.seen_events(bucket), 2 * self.settings.dedup_ttl_s)
            newest: dict[tuple[str, int], int] = {}
            for m in fresh:
                tp = (m.topic, m.partition)
                newest[tp] = max(newest.get(tp, -1), m.offset)
            for (topic, partition), offset in newest.items():
                pipe.set(keys.watermark(topic, partition), offset)
            dead = sum(m.invalid_events for m in fresh)
            if dead:
                pipe.hincrby(keys.stats, "dlq_messages", sum(1 for m in fresh if m.invalid_events))
                pipe.hincrby(keys.stats, "dlq_events", dead)
            if result.redelivered_messages:
                pipe.hincrby(keys.stats, "skipped_redelivered", result.redelivered_messages)
            if result.duplicate_events:
                pipe.hincrby(keys.stats, "skipped_duplicates", result.duplicate_events)
            pipe.execute()
        result.applied_events = len(events)
        return result
