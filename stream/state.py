"""Applies batches of source messages to the live state in Redis, exactly once in effect.

For a batch of messages (topic, partition, offset, valid events) the worker:

1. *prepares* it (:meth:`LiveState.prepare`): reads the batch's per-partition offset
   watermarks — messages at or below their partition's watermark were applied before
   (redelivery after a crash or rebalance) and are skipped; looks the remaining events' ids up
   in the seen-sets (one set per ``dedup_ttl_s`` bucket of event time, so a retried send — same
   id, same timestamp — meets its original) and drops producer duplicates (and repeats inside
   the batch); lets every live model learn the new events through a :class:`RedisStore` whose
   writes are *recorded* (:class:`WriteBatch`), with the skeleton state (trending, histories,
   feed queue, counters), the dedup ids and the new watermarks;
2. *commits* it (:meth:`LiveState.commit`): ``WATCH``es the watermarks, checks they are still
   the values it was prepared against, and writes everything in one ``MULTI`` … ``EXEC`` —
   together or not at all. If another worker moved a watermark (a rebalance), nothing is
   written and the batch is prepared again from fresh reads.

The worker prepares batch N+1 while batch N commits (:mod:`stream.ingest`): Redis and the
worker's Python run at the same time. Batch N+1 is prepared as if N had committed — against
N's new watermarks, with N's event ids as seen, and on the partition-local rows N wrote
(cached in the worker); if N's commit fails, N+1 is discarded and both are prepared again. The
one thing N+1 reads from Redis that N changes is shared online-MF item vectors, which it may
read from before N's step (as concurrent workers do: the steps still add up).

Limits (documented in docs/reliability.md): one Redis primary — MULTI cannot span Redis
Cluster slots; Redis itself can lose up to ~1 s of writes on power loss with AOF
``everysec``, in which case the watermark and the state it covers are lost together; the
worker re-consumes those offsets from Kafka at its next partition assignment
(:mod:`stream.ingest`), as long as Kafka still retains them. A running worker notices such a
loss itself: a watermark below one it committed raises :class:`RedisLostWrites` (the worker
then restarts to resume from Redis's watermarks).

With ``STREAMREC_STATE_WRITER=owned`` the models' item-side writes become delta records
(docs/item-ownership.md): each source partition's events of a batch are learnt apart, and
their records go into that partition's outbox in the batch's transaction. On a Redis Cluster
each source partition's part commits on its own (:meth:`LiveState._compute_parts`).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass, field

import numpy as np

from infra.settings import Settings
from online_models.base import OnlineModel
from online_models.signals import SignalBatch, SignalMapper
from infra.redis_client import is_cluster, replica_wait, sync_redis
from state.ownership import DeltaRecorder, outbox_field
from state.redis_store import (CLUSTER_WRITE_SCRIPTS, Claim, WriteBatch, touched_ago_ms,
                               build_live_models, claim_partitions, queue_script,
                               replay_redo, require_single_on_cluster)
from state.write_back import UntimedKeySweeper, WriteBackStore, sweep_untimed_keys
from online_models.trending import REBASE_AFTER_HALF_LIVES, TrendingModel
from schemas.events import ENGAGEMENT_TYPES, Erasure, Interaction
from schemas.keys import ERASURE_MARKER_TTL_S, RedisKeys

log = logging.getLogger("streamrec.state")

#: KEYS: trending zset, meta hash. ARGV: half_life, reference_ts, max_items, rebase_after,
#: the commit's seq (0: none; else a seq at or below the meta's field ARGV[6] adds nothing),
#: that field, the deltas as little-endian doubles (:func:`doubles`), then the items.
#: Rescales in place (ZUNIONSTORE with WEIGHTS) when the landmark is old: the step of
#: :func:`online_models.trending.advance_landmark`, as ``TrendingModel._learn``.
TRENDING_LUA = """
local seq = tonumber(ARGV[5])
if seq > 0 then
  if tonumber(redis.call('HGET', KEYS[2], ARGV[6]) or '0') >= seq then return '' end
  redis.call('HSET', KEYS[2], ARGV[6], ARGV[5])
end
local hl = tonumber(ARGV[1])
local ref = tonumber(ARGV[2])
local max_items = tonumber(ARGV[3])
local rebase_after = tonumber(ARGV[4])
local landmark = tonumber(redis.call('HGET', KEYS[2], 'landmark'))
if not landmark then  -- landmarks are kept as sent (tostring would round to 14 digits)
  landmark = ref
  redis.call('HSET', KEYS[2], 'landmark', ARGV[2], 'half_life_s', ARGV[1])
end
local age = (ref - landmark) / hl
if age < -rebase_after then
  return tostring(landmark)  -- events this old weigh < 2^-64 of current ones: nothing to add
end
if age > rebase_after then
  redis.call('ZUNIONSTORE', KEYS[1], 1, KEYS[1], 'WEIGHTS', string.format('%.17g', 2 ^ (-age)))
  landmark = ref
  age = 0
  redis.call('HSET', KEYS[2], 'landmark', ARGV[2])
end
local last = tonumber(redis.call('HGET', KEYS[2], 'last_ts'))
if (not last) or ref > last then
  redis.call('HSET', KEYS[2], 'last_ts', ARGV[2])
end
local factor = 2 ^ age
local deltas = ARGV[7]
for i = 8, #ARGV do
  redis.call('ZINCRBY', KEYS[1], struct.unpack('<d', deltas, 8 * (i - 8) + 1) * factor, ARGV[i])
end
local size = redis.call('ZCARD', KEYS[1])
if size > max_items + math.max(1, math.floor(max_items / 10)) then  -- the stores' trim rule
  redis.call('ZREMRANGEBYRANK', KEYS[1], 0, size - max_items - 1)
