"""One item partition's owner, live: applies item-delta records to state it holds in memory
and commits the changed rows to Redis together with the source offsets they cover.

The second piece of docs/item-ownership.md (the first, :mod:`state.ownership`, makes and
applies the records). An :class:`OwnerPartition` holds its models' item-side state in
:class:`state.write_back.WriteBackStore`s (Redis is their read model: rows written whole,
overwrites only) and applies each record once (:class:`state.ownership.Owner`). A commit
writes the changed rows and the owner's ``applied`` offsets (source partition → last offset
applied) together:

- on one Redis server, in one MULTI/EXEC;
- on a Redis Cluster, where one transaction holds one slot, the owner partition's redo
  record and ``applied`` (both under the tag ``{own:<p>}``) in one MULTI/EXEC, then the rows
  (:meth:`state.redis_store.WriteBatch.commit_with_redo`). Every write in the record is an
  overwrite, so applying it again after a crash changes nothing.

The same commit deletes the outbox entries of the records applied, and records the owner's
item-deltas offset (:attr:`OwnerPartition.position`: where a successor resumes). It WATCHes
``applied`` and, on one server, the epoch (``RedisKeys.owned_epoch``), and checks under the
WATCH that the outbox entries of the records it applied are still there: if another owner of
the same partition committed since this one read it (the partition moved and the old owner
wrote on), the epoch its records were checked against changed, or Redis went back to a state
from before their chunks' commits (a restart from an older snapshot, a failover to a replica
that lagged; the worker learns those events again), nothing is written and the owner starts
again from what Redis holds (:meth:`restore`). On a Redis Cluster the entries (under the
``{wm}`` tag) are checked when the records are applied, not in the commit's transaction.
After a crash the owner is built afresh: the redo record is applied, ``applied`` read, and
records consumed again from the topic are dropped up to it. Serving reads the rows through
a plain ``RedisStore`` as it reads the single writer's.
"""

from __future__ import annotations

import time
import uuid
from typing import Collection, Mapping

import msgspec

from infra.redis_client import ReplicaWait, mget_any
from state.ownership import Owner, outbox_entry, outbox_field
from state.redis_store import (CLUSTER_WRITE_SCRIPTS, Claim, WriteBatch, build_on_redis,
                               replay_redo)
from state.write_back import WriteBackStore
from schemas.keys import RedisKeys

_decode_sources = msgspec.msgpack.Decoder(tuple[dict[str, int], msgspec.Raw]).decode


class OwnerFenced(RuntimeError):
    """Another owner of this partition committed since this one read its offsets."""


def owner_stores(settings, client, clock=time.time) -> dict[str, WriteBackStore]:
    """The live models' stores as an owner holds them (settings: model names, options, TTLs
    and held keys): rows written whole, as in the single writer's layout, without TTLs: the
    owner deletes its keys once idle past their table's TTL, as the single writer does
    (:class:`state.write_back.WriteBackStore`; its deletes ride in its fenced commits). An
    owner that took the partition over cannot know its predecessor's keys:
    :class:`state.write_back.UntimedKeySweeper` gives those their table's TTL."""
    readers = build_on_redis(settings.live_model_names, client, settings.key_prefix,
                             local_ttl_s=settings.user_state_ttl_s,
                             shared_ttl_s=settings.item_state_ttl_s, layout="owned",
                             options=settings.model_options, expires_by_writer=True)
    return {name: WriteBackStore(model.store, held_keys=settings.state_writer_held_keys,
                                 clock=clock)
            for name, model in readers.items()}


def decode_progress(raw: bytes | None) -> tuple[int, dict[str, int]]:
    """An owner's committed progress (``RedisKeys.owner_applied``): the last item-deltas
    offset it consumed (-1: none) and, per source partition, the last offset applied."""
    if raw is None:
        return -1, {}
    position, applied = msgspec.msgpack.decode(raw)
    return position, applied


