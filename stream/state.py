"""Applies validated event batches to the live state in Redis: one round trip per batch.

Per batch: trending deltas (aggregated per item with numpy, applied by a Lua script that owns
the forward-decay landmark), each active user's recent-items history (LPUSH + LTRIM + EXPIRE),
the feed-refresh queue and the counters — all in one pipeline.

Delivery is at-least-once here: a batch redelivered after a crash is applied again.
"""

from __future__ import annotations

import numpy as np

from infra.settings import Settings
from online_models.trending import REBASE_AFTER_HALF_LIVES, TRENDING_WEIGHTS, batch_deltas
from schemas.events import Interaction
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

_WEIGHT_OF = dict(TRENDING_WEIGHTS)


class LiveState:
    """Writes batches of events into Redis under the key contract of :mod:`schemas.keys`."""

    def __init__(self, settings: Settings, client) -> None:
        self.settings = settings
        self.keys = RedisKeys(settings.key_prefix)
        self.client = client
        self._trending = client.register_script(TRENDING_LUA)

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
            # EVALSHA queued directly: the pipeline loads registered scripts on execute, and
            # this works for the sync and the asyncio pipeline alike.
            pipe.scripts.add(self._trending)
            pipe.evalsha(self._trending.sha, 2, keys.trending, keys.trending_meta, *args)
        histories: dict[str, list[str]] = {}
        for e in events:  # stream order: Kafka keeps each user's events in order
            if e.type != "impression":
                histories.setdefault(e.user_id, []).append(e.item_id)
        for user, seen in histories.items():
            key = keys.user_history(user)
            pipe.lpush(key, *seen)
            pipe.ltrim(key, 0, s.history_len - 1)
            pipe.expire(key, s.history_ttl_s)
        if histories:
            pipe.sadd(keys.feed_queue, *histories)
        pipe.hincrby(keys.stats, "events_applied", len(events))
        pipe.hincrby(keys.stats, "batches", 1)

    async def apply(self, events: list[Interaction]) -> None:
        """Apply a batch (asyncio client). Raises the client's errors; the caller retries."""
        if not events:
            return
        async with self.client.pipeline(transaction=False) as pipe:
            self._queue(pipe, events)
            await pipe.execute()

    def apply_sync(self, events: list[Interaction]) -> None:
        """Same as :meth:`apply` with a synchronous client (tools, tests)."""
        if not events:
            return
        with self.client.pipeline(transaction=False) as pipe:
            self._queue(pipe, events)
            pipe.execute()

    async def count_dlq(self, messages: int, events: int) -> None:
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.hincrby(self.keys.stats, "dlq_messages", messages)
            pipe.hincrby(self.keys.stats, "dlq_events", events)
            await pipe.execute()