end
return tostring(landmark)
"""

#: KEYS: first-seen zset. ARGV: how many to keep (the newest), the times as little-endian
#: doubles (:func:`doubles`), then the items: a time is set only where the item has none;
#: trimmed by the stores' rule (as ``TrendingModel``). Most items have one: they are looked
#: up 2,000 at a time (ZMSCORE) and only the others added (a call per item cost ~1 µs more).
FIRST_SEEN_LUA = """
local keep = tonumber(ARGV[1])
local times = ARGV[2]
for first = 3, #ARGV, 2000 do
  local last = math.min(first + 1999, #ARGV)
  local known = redis.call('ZMSCORE', KEYS[1], unpack(ARGV, first, last))
  local new = {}
  for i = first, last do
    if not known[i - first + 1] then
      new[#new + 1] = struct.unpack('<d', times, 8 * (i - 3) + 1)
      new[#new + 1] = ARGV[i]
    end
  end
  if #new > 0 then redis.call('ZADD', KEYS[1], 'NX', unpack(new)) end
end
local size = redis.call('ZCARD', KEYS[1])
if size > keep + math.max(1, math.floor(keep / 10)) then
  redis.call('ZREMRANGEBYRANK', KEYS[1], 0, size - keep - 1)
end
return 0
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

#: One user's history on a Redis Cluster. KEYS: the history list, its seq key. ARGV: the
#: commit's seq (at or below the stored one: adds nothing), max length, TTL, then the items
#: (oldest first).
HISTORY_GUARDED_LUA = """
if tonumber(redis.call('GET', KEYS[2]) or '0') >= tonumber(ARGV[1]) then return 0 end
redis.call('LPUSH', KEYS[1], unpack(ARGV, 4))
redis.call('LTRIM', KEYS[1], 0, tonumber(ARGV[2]) - 1)
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('SET', KEYS[2], ARGV[1], 'EX', ARGV[3])
return 0
"""

#: Counters on a Redis Cluster. KEYS: the counters hash, its seq key. ARGV: the commit's seq,
#: then field, amount pairs (added once per seq).
COUNTERS_GUARDED_LUA = """
if tonumber(redis.call('GET', KEYS[2]) or '0') >= tonumber(ARGV[1]) then return 0 end
for a = 2, #ARGV, 2 do redis.call('HINCRBY', KEYS[1], ARGV[a], ARGV[a + 1]) end
redis.call('SET', KEYS[2], ARGV[1])
return 0
"""

#: KEYS: the feed queue set. ARGV: its cap, then users. Past the cap, random members go (the
#: set must stay bounded when no feed builder drains it).
FEED_QUEUE_LUA = """
redis.call('SADD', KEYS[1], unpack(ARGV, 2))
local over = redis.call('SCARD', KEYS[1]) - tonumber(ARGV[1])
if over > 0 then redis.call('SPOP', KEYS[1], over) end
return 0
"""

#: KEYS: bandit shows, bandit clicks (and, with a seq, the clicks' seq key). ARGV: the
#: commit's seq (0: none), then item, count pairs. Only items that were shown at an
#: exploration position count (made-up ids in events cannot grow the hash).
CLICKS_LUA = """
local seq = tonumber(ARGV[1])
if seq > 0 then
  if tonumber(redis.call('GET', KEYS[3]) or '0') >= seq then return 0 end
  redis.call('SET', KEYS[3], ARGV[1])
end
for a = 2, #ARGV, 2 do
  if redis.call('HEXISTS', KEYS[1], ARGV[a]) == 1 then
    redis.call('HINCRBY', KEYS[2], ARGV[a], ARGV[a + 1])
  end
end
return 0
"""


def doubles(values) -> bytes:
    """Numbers as little-endian doubles, exact, for a script to read with ``struct.unpack``:
    one argument instead of one per number (packing a float argument costs ~400 ns)."""
    return np.asarray(values, dtype="<f8").tobytes()


#: KEYS: the lease. ARGV: holder id, lease in ms. Renews it if this holder has it.
RENEW_LEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

#: KEYS: the lease. ARGV: the holder found, this holder, lease in ms. Takes the lease over
#: from exactly that holder (not from one that took it meanwhile): what was left of its
#: expiry (ms), or false where another holds it now.
TAKE_OVER_LEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  local left = redis.call('PTTL', KEYS[1])
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return left
end
return false
"""
#: Ends a holder's name: the lease length it sets at each renewal, so that what is left of
#: its expiry dates its last renewal (a holder of an older version's name lacks it).
LEASE_MS_MARK = "/lease-ms="


def since_last_renewal_s(holder: bytes, left_ms: int) -> float | None:
    """How long ago ``holder`` last renewed its lease, on Redis's clock, from what was left of
    the lease (``left_ms``, PTTL); None where its name does not say its lease length."""
    _, mark, lease_ms = holder.rpartition(LEASE_MS_MARK.encode())
    ago_ms = touched_ago_ms(int(lease_ms), left_ms) if mark and lease_ms.isdigit() else None
    return None if ago_ms is None else ago_ms / 1000


class RedisLostWrites(RuntimeError):
    """A partition's watermark in Redis is below one this process committed: Redis lost
    writes under a running worker (a restart from an older snapshot or without persistence,
    a failover to a lagging replica, a flush), or an operator moved it back. The offsets in
    between must be consumed again: resume from Redis's watermarks."""


class WriterLeaseHeld(RuntimeError):
    """Another worker holds the single-writer lease (STREAMREC_STATE_WRITER=single)."""


class WriterLease:
    """The lease that makes one worker the only writer of model state in the ``single``
    layout: taken with SET NX PX, renewed by every commit and by :meth:`renew`, and checked
    (WATCHed) by every commit, so a worker that lost it writes nothing.

    ``member``: the worker's static group member id (``STREAMREC_KAFKA_GROUP_INSTANCE_ID``),
    part of the holder's name. A process restarted under that id takes the lease over from
    its predecessor at once instead of waiting for it to lapse: Kafka gives the partitions to
    one process per id (fencing the other), and the predecessor, were it still alive, writes
    nothing once its holder name is gone from the lease (every commit WATCHes it). On a
    Redis Cluster, where a commit's writes to other nodes follow its transaction, the
    process taking over waits until ``takeover_wait_s`` (the claim window, within which a
    commit sends them or never does) has passed since the predecessor last renewed the
    lease (every commit renews it in its transaction, after its check; the holder's name
    says its lease length, so what is left of the lease dates that renewal on Redis's
    clock); a lease that lapsed needs no wait (it lasts longer than the window after the
    holder's last commit)."""

    def __init__(self, client, key: str, lease_s: float, member: str = "",
                 takeover_wait_s: float = 0.0) -> None:
        self.client, self.key = client, key
        self.takeover_wait_s = takeover_wait_s
        self.lease_ms = int(lease_s * 1000)
        self._member_prefix = f"{member}/".encode() if member else None
        self.holder = (f"{member}/" if member else "") + (
            f"{uuid.uuid4().hex}{LEASE_MS_MARK}{self.lease_ms}")
        self.held = False
        self._held_once = False  # held once: a process of its member holding it now is newer
        self._renew = client.register_script(RENEW_LEASE_LUA)
        self._take_over = client.register_script(TAKE_OVER_LEASE_LUA)

    def acquire(self, wait_s: float) -> None:
        """Take the lease, waiting up to ``wait_s`` for a holder's to lapse (a crashed worker's
        lasts until it expires; a predecessor under this static member id's is taken over at
        once); raises :class:`WriterLeaseHeld` past that, or at once where this process held
        it and another of its static member holds it now (a successor: never taken back)."""
        deadline = time.monotonic() + wait_s
        while not self.client.set(self.key, self.holder, nx=True, px=self.lease_ms):
            found = self.client.get(self.key)
            if found == self.holder.encode():
                break
            same_member = bool(self._member_prefix and found
                               and found.startswith(self._member_prefix))
            if same_member and self._held_once:
                raise WriterLeaseHeld(
                    f"a newer process of this static group member ({found.decode()}) took the "
                    f"single-writer lease {self.key} over: this one was replaced (frozen past "
                    f"the session timeout, or two processes run with one "
                    f"STREAMREC_KAFKA_GROUP_INSTANCE_ID) and writes nothing more")
            left_ms = (self._take_over(keys=[self.key], args=[found, self.holder,
                                                              self.lease_ms])
                       if same_member else None)
            if left_ms is not None:
                self._wait_out_predecessor(found, left_ms)
                break
            if time.monotonic() > deadline:
                raise WriterLeaseHeld(
                    f"another worker ({self.client.get(self.key)!r}) holds the single-writer "
                    f"lease {self.key}: with STREAMREC_STATE_WRITER=single run one worker "
                    f"(use shared for a worker group)")
            time.sleep(0.2)
        self.held = self._held_once = True

    def _wait_out_predecessor(self, predecessor: bytes, left_ms: int) -> None:
        """After a take-over: wait until the claim window has passed since ``predecessor``
        last renewed the lease (the whole window where its name does not date that)."""
        since = since_last_renewal_s(predecessor, left_ms)
        wait_s = (self.takeover_wait_s if since is None
                  else max(0.0, self.takeover_wait_s - since))
        when = "" if since is None else f" (it last renewed it {since:.3f} s ago)"
        log.warning("took the single-writer lease over from %s, an earlier process of this "
                    "static group member%s%s", predecessor.decode(), when,
                    f": waiting {wait_s:.3f} s before writing (it may still be sending a "
                    f"commit)" if wait_s else (": no wait" if self.takeover_wait_s else ""))
        time.sleep(wait_s)

    def renew(self) -> bool:
        """Extend the lease if this worker holds it; False (and not held) if it was lost."""
        self.held = bool(self._renew(keys=[self.key], args=[self.holder, self.lease_ms]))
        return self.held


@dataclass
class SourceMessage:
    """One Kafka message after validation: its position and what it carried."""

    topic: str
    partition: int
    offset: int
    events: list[Interaction] = field(default_factory=list)
    invalid_events: int = 0  # dead-lettered parts (counted once, like the effects)
    produced_at: float | None = None  # the record's Kafka timestamp, unix seconds
    erasure: Erasure | None = None  # an erasure request (the message carries no events)


@dataclass
class ApplyResult:
    applied_events: int = 0
    redelivered_messages: int = 0
    duplicate_events: int = 0
    changed_item_vectors: list[str] = field(default_factory=list)
    #: Kafka timestamps of the messages whose events this batch applied, and when its commit
    #: finished (unix seconds): how old state changes are when they reach Redis
    produced_at: list[float] = field(default_factory=list)
    committed_at: float | None = None
    #: owned layout: the source partitions whose outbox this batch wrote item deltas to
    outboxes: list[tuple[str, int]] = field(default_factory=list)


@dataclass(eq=False)
class PreparedBatch:
    """A batch read (:meth:`LiveState.read`) and computed, not yet committed."""

    expected: dict[tuple[str, int], int]  # watermark per partition it was prepared against
    fresh: list[SourceMessage]  # messages above their watermark
    events: list[Interaction]  # their events, duplicates dropped
    signals: SignalBatch | None
    event_ids: set[str]  # the events it applies (in-flight duplicates of later batches)
    result: ApplyResult
    writes: WriteBatch = field(default_factory=WriteBatch)
    new_marks: dict[tuple[str, int], int] = field(default_factory=dict)
    seq: int = 0  # the commit's number on a Redis Cluster (0: one server, not numbered)
    #: each event's source partition (index into ``partitions``): the owned layout learns
    #: each partition's events apart
    partitions: list[tuple[str, int]] = field(default_factory=list)
    event_partitions: np.ndarray | None = None
    #: messages at or below their watermark, per partition
    redelivered: dict[tuple[str, int], int] = field(default_factory=dict)
    #: owned layout on a Redis Cluster: (source partition, its writes, its seq), a commit each
    parts: list[tuple[tuple[str, int], WriteBatch, int]] = field(default_factory=list)


class LiveState:
    """Applies message batches to Redis (key contract: :mod:`schemas.keys`), exactly once.

    ``models`` are online models bound to :class:`state.redis_store.RedisStore`s on the same
    server. Not thread-safe: one batch at a time per instance (the worker's single executor).
    """

    def __init__(self, settings: Settings, client, models: list[OnlineModel] = ()) -> None:
        self.settings = settings
        self.keys = RedisKeys(settings.key_prefix)
        self.client = client
        self.models = list(models)
        #: owned layout: the item-side writes the models record (docs/item-ownership.md)
        self.deltas = next((model.store.deltas for model in self.models
                            if isinstance(model.store, DeltaRecorder)), None)
        self._new_epoch_pending = self.deltas is not None  # a starting worker makes one
        self.mapper = SignalMapper()
        self.trending = TrendingModel(settings.trending_half_life_s, settings.trending_max_items)
        self._trending = client.register_script(TRENDING_LUA)
        self._first_seen = client.register_script(FIRST_SEEN_LUA)
        self._history = client.register_script(HISTORY_LUA)
        self._feed_queue = client.register_script(FEED_QUEUE_LUA)
        self._clicks = client.register_script(CLICKS_LUA)
        self._reserved = frozenset(settings.exploration_positions)
        self._uncommitted: list[PreparedBatch] = []  # prepared, oldest first
        require_single_on_cluster(client, settings.state_writer)
        self.cluster = is_cluster(client)
        #: commits done once replicas acknowledged them (STREAMREC_REDIS_WAIT_REPLICAS)
        self.replica_wait = replica_wait(settings)
        self.lease = (WriterLease(client, self.keys.state_writer, settings.state_writer_lease_s,
                                  member=settings.kafka_group_instance_id,
                                  takeover_wait_s=settings.cluster_claim_window_s
                                  if self.cluster else 0.0)
                      if settings.state_writer == "single" else None)
        #: owned layout on a Redis Cluster: each source partition's part of a batch commits
        #: on its own, through a redo record and a seq of that partition
        self.parted = self.cluster and self.deltas is not None
        self._source_seqs: dict[tuple[str, int], int] = {}  # the last seq given, per source
        #: parted: this process's name in the source partitions' writer keys it claimed
        self.writer_id = uuid.uuid4().hex.encode()
        self._sources_redone: set[tuple[str, int]] = set()  # redo applied since abandoning
        if self.cluster:  # commits go through the redo record (module doc)
            self._history_guarded = client.register_script(HISTORY_GUARDED_LUA)
            self._counters_guarded = client.register_script(COUNTERS_GUARDED_LUA)
            self._scripts = [*(script.script for script in (
                self._trending, self._first_seen, self._history_guarded, self._counters_guarded,
                self._feed_queue, self._clicks)), *CLUSTER_WRITE_SCRIPTS]
            for script in self._scripts:  # on every primary (the redo record names them)
                client.script_load(script)
        self._committed_marks: dict[tuple[str, int], int] = {}  # the highest this committed
        self._committed_seq = 0  # the last commit's number (cluster: the redo record's)
        self._redo_pending = self.cluster and not self.parted  # apply it before the next batch
        self._untimed_keys_pending = False  # single writer: sweep once it holds the lease
        #: gives the keys a predecessor wrote without TTLs theirs (one sweep at a time)
        self.expiry_sweeper = UntimedKeySweeper()

    @classmethod
    def for_worker(cls, settings: Settings) -> "LiveState":
        """The stream worker's state: its live models (``settings``: names, options, TTLs,
        layout) on its own Redis connection, as their writer."""
        client = sync_redis(settings.redis_url)
        models = build_live_models(settings, client, writer=True)
        return cls(settings, client, list(models.values()))

    def _queue(self, pipe, events: list[Interaction], signals: SignalBatch,
               seq: int = 0, source: tuple[str, int] | None = None) -> None:
        """Queue the events' skeleton writes (trending and first seen: the
        :class:`TrendingModel`'s step; histories, feed queue, clicks). ``seq`` > 0 (a cluster
        commit): every write that adds is guarded by it, numbered per ``source`` partition
        where it is given (the owned layout's parts), else by the one writer's."""
        s, keys, trending = self.settings, self.keys, self.trending
        step = trending.step(signals)
        if len(step.items):
            queue_script(pipe, self._trending, [keys.trending, keys.trending_meta],
                         [trending.half_life_s, step.reference, trending.max_items,
                          REBASE_AFTER_HALF_LIVES, seq,
                          "seq" if source is None else "seq:{}:{}".format(*source),
                          doubles(step.deltas), *step.items.tolist()])
        queue_script(pipe, self._first_seen, [keys.item_first_seen],
                     [trending.first_seen_kept, doubles(list(step.first_seen.values())),
                      *step.first_seen])
        histories: dict[str, list[str]] = {}
        rewarded: dict[str, int] = {}  # engagements at exploration positions, per item
        for e in events:  # stream order: Kafka keeps each user's events in order
            if e.type != "impression":
                histories.setdefault(e.user_id, []).append(e.item_id)
            if (e.recommendation_id is not None and e.position in self._reserved
                    and e.type in ENGAGEMENT_TYPES):
                rewarded[e.item_id] = rewarded.get(e.item_id, 0) + 1
        if histories:
            self._queue_histories(pipe, histories, seq)
            queue_script(pipe, self._feed_queue, [keys.feed_queue],
                         [s.feed_queue_max, *histories])
        if rewarded:
            seq_key = keys.bandit_seq if source is None else keys.bandit_seq_of(*source)
            queue_script(pipe, self._clicks, [keys.bandit_shows, keys.bandit_clicks,
                                              *([seq_key] if seq else [])],
                         [seq, *(x for pair in rewarded.items() for x in pair)])

    def _queue_histories(self, pipe, histories: dict[str, list[str]], seq: int) -> None:
        """One script call for every user on one server; on a cluster (``seq`` > 0) one
        guarded call per user, as each user's history has a slot of its own."""
        s, keys = self.settings, self.keys
        if seq:
            for user, seen in histories.items():
                queue_script(pipe, self._history_guarded,
                             [keys.user_history(user), keys.user_history_seq(user)],
                             [seq, s.history_len, s.history_ttl_s, *seen])
            return
        args = [s.history_len, s.history_ttl_s]
        for seen in histories.values():
            args.append(len(seen))
            args += seen
        queue_script(pipe, self._history, [keys.user_history(u) for u in histories], args)

    def _count(self, pipe, counts: dict[str, int], seq: int = 0,
               source: tuple[str, int] | None = None) -> None:
        """Add to the counters (guarded by ``seq`` > 0 on a cluster: :meth:`_queue`)."""
        counts = {name: n for name, n in counts.items() if n}
        if seq:
            seq_key = self.keys.stats_seq if source is None else self.keys.stats_seq_of(*source)
            queue_script(pipe, self._counters_guarded, [self.keys.stats, seq_key],
                         [seq, *(x for pair in counts.items() for x in pair)])
            return
        for name, n in counts.items():
            pipe.hincrby(self.keys.stats, name, n)

    def apply_sync(self, events: list[Interaction]) -> None:
        """Apply events without exactly-once bookkeeping (tools and tests; no models)."""
        if not events:
            return
        with self.client.pipeline(transaction=False) as pipe:
            self._queue(pipe, events, self.mapper.map(events))
            self._count(pipe, {"events_applied": len(events), "batches": 1})
            pipe.execute()

    def apply_messages(self, messages: list[SourceMessage]) -> ApplyResult:
        """Apply a batch exactly once in effect (see module doc): :meth:`prepare` then
        :meth:`commit`, again from fresh reads after a conflict.

        Raises the client's connection errors: the caller retries the whole batch later.
        """
        while True:
            try:
                result = self.commit(self.prepare(messages))
            except BaseException:
                self.abandon_uncommitted()  # the commit may not have happened
                raise
            if result is not None:
                return result
            self.abandon_uncommitted()  # another worker moved on: read what it wrote

    def abandon_uncommitted(self) -> None:
        """Forget prepared batches not committed and the models' cached partition-local state
        (both are read again from Redis). Call with no prepare or commit running."""
        self._uncommitted.clear()
        self._redo_pending = self.cluster and not self.parted  # a commit may have stopped half
        self._sources_redone.clear()  # applied (parted: each source partition's record)
        for model in self.models:
            model.store.forget_cached()

    def _apply_redo(self) -> None:
        """Cluster: apply the last commit's redo record again (every write in it is an
        overwrite or guarded by its seq, so what was applied already stays as it is). Later
        commits are numbered past it and past the clock in ms, so the numbers keep growing
        even if the record was lost (else the guards would skip every write)."""
        checked = time.monotonic()
        if self.lease is not None and not self.lease.renew():
            raise WriterLeaseHeld(f"the single-writer lease {self.lease.key} was lost before "
                                  f"its redo record was applied again")
        self._committed_seq, _ = self._replay_redo(self.keys.redo, checked=checked)
        self._redo_pending = False

    def claim_sources(self, partitions: list[tuple[str, int]]) -> None:
        """Parted commits: make this process the writer of the source ``partitions`` the
        group just assigned it (their writer keys). Every part's commit checks the key: a
        process evicted without knowing writes nothing of them after this
        (:class:`state.redis_store.PartitionClaimed`)."""
        if self.parted and partitions:
            claim_partitions(self.client, [self.keys.source_writer(*source)
                                           for source in partitions], self.writer_id,
                             wait_s=self.settings.cluster_claim_window_s)

    def source_claim(self, source: tuple[str, int]) -> Claim:
        """This process's claim of the source partition ``source`` (parted commits)."""
        return Claim(self.keys.source_writer(*source), self.writer_id,
                     f"{source[0]}[{source[1]}]")

    def _apply_source_redo(self, source: tuple[str, int]) -> None:
        """:meth:`_apply_redo` of one source partition's record (the parted commits), before
        this process's first commit of the partition since it last abandoned its state
        (claiming the partition if no process has: a worker claims at its assignment). The
        user-side keys the record writes without TTLs get their tables' TTLs: the writer that
        wrote the record may be gone, and this one does not track them (it clears the TTL
        where it writes one again); the rebalance's sweep may have run before this."""
        self._source_seqs[source], commands = self._replay_redo(
            self.keys.source_redo(*source), self.source_claim(source))
        self._sources_redone.add(source)
        written = [name for command in commands if command[0] == "MSET"
                   for name in command[1::2]]
        if written:
            sweep_untimed_keys(self.user_side_stores, among=written)

    def _replay_redo(self, key: str, claim: Claim | None = None,
                     checked: float | None = None) -> tuple[int, list[tuple]]:
        """Apply the redo record at ``key`` again, as the writer (``claim``'s holder, or the
        lease's, checked at ``checked``: :func:`state.redis_store.replay_redo`); the seq to
        number on from and the record's commands."""
        record, commands = replay_redo(self.client, key, self._scripts,
                                       self.settings.cluster_claim_window_s, claim, checked,
                                       self.replica_wait)
        return max(int(record.get(b"seq", 0)), int(time.time() * 1000)), commands

    @property
    def user_side_stores(self) -> list[WriteBackStore]:
        """The owned layout's stores of partition-local (user-side) state, this worker's."""
        return [model.store.local for model in self.models
                if isinstance(model.store, DeltaRecorder)]

    def prepare_to_write(self, partitions: list[tuple[str, int]]) -> None:
        """Make this process the writer of ``partitions`` (source topic, partition): hold the
        single-writer lease (taken over: cached state read again), complete the last commit
        a crash cut half-way on a Redis Cluster (its redo record: the one writer's, or, in
        the owned layout, each of ``partitions``' own), give a predecessor's keys their TTLs,
        start a new epoch where one is due. Each batch's read runs it for its partitions; so
        do the rebalance (the one writer's record: fenced by its lease) and, for the owned
        layout's per-partition records, a timer once the partition has been idle here a
        while (:func:`stream.ingest.complete_idle_partitions`): a partition with nothing
        more to consume is then whole too."""
        if (self.lease is not None and self.lease.held and self._redo_pending
                and not self._uncommitted):
            self.lease.renew()  # a redo record is applied as the holder: lapsed? taken again
        if self.lease is not None and not self.lease.held:
            self.lease.acquire(wait_s=2 * self.settings.state_writer_lease_s)
            for model in self.models:  # another writer may have written since we held it
                if isinstance(model.store, WriteBackStore):
                    model.store.take_over()
                else:
                    model.store.forget_cached()
            self._redo_pending = self.cluster
            self._untimed_keys_pending = True
        if self._redo_pending and not self._uncommitted:
            self._apply_redo()
        if self._untimed_keys_pending and not self._redo_pending:  # redo writes have no TTL
            self._untimed_keys_pending = False
            self.expiry_sweeper.request([model.store for model in self.models
                                         if isinstance(model.store, WriteBackStore)])
        if self._new_epoch_pending:
            self.new_epoch()
        for source in partitions if self.parted else ():
            if source not in self._sources_redone:  # no batch in flight holds it
                self._apply_source_redo(source)

    def prepare(self, messages: list[SourceMessage]) -> PreparedBatch:
        """Read what the batch needs and compute its state change (recorded, not written)."""
        return self.compute(self.read(messages))

    def read(self, messages: list[SourceMessage]) -> PreparedBatch:
        """Prepare, first half: the Redis reads (watermarks, seen ids, what the models
        prefetch) and the events to apply.

        May run while earlier prepared batches are not committed yet: it builds on them (their
        watermarks and event ids) as if they were.
        """
        keys = self.keys
        partitions = sorted({(m.topic, m.partition) for m in messages})
        self.prepare_to_write(partitions)
        earlier_batches = list(self._uncommitted)  # before reading: one may commit meanwhile
        marks = [keys.watermark(t, p) for t, p in partitions]
        expected = {tp: int(v) if v is not None else -1
                    for tp, v in zip(partitions, self.client.mget(marks))}
        behind = [f"{t}[{p}]: watermark {expected[(t, p)]}, this worker committed "
                  f"{self._committed_marks[(t, p)]}" for t, p in partitions
                  if expected[(t, p)] < self._committed_marks.get((t, p), -1)]
        if behind:
            if self.deltas is not None:  # records sent before the loss: owners drop them
                self.new_epoch()
            raise RedisLostWrites("Redis's progress went back under a running worker ("
                                  + "; ".join(behind) + ")")
        seen: set[str] = set()
        for earlier in earlier_batches:
            seen |= earlier.event_ids
            for tp, mark in earlier.new_marks.items():
                if tp in expected:
                    expected[tp] = mark
        fresh = [m for m in messages if m.offset > expected[(m.topic, m.partition)]]
        redelivered = Counter((m.topic, m.partition) for m in messages
                              if m.offset <= expected[(m.topic, m.partition)])
        candidates = [e for m in fresh for e in m.events]
        buckets = self._buckets(candidates)
        if buckets:
            with self.client.pipeline(transaction=False) as pipe:
                for bucket, ids in buckets.items():
                    pipe.smismember(keys.seen_events(bucket), ids)
                for ids, flags in zip(buckets.values(), pipe.execute()):
                    seen.update(i for i, flag in zip(ids, flags) if flag)
        events, batch_ids, kept = [], set(), []  # kept: how many of each message's events
        for message in fresh:
            before = len(events)
            for event in message.events:
                if event.event_id not in seen and event.event_id not in batch_ids:
                    events.append(event)
                    batch_ids.add(event.event_id)
            kept.append(len(events) - before)
        fresh_partitions = list(dict.fromkeys((m.topic, m.partition) for m in fresh))
        number = {tp: n for n, tp in enumerate(fresh_partitions)}
        event_partitions = np.repeat(
            np.array([number[(m.topic, m.partition)] for m in fresh], np.int64), kept)
        result = ApplyResult(applied_events=len(events),
                             redelivered_messages=sum(redelivered.values()),
                             duplicate_events=len(candidates) - len(events),
                             produced_at=[m.produced_at for m in fresh
                                          if m.events and m.produced_at is not None])
        signals = self.mapper.map(events) if events else None
        for model in self.models if signals is not None else ():
            model.prefetch(signals)
        return PreparedBatch(expected, fresh, events, signals, batch_ids, result,
                             partitions=fresh_partitions, event_partitions=event_partitions,
                             redelivered=redelivered)

    def compute(self, prepared: PreparedBatch) -> PreparedBatch:
        """Prepare, second half: the models learn and every write is recorded. Reads Redis
        only for partition-local state not cached (and what was not prefetched)."""
        keys, result, writes = self.keys, prepared.result, prepared.writes
        for m in prepared.fresh:
            tp = (m.topic, m.partition)
            prepared.new_marks[tp] = max(prepared.new_marks.get(tp, -1), m.offset)
        if self.parted:
            self._compute_parts(prepared)
            self._uncommitted.append(prepared)
            return prepared
        if self.cluster:  # numbered after the batches still in flight
            prepared.seq = (self._uncommitted[-1].seq if self._uncommitted
                            else self._committed_seq) + 1
        self._erase(writes, prepared.fresh, result)
        if prepared.events:
            with self._batch_reads():
                for source, _, signals in self._learning_groups(prepared):
                    self._learn(writes, signals, result)
                    if source is not None:
                        self._queue_records(writes, source, prepared.new_marks[source], result)
            self._queue(writes, prepared.events, prepared.signals, prepared.seq)
            self._queue_seen(writes, prepared.events)
        for (topic, partition), offset in prepared.new_marks.items():
            writes.set(keys.watermark(topic, partition), offset)
        counts = self._counts(prepared.fresh, len(prepared.events),
                              result.redelivered_messages)
        if any(counts.values()):
            self._count(writes, counts, prepared.seq)
        if self.lease is not None:
            writes.pexpire(self.lease.key, self.lease.lease_ms)  # renewed (the commit checks it)
        if not self.cluster:
            writes.packed()  # here, so the committing thread only sends bytes
        self._uncommitted.append(prepared)
        return prepared

    def _erase(self, writes: WriteBatch, messages: list[SourceMessage],
               result: ApplyResult) -> None:
        """The erasure requests among ``messages``, before the chunk's events (no chunk
        holds events of an erasure's user or sessions before it:
        :func:`stream.pipeline.event_chunks`): every model forgets the users' and sessions'
        keys (their ids leave item-side rows too: in the owned layout through item-delta
        records, one per source partition, tagged with its first offset in the chunk: its
        learnt records that follow carry its last), and the users' histories, feeds and
        places in the feed queue go; all recorded into ``writes`` (docs/events.md#erasure)."""
        by_source: dict[tuple[str, int], list[Erasure]] = {}
        for m in messages:
            if m.erasure is not None:
                by_source.setdefault((m.topic, m.partition), []).append(m.erasure)
        if not by_source:
            return
        for source, erasures in by_source.items():
            for erasure in erasures:
                for model in self.models:
                    with model.store.deferred(writes):
                        model.forget(erasure.keys)
            if self.deltas is not None:  # tagged below the source's learnt records' tag
                first = min(m.offset for m in messages if (m.topic, m.partition) == source)
                self._queue_records(writes, source, first, result)
        erasures = [erasure for erasures in by_source.values() for erasure in erasures]
        users = list(dict.fromkeys(erasure.user_id for erasure in erasures))
        for user in users:  # one slot: the user's hash tag
            writes.delete(self.keys.user_history(user), self.keys.feed(user),
                          self.keys.user_history_seq(user))  # (a guard no replay needs now)
            writes.set(self.keys.erased(user), uuid.uuid4().hex, px=ERASURE_MARKER_TTL_S * 1000)
        writes.srem(self.keys.feed_queue, *users)
        for erasure in erasures:  # the request's id, not the user's: logs outlive it
            log.info("erasure request %r applied (%d named sessions)", erasure.request_id,
                     len(erasure.session_ids))

    def _learn(self, writes: WriteBatch, signals: SignalBatch, result: ApplyResult) -> None:
        """Every model learns ``signals``, its writes recorded into ``writes``."""
        for model in self.models:
            with model.store.deferred(writes):
                report = model.learn(signals)
            result.changed_item_vectors += report.changed_item_vectors

    def _buckets(self, events: list[Interaction]) -> dict[int, list[str]]:
        """Dedup bucket → the ids of ``events`` in it."""
        buckets: dict[int, list[str]] = {}
        for e in events:
            buckets.setdefault(int(e.timestamp // self.settings.dedup_ttl_s), []) \
                .append(e.event_id)
        return buckets

    def _queue_seen(self, writes: WriteBatch, applied: list[Interaction]) -> None:
        """Add the ``applied`` events' ids to their dedup buckets' seen-sets."""
        for bucket, ids in self._buckets(applied).items():
            writes.sadd(self.keys.seen_events(bucket), *ids)
            writes.expire(self.keys.seen_events(bucket), 2 * self.settings.dedup_ttl_s)

    @staticmethod
    def _counts(fresh: list[SourceMessage], applied: int, redelivered: int) -> dict[str, int]:
        """The counters a batch (or a part of one) adds: its fresh messages, the events it
        applied of theirs, the messages it skipped as redelivered."""
        return {"events_applied": applied, "batches": int(bool(applied)),
                "erasures": sum(1 for m in fresh if m.erasure is not None),
                "dlq_messages": sum(1 for m in fresh if m.invalid_events),
                "dlq_events": sum(m.invalid_events for m in fresh),
                "skipped_redelivered": redelivered,
                "skipped_duplicates": sum(len(m.events) for m in fresh) - applied}

    def _compute_parts(self, prepared: PreparedBatch) -> None:
        """:meth:`compute` of the owned layout on a Redis Cluster: each source partition's
        part of the batch (its events learnt, its item-delta records in its outbox, its
        skeleton writes, seen ids, watermark and counters) is a commit of its own, numbered
        by that partition's seq (docs/item-ownership.md). A batch's parts commit in turn;
        one that finds its watermark moved voids the batch, and the parts already committed
        are then skipped as redelivered."""
        result = prepared.result
        groups = {source: (mine, signals) for source, mine, signals
                  in (self._learning_groups(prepared) if prepared.events else ())}
        with self._batch_reads():
            for source in dict.fromkeys([*prepared.new_marks, *prepared.redelivered]):
                writes = WriteBatch()
                seq = self._source_seqs[source] = self._source_seqs[source] + 1
                events: list[Interaction] = []
                self._erase(writes, [m for m in prepared.fresh
                                     if (m.topic, m.partition) == source], result)
                if source in groups:
                    mine, signals = groups[source]
                    events = (prepared.events if mine is None else
                              [e for e, here in zip(prepared.events, mine.tolist()) if here])
                    self._learn(writes, signals, result)
                    self._queue_records(writes, source, prepared.new_marks[source], result)
                    self._queue(writes, events, signals, seq, source)
                    self._queue_seen(writes, events)
                if source in prepared.new_marks:
                    writes.set(self.keys.watermark(*source), prepared.new_marks[source])
                counts = self._counts([m for m in prepared.fresh
                                       if (m.topic, m.partition) == source], len(events),
                                      prepared.redelivered.get(source, 0))
                if any(counts.values()):
                    self._count(writes, counts, seq, source)
                prepared.parts.append((source, writes, seq))

    def _batch_reads(self) -> ExitStack:
        """The owned layout learns a batch's source partitions apart: within this scope,
        their models share the batch's reads of shared item state (each read once)."""
        scope = ExitStack()
        for model in self.models if self.deltas is not None else ():
            scope.enter_context(model.store.shared_reads())
        return scope

    def _learning_groups(self, prepared: PreparedBatch):
        """(source partition, the mask of its events (None: all), their signals) to learn in
        turn: the owned layout learns each source partition's events apart (in stream order),
        so that each part's item deltas carry that partition's offsets; other layouts learn
        the batch at once (source None)."""
        if self.deltas is None:
            yield None, None, prepared.signals
            return
        if len(prepared.partitions) == 1:
            yield prepared.partitions[0], None, prepared.signals
            return
        for number, source in enumerate(prepared.partitions):
            mask = prepared.event_partitions == number
            if mask.any():
                yield source, mask, prepared.signals.select(mask)

    def _queue_records(self, writes: WriteBatch, source: tuple[str, int], offset: int,
                       result: ApplyResult) -> None:
        """Owned layout: the item-delta records just learnt from ``source``'s events, tagged
        with its last offset in the batch, into its outbox in the batch's transaction (the
        relay sends each outbox in offset order: :mod:`stream.owners`)."""
        topic, partition = source
        records = self.deltas.take_records({f"{topic}:{partition}": offset})
        if records:
            writes.hset(self.keys.outbox(topic, partition),
                        {outbox_field(offset, owner): record
                         for owner, record in records.items()})
            result.outboxes.append(source)

    def new_epoch(self) -> None:
        """Owned layout: send item deltas under a new epoch from now on (owners drop records
        sent under older ones; what they have not applied is still in the outboxes and is
        sent again, tagged anew, by the relay after the rebalance that follows a start)."""
        self.client.set(self.keys.owned_epoch, uuid.uuid4().hex)
        self._new_epoch_pending = False

    def commit(self, prepared: PreparedBatch) -> ApplyResult | None:
        """Write a prepared batch in one MULTI/EXEC, guarded by WATCH on its watermarks; None
        (nothing written) if a watermark is not what the batch was prepared against. Parted
        (:meth:`_compute_parts`): one per source partition, in turn, each guarded by its
        writer key too; None from the first whose watermark moved,
        :class:`state.redis_store.PartitionClaimed` where another process claimed it."""
        for source, writes, seq in prepared.parts:
            mark = prepared.expected[source]
            claim = self.source_claim(source)
            if not writes.commit_with_redo(self.client, [self.keys.watermark(*source)],
                                           [str(mark).encode() if mark >= 0 else None],
                                           self.keys.source_redo(*source), seq,
                                           self._scripts, self.settings.cluster_claim_window_s,
                                           claim, self.replica_wait):
                return None
            if source in prepared.new_marks:
                self._committed_marks[source] = max(self._committed_marks.get(source, -1),
                                                    prepared.new_marks[source])
        if prepared.writes.commands:
            expected = sorted(prepared.expected.items())
            watch = [self.keys.watermark(t, p) for (t, p), _ in expected]
            values = [str(mark).encode() if mark >= 0 else None for _, mark in expected]
            if self.lease is not None:  # written only while this worker holds the lease
                watch.append(self.lease.key)
                values.append(self.lease.holder.encode())
            if self.cluster:
                written = prepared.writes.commit_with_redo(
                    self.client, watch, values, self.keys.redo, prepared.seq, self._scripts,
                    self.settings.cluster_claim_window_s, wait=self.replica_wait)
            else:
                written = prepared.writes.commit(self.client, watch, values,
                                                 wait=self.replica_wait)
            if not written:
                if self.lease is not None:
                    self.lease.renew()  # lost? then the next read takes it again, afresh
                return None
        self._uncommitted.remove(prepared)
        for tp, mark in prepared.new_marks.items():
            self._committed_marks[tp] = max(self._committed_marks.get(tp, -1), mark)
        self._committed_seq = max(self._committed_seq, prepared.seq)
        prepared.result.committed_at = time.time()
        return prepared.result