def read_positions(client, keys: RedisKeys, partitions: list[int]) -> dict[int, int | None]:
    """Item partition → the last item-deltas offset its owner committed (None: none), where
    a newly assigned owner resumes (Redis, not Kafka, holds an owner's progress)."""
    raws = mget_any(client, [keys.owner_applied(p) for p in partitions])
    return {p: (decode_progress(raw)[0] if raw is not None else None)
            for p, raw in zip(partitions, raws)}


class OwnerPartition:
    """Item partition ``partition``'s owner on ``client`` (see the module doc). ``stores``:
    model namespace → its :class:`WriteBackStore` (:func:`owner_stores`)."""

    def __init__(self, client, prefix: str, partition: int,
                 stores: Mapping[str, WriteBackStore], writer_id: bytes | None = None, *,
                 claim_window_s: float, replica_wait: ReplicaWait | None = None) -> None:
        self.client, self.partition = client, partition
        self.keys = RedisKeys(prefix)
        self.stores = dict(stores)
        self.applied_key = self.keys.owner_applied(partition)
        self.redo_key = self.keys.owner_redo(partition)
        self.epoch_key = self.keys.owned_epoch
        self.cluster = next(iter(self.stores.values())).reader.cluster if self.stores else False
        #: Redis Cluster: this process's claim (the worker claims at the assignment;
        #: :meth:`restore` where no process has)
        self.claim = Claim(self.keys.owner_writer(partition),
                           writer_id or uuid.uuid4().hex.encode(), f"item partition {partition}")
        self.claim_window_s = claim_window_s
        self.replica_wait = replica_wait  # commits done once replicas acknowledged them
        self.restore()

    def restore(self) -> None:
        """Start from what Redis holds: forget the state held in memory (it is read again
        on first use), apply the last commit's redo record (cluster, as the partition's
        writer: :func:`state.redis_store.replay_redo`), read ``applied``."""
        for store in self.stores.values():
            store.forget_cached()
        seq = 0
        if self.cluster:
            record, _ = replay_redo(self.client, self.redo_key, list(CLUSTER_WRITE_SCRIPTS),
                                    self.claim_window_s, self.claim, wait=self.replica_wait)
            seq = int(record.get(b"seq", 0))
        self._seq = max(seq, int(time.time() * 1000))
        self._committed, self.epoch = mget_any(self.client, [self.applied_key, self.epoch_key])
        self.position, applied = decode_progress(self._committed)
        self._delivered: dict[str, set[str]] = {}  # outbox key → fields applied here
        #: outbox key → fields of records applied as sent (:meth:`apply_sent`): the commit
        #: writes only if they are all still in Redis
        self._sent: dict[str, set[str]] = {}
        self.owner = Owner(self.stores.__getitem__, applied)
        for store in self.stores.values():  # never committed: Redis holds none of its keys
            store.complete = self._committed is None

    @property
    def applied(self) -> dict[str, int]:
        """Source partition → the last offset applied (committed or not yet)."""
        return self.owner.applied

    def apply(self, record: bytes) -> int | None:
        """Apply a record in memory (:meth:`state.ownership.Owner.apply`): how many
        operations it held, or None where it was applied before."""
        return self.apply_many([record])[0]

    def apply_many(self, records: list[bytes], positions: list[int] | None = None
                   ) -> list[int | None]:
        """:meth:`apply` of each record, reading what they write in one call per table.
        Their outbox entries are deleted by the next commit; ``positions``: their offsets in
        the item-deltas topic (committed as :attr:`position`)."""
        outcomes = self._apply_with_entries(records, [self._entries(r) for r in records])
        if positions:
            self.position = max(self.position, *positions)
        return outcomes

    def _apply_with_entries(self, records: list[bytes],
                            entries: list[list[tuple[str, str]]]) -> list[int | None]:
        outcomes = self.owner.apply_many(records)
        for found in entries:
            for outbox, field in found:
                self._delivered.setdefault(outbox, set()).add(field)
        return outcomes

    def _entries(self, record: bytes) -> list[tuple[str, str]]:
        """A record's outbox entries: (outbox key, field) per source partition it covers."""
        entries = []
        for source, offset in _decode_sources(record)[0].items():
            topic, _, partition = source.rpartition(":")
            entries.append((self.keys.outbox(topic, int(partition)),
                            outbox_field(offset, self.partition)))
        return entries

    def apply_sent(self, epochs: list[bytes | None], records: list[bytes],
                   positions: list[int], checked: bool = True) -> list[int | None]:
        """:meth:`apply_many` of records as the relay sent them (their epochs, the Kafka
        keys), dropping (None) those of another epoch than Redis's (sent before Redis lost
        writes, or before a worker started: their outbox entries stay, and the relay sends
        them again under the epoch of now) and those whose outbox entry is not in Redis:
        applied before (a re-send), or of a history Redis lost (it went back to an older
        state, and the worker has not noticed yet: their events are learnt again, and sent
        under a new epoch). ``checked=False`` reads nothing where every record has the
        epoch this owner last read: the entries are taken as there, and the commit checks
        both (an owner it fences applies the records again, checked). Not on a Redis
        Cluster, whose commit cannot check the entries (another slot): there they are
        always checked here."""
        entries = [self._entries(record) for record in records]
        if checked or self.cluster or any(epoch != self.epoch for epoch in epochs):
            with self.client.pipeline(transaction=False) as pipe:
                pipe.get(self.epoch_key)
                for outbox, field in (entry for found in entries for entry in found):
                    pipe.hexists(outbox, field)
                self.epoch, *present = pipe.execute()
        else:
            present = [True] * sum(map(len, entries))
        present_at = iter(present)
        current = [n for n, epoch in enumerate(epochs)
                   if all([next(present_at) for _ in entries[n]]) and epoch == self.epoch]
        applied = dict(zip(current, self._apply_with_entries([records[n] for n in current],
                                                             [entries[n] for n in current])))
        for n in current:
            for outbox, field in entries[n]:
                self._sent.setdefault(outbox, set()).add(field)
        self.position = max([self.position, *positions])
        return [applied.get(n) for n in range(len(records))]

    def commit(self) -> int:
        """Write what changed since the last commit with ``applied`` (module doc), and
        delete the outbox entries applied; returns how many keys were written. Raises
        :class:`OwnerFenced` (after :meth:`restore`) where another owner committed since,
        the epoch changed or Redis went back; Redis's errors propagate (call :meth:`restore`
        before going on: the commit may not have happened)."""
        return commit_owners([self])

    def _stage(self, batch: WriteBatch) -> tuple[bytes, int] | None:
        """Add this owner's commit to ``batch``: (its progress, keys written), or None where
        nothing changed since the last commit."""
        encoded = msgspec.msgpack.encode((self.position, self.owner.applied))
        if encoded == self._committed:
            return None
        written = sum(store.flush(batch) for store in self.stores.values())
        batch.set(self.applied_key, encoded)
        for outbox, fields in self._delivered.items():
            batch.hdel(outbox, *sorted(fields))
        return encoded, written

    def _committed_as(self, encoded: bytes) -> None:
        self._committed = encoded
        self._delivered, self._sent = {}, {}


def commit_owners(owners: list[OwnerPartition]) -> int:
    """:meth:`OwnerPartition.commit` of several owners: on one server in one transaction
    (one round trip for all the item partitions a worker holds), on a Redis Cluster one per
    owner (their keys are in different slots). Returns the keys written. Raises
    :class:`OwnerFenced` where any was fenced, after :meth:`OwnerPartition.restore` of every
    owner whose commit did not happen; on a Redis Cluster
    :class:`state.redis_store.PartitionClaimed` where another process claimed the partition."""
    if not owners:
        return 0
    if owners[0].cluster:
        written = 0
        for owner in owners:
            staged = owner._stage(batch := WriteBatch())
            if staged is None:
                continue
            owner._seq += 1
            if not batch.commit_with_redo(owner.client, [owner.applied_key], [owner._committed],
                                          owner.redo_key, owner._seq, CLUSTER_WRITE_SCRIPTS,
                                          owner.claim_window_s, owner.claim,
                                          owner.replica_wait):
                owner.restore()
                raise OwnerFenced(f"item partition {owner.partition}: another owner committed "
                                  f"since this one read its offsets; started again from Redis")
            owner._committed_as(staged[0])
            written += staged[1]
        return written
    batch, staged = WriteBatch(), []
    for owner in owners:
        if (found := owner._stage(batch)) is not None:
            staged.append((owner, *found))
    if not staged:
        return 0
    watch = [owner.applied_key for owner, _, _ in staged] + [staged[0][0].epoch_key]
    expect = [owner._committed for owner, _, _ in staged] + [staged[0][0].epoch]
    present: dict[str, set[str]] = {}
    for owner, _, _ in staged:
        for outbox, fields in owner._sent.items():
            present.setdefault(outbox, set()).update(fields)
    epochs = {owner.epoch for owner, _, _ in staged}
    if len(epochs) > 1 or not batch.commit(staged[0][0].client, watch, expect, present,
                                           staged[0][0].replica_wait):
        for owner, _, _ in staged:
            owner.restore()
        numbers = ", ".join(str(owner.partition) for owner, _, _ in staged)
        raise OwnerFenced(f"item partition {numbers}: another owner committed since it read "
                          f"its offsets, the epoch changed, or Redis went back to before "
                          f"records it applied; started again from Redis")
    for owner, encoded, _ in staged:
        owner._committed_as(encoded)
    return sum(written for _, _, written in staged)


def read_outboxes(client, keys: RedisKeys, sources: list[tuple[str, int]],
                  sent_up_to: dict[tuple[str, int], int] | None = None,
                  skip_owners: Collection[int] = ()
                  ) -> tuple[bytes | None, dict[tuple[str, int], list[tuple[int, int, bytes]]]]:
    """The epoch to send under, and each source partition's outbox entries, oldest first:
    (offset, owner partition, record). Every entry in one round trip; with ``sent_up_to``
    (source → offset), only the entries past it whose owner is not in ``skip_owners``: their
    field names first, then those records (two round trips, no record read for nothing; an
    entry deleted in between was applied by its owner)."""
    with client.pipeline(transaction=False) as pipe:
        pipe.get(keys.owned_epoch)
        for topic, partition in sources:
            (pipe.hgetall if sent_up_to is None else pipe.hkeys)(keys.outbox(topic, partition))
        epoch, *outboxes = pipe.execute()
    if sent_up_to is None:
        found = [[(*outbox_entry(field), record) for field, record in outbox.items()]
                 for outbox in outboxes]
    else:
        wanted = [[(field, entry) for field, entry in zip(fields, map(outbox_entry, fields))
                   if entry[0] > sent_up_to.get(source, -1) and entry[1] not in skip_owners]
                  for source, fields in zip(sources, outboxes)]
        found = [[] for _ in sources]
        if any(wanted):
            with client.pipeline(transaction=False) as pipe:
                for (topic, partition), fields in zip(sources, wanted):
                    if fields:
                        pipe.hmget(keys.outbox(topic, partition), [f for f, _ in fields])
                records = iter(pipe.execute())
            found = [[(*entry, record) for (_, entry), record in zip(fields, next(records))
                      if record is not None] if fields else []
                     for fields in wanted]
    return epoch, {source: sorted(due) for source, due in zip(sources, found)}


def item_deltas_pending(client, keys: RedisKeys, topic: str, partitions: int) -> int:
    """Outbox entries (item-delta records) of ``topic``'s ``partitions`` their owners have
    not applied yet (owners delete the entries they apply)."""
    with client.pipeline(transaction=False) as pipe:
        for partition in range(partitions):
            pipe.hlen(keys.outbox(topic, partition))
        return sum(pipe.execute())


def hop_settled(client, keys: RedisKeys, topic: str, partitions: int) -> bool:
    """Whether nothing waits in the hop: every outbox entry applied by its owner."""
    return item_deltas_pending(client, keys, topic, partitions) == 0
