"""Item-side writes as delta records for their owner partitions (docs/item-ownership.md).

The first piece of the layout where item-side state has one writer per item partition. A
worker's models learn through a :class:`DeltaRecorder`: what is theirs alone (user and
session state, the ``*_local_*`` calls) goes to the worker's own store; every write to shared
tables (item rows, item vectors, counts) becomes an operation in a chunk's
:class:`ChunkDeltas`, grouped by the partition that owns the row's key. An owner applies a
partition's records with an :class:`Owner`, in order, to its own stores, once each. Each key
then has one writer, and its operations run in the order direct learning would run them, so
the owners' state equals that of models learning straight into one store, bit for bit.

:class:`OwnedLayout` runs the layout in one process (tests, benches); live, the worker's
models learn through delta recorders (``STREAMREC_STATE_WRITER=owned``), the records travel
through an outbox and the item-deltas topic (:mod:`stream.owners`), and
:class:`state.owner_commits.OwnerPartition` applies and commits them.
``bench/item_deltas.py`` measures what the records cost.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Sequence

import msgspec
import numpy as np

from online_models.store import FlatRows, MemoryStore, StateStore

_ROW_KINDS = ("incr", "set", "remove")
_VECTOR_KINDS = ("add_vectors", "set_vectors")
#: a record's shape: (source partition → offset, [(namespace, kind, table, top, payload)])
_record_shape = msgspec.msgpack.Decoder(
    tuple[dict[str, int], list[tuple[str, str, str, int, msgspec.Raw]]]).decode


def record_problem(record: bytes) -> str | None:
    """Why ``record`` is not an item-delta record at all (not msgpack, another shape, no
    source offsets), or None. A record of the right shape with an operation this version
    does not know is not a problem here: :meth:`Owner.apply_many` refuses it (a worker of an
    older version; dropping it would lose its deltas)."""
    try:
        sources, _ = _record_shape(record)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        return f"not an item-delta record: {exc}"[:200]
    return None if sources else "an item-delta record carries no source offsets"


#: partitions → key → its owner partition, for the keys met (dropped past 2^18)
_owners_known: dict[int, dict[str, int]] = {}


def _known_owners(partitions: int) -> dict[str, int]:
    known = _owners_known.get(partitions)
    if known is None or len(known) > 1 << 18:
        known = _owners_known[partitions] = {}
    return known


def owner_partition(key: str, partitions: int) -> int:
    """The partition that owns ``key``: Kafka's default placement of a record keyed by
    ``key`` (murmur2 of its UTF-8 bytes), so an item-keyed topic agrees (remembered)."""
    known = _known_owners(partitions)
    owner = known.get(key)
    if owner is None:
        from aiokafka.partitioner import murmur2

        owner = known[key] = (murmur2(key.encode()) & 0x7FFFFFFF) % partitions
    return owner


def positions_by_owner(keys: Sequence[str], partitions: int) -> dict[int, np.ndarray]:
    """Owner partition → the positions of its keys among ``keys`` (in order). Keys met
    before are looked up in the remembered placements (most of a chunk's keys were) and the
    positions grouped by one stable sort."""
    get = _known_owners(partitions).get
    found = [get(key) for key in keys]
    if None in found:
        found = [owner_partition(key, partitions) if owner is None else owner
                 for key, owner in zip(keys, found)]
    owners = np.array(found, np.int64)
    order = np.argsort(owners, kind="stable")  # each owner's positions, in order
    ends = np.cumsum(np.bincount(owners, minlength=partitions)).tolist()
    return {owner: order[start:end] for owner, (start, end) in enumerate(zip([0, *ends], ends))
            if end > start}


def outbox_field(offset: int, owner: int) -> str:
    """The outbox field of a record of a source partition's chunk ending at ``offset`` for
    owner partition ``owner`` (``RedisKeys.outbox``: ``<source offset>:<owner>``)."""
    return f"{offset}:{owner}"


def outbox_entry(field: bytes) -> tuple[int, int]:
    """An outbox field's (source offset, owner partition): :func:`outbox_field` read back."""
    offset, _, owner = field.partition(b":")
    return int(offset), int(owner)


def held_state(stores: Sequence[MemoryStore]) -> tuple[dict, dict]:
    """What memory stores hold together, as plain data to compare with ``==``: (table → key
    → row, table → key → vector bytes, bit for bit)."""
    rows: dict = {}
    vectors: dict = {}
    for store in stores:
        for table, held in store.rows.items():
            rows.setdefault(table, {}).update(held)
        for table, held in store.vectors.items():
            vectors.setdefault(table, {}).update(
                (key, vector.tobytes()) for key, vector in held.copy().items())
    return rows, vectors


class ChunkDeltas:
    """One chunk's shared-table writes, per owner partition, in the order they were made.
    An operation is ``(namespace, kind, table, keep_top or -1, payload)``; rows travel as
    (keys, bounds, members, values as doubles), vectors as (keys, dim, float32 bytes, base
    bytes)."""

    def __init__(self, partitions: int) -> None:
        self.partitions = partitions
        self.ops: dict[int, list[tuple]] = {}

    def add_rows(self, namespace: str, kind: str, table: str, rows: FlatRows,
                 keep_top: int | None) -> None:
        if not rows.keys:
            return
        lengths = np.diff(np.asarray(rows.bounds, np.int64))
        keys = np.asarray(rows.keys, object)
        members = np.asarray(rows.members, object)
        values = np.asarray(rows.values, np.float64)
        top = -1 if keep_top is None else keep_top
        by_owner = positions_by_owner(rows.keys, self.partitions)
        key_owner = np.empty(len(keys), np.int64)
        for owner, at in by_owner.items():
            key_owner[at] = owner
        entry_owner = np.repeat(key_owner, lengths)
        for owner, at in by_owner.items():
            entries = np.flatnonzero(entry_owner == owner)
            part = (keys[at].tolist(), [0, *np.cumsum(lengths[at]).tolist()],
                    members[entries].tolist(), values[entries].tobytes())
            self.ops.setdefault(owner, []).append((namespace, kind, table, top, part))

    def add_vectors(self, namespace: str, kind: str, table: str, keys: Sequence[str],
                    vectors: np.ndarray, base: np.ndarray | None) -> None:
        vectors = np.ascontiguousarray(vectors, np.float32)
        for owner, at in positions_by_owner(keys, self.partitions).items():
            rows = vectors[at]
            payload = ([keys[n] for n in at.tolist()], rows.shape[1], rows.tobytes(),
                       b"" if base is None
                       else np.ascontiguousarray(base, np.float32)[at].tobytes())
            self.ops.setdefault(owner, []).append((namespace, kind, table, -1, payload))

    def clear(self) -> None:
        """Forget the operations recorded (a chunk abandoned before its records were
        taken)."""
        self.ops = {}

    def take_records(self, sources: dict[str, int]) -> dict[int, bytes]:
        """Each owner partition's record (msgpack): the chunk's source offsets (``sources``:
        source partition → the last offset the chunk covers) and its operations, what goes
        to the owner's topic partition; the chunk starts empty again."""
        ops, self.ops = self.ops, {}
        return {owner: msgspec.msgpack.encode((sources, part))
                for owner, part in sorted(ops.items())}


class Owner:
    """One owner partition's side: applies records to its stores (``store_for(namespace)``)
    once each. It keeps, per source partition, the last offset applied (``applied``; commit
    it with the state it covers, restore both together): a record whose source offsets are
    not past it is a re-send or a redelivery, and is dropped."""

    def __init__(self, store_for: Callable[[str], StateStore],
                 applied: dict[str, int] | None = None) -> None:
        self.store_for = store_for
        self.applied: dict[str, int] = dict(applied or {})

    def apply(self, record: bytes) -> int | None:
        """Apply a record; how many operations it held, or None where it was applied
        before."""
        return self.apply_many([record])[0]

    def apply_many(self, records: Sequence[bytes]) -> list[int | None]:
        """Apply records in order (each as :meth:`apply`), first prefetching in one read per
        table the rows and vectors those not applied before will write."""
        due, applied = [], dict(self.applied)
        for record in records:
            sources, ops = msgspec.msgpack.decode(record)
            if not sources:
                raise ValueError("an item-delta record carries no source offsets: it could "
                                 "not be applied once")
            unknown = sorted({op[1] for op in ops} - {*_ROW_KINDS, *_VECTOR_KINDS})
            if unknown:  # refused whole: none of its operations applied
                raise ValueError(f"an item-delta record holds an unknown operation "
                                 f"{unknown[0]!r}")
            fresh = all(applied.get(source, -1) < offset for source, offset in sources.items())
            if fresh:
                applied.update(sources)
            due.append((sources, ops) if fresh else None)
        prefetch_operations([ops for entry in due if entry for ops in entry[1]],
                            self.store_for)
        outcomes: list[int | None] = []
        for entry in due:
            if entry is None:
                outcomes.append(None)
                continue
            sources, ops = entry
            apply_operations(ops, self.store_for)
            self.applied.update(sources)
            outcomes.append(len(ops))
        return outcomes


def prefetch_operations(ops: list, store_for: Callable[[str], StateStore]) -> None:
    """Read now, one call per table, what these operations will write (where writing reads:
    an owner's write-back store)."""
    keys: dict[tuple[str, str, bool], dict[str, None]] = {}
    for namespace, kind, table, _, payload in ops:
        keys.setdefault((namespace, table, kind in _VECTOR_KINDS), {}).update(
            dict.fromkeys(payload[0]))
    for (namespace, table, vectors), wanted in keys.items():
        store = store_for(namespace)
        if vectors:
            store.prefetch_vectors(table, list(wanted))
        elif store.writes_read_rows:
            store.prefetch_rows(table, list(wanted))


def apply_operations(ops: list, store_for: Callable[[str], StateStore]) -> None:
    """Apply a record's operations (of known kinds: :meth:`Owner.apply` checks) to the
    owner's stores (``store_for(namespace)``), in the order they were made."""
    for namespace, kind, table, top, payload in ops:
        store = store_for(namespace)
        keep_top = None if top < 0 else top
        if kind in _ROW_KINDS:
            keys, bounds, members, values = payload
            rows = FlatRows(keys, bounds, members, np.frombuffer(values, np.float64).tolist())
            if kind == "incr":
                store.incr_flat_rows(table, rows, keep_top)
            elif kind == "set":
                store.set_flat_rows(table, rows, keep_top)
            else:  # remove: an erasure's ids out of the rows
                store.remove_members(table, {key: members[lo:hi] for key, lo, hi
                                             in zip(keys, bounds, bounds[1:])})
        elif kind in _VECTOR_KINDS:
            keys, dim, raw, base = payload
            vectors = np.frombuffer(raw, np.float32).reshape(len(keys), dim)
            if kind == "add_vectors":
                store.add_vectors(table, keys, vectors,
                                  np.frombuffer(base, np.float32).reshape(len(keys), dim))
            else:
                store.set_vectors(table, keys, vectors)


class OwnedStores(StateStore):
    """The owners' stores of one namespace read as one (``stores[p]``: partition ``p``'s):
    each key read from its owner. Read-only; what the recorder reads shared rows from."""

    def __init__(self, stores: Sequence[StateStore]) -> None:
        self.stores = list(stores)

    def get_rows(self, table, keys):
        out: list = [None] * len(keys)
        for owner, at in positions_by_owner(keys, len(self.stores)).items():
            ats = at.tolist()
            for n, row in zip(ats, self.stores[owner].get_rows(table, [keys[a] for a in ats])):
                out[n] = row
        return out

    def get_vectors(self, table, keys, dim):
        vectors, found = np.zeros((len(keys), dim), np.float32), np.zeros(len(keys), bool)
        for owner, at in positions_by_owner(keys, len(self.stores)).items():
            vectors[at], found[at] = self.stores[owner].get_vectors(
                table, [keys[a] for a in at.tolist()], dim)
        return vectors, found

    def row_count(self, table):
        return sum(store.row_count(table) for store in self.stores)

    def claim(self, table, key, member, value):
        return self.stores[owner_partition(key, len(self.stores))].claim(
            table, key, member, value)

    def _read_only(self, *_args, **_kwargs):
        raise TypeError("owned stores are written by their owners (Owner.apply) only")

    incr_rows = set_rows = set_vectors = add_vectors = remove_members = _read_only
    get_local_rows = set_local_rows = get_local_vectors = set_local_vectors = _read_only

    def sibling(self, namespace):
        raise TypeError("owned stores come per namespace: build one for each")


class DeltaRecorder(StateStore):
    """A model's store in the owned layout: local rows and vectors in ``local`` (this
    worker's), shared reads from ``shared`` (the owners' state, e.g. :class:`OwnedStores`),
    shared writes recorded in ``deltas`` under ``namespace``. A claim (first writer wins,
    immediate) goes to ``shared`` at once."""

    def __init__(self, local: StateStore, shared: StateStore, deltas: ChunkDeltas,
                 namespace: str) -> None:
        self.local, self.shared, self.deltas, self.namespace = local, shared, deltas, namespace
        self._prefetched: dict[str, list[str]] = {}  # table → the keys the batch prefetched
        #: within :meth:`shared_reads`: table → key → (vector, found) read in the scope
        self._read: dict[str, dict[str, tuple[np.ndarray, bool]]] | None = None

    def get_rows(self, table, keys):
        return self.shared.get_rows(table, keys)

    def get_vectors(self, table, keys, dim):
        if self._read is None:
            return self.shared.get_vectors(table, keys, dim)
        held = self._read.setdefault(table, {})
        missing = list(dict.fromkeys(
            k for k in [*self._prefetched.pop(table, ()), *keys] if k not in held))
        if missing:  # the prefetched ones (all, at the table's first read) and any others
            vectors, found = self.shared.get_vectors(table, missing, dim)
            held.update(zip(missing, zip(vectors, found.tolist())))
        out, found = np.zeros((len(keys), dim), np.float32), np.zeros(len(keys), bool)
        for n, key in enumerate(keys):
            out[n], found[n] = held[key]
        return out, found

    @contextmanager
    def shared_reads(self):
        """Within, shared vectors are read once: the learning groups of a batch (a worker
        learns each source partition's events apart) share what the batch prefetched. Its
        own item-side writes are deltas for the owners, so nothing read here goes stale
        within the scope."""
        self._read = {}
        try:
            yield self
        finally:
            self._read = None
            self._prefetched.clear()

    def incr_rows(self, table, deltas, keep_top=None):
        self.incr_flat_rows(table, FlatRows.from_dicts(deltas), keep_top)

    def incr_flat_rows(self, table, rows, keep_top=None):
        self.deltas.add_rows(self.namespace, "incr", table, rows, keep_top)

    def set_rows(self, table, values, keep_top=None):
        self.set_flat_rows(table, FlatRows.from_dicts(values), keep_top)

    def set_flat_rows(self, table, rows, keep_top=None):
        self.deltas.add_rows(self.namespace, "set", table, rows, keep_top)

    def remove_members(self, table, members):
        rows = FlatRows.from_dicts({key: dict.fromkeys(gone, 0.0)
                                    for key, gone in members.items() if gone})
        self.deltas.add_rows(self.namespace, "remove", table, rows, None)

    def set_vectors(self, table, keys, vectors):
        self.deltas.add_vectors(self.namespace, "set_vectors", table, keys, vectors, None)

    def add_vectors(self, table, keys, deltas, base):
        self.deltas.add_vectors(self.namespace, "add_vectors", table, keys, deltas, base)

    def get_local_rows(self, table, keys):
        return self.local.get_local_rows(table, keys)

    def set_local_rows(self, table, rows):
        self.local.set_local_rows(table, rows)

    def get_local_vectors(self, table, keys, dim):
        return self.local.get_local_vectors(table, keys, dim)

    def set_local_vectors(self, table, keys, vectors):
        self.local.set_local_vectors(table, keys, vectors)

    def delete_local_vectors(self, table, keys):
        self.local.delete_local_vectors(table, keys)

    def claim(self, table, key, member, value):
        return self.shared.claim(table, key, member, value)

    def row_count(self, table):
        return self.local.row_count(table) + self.shared.row_count(table)

    def sibling(self, namespace):
        raise TypeError("a delta recorder comes per model namespace: build one for each")

    # --- a live worker's (stream.state.LiveState) ----------------------------------------
    def prefetch_local_rows(self, table, keys):
        self.local.prefetch_local_rows(table, keys)

    def prefetch_local_vectors(self, table, keys):
        self.local.prefetch_local_vectors(table, keys)

    def prefetch_vectors(self, table, keys):
        self.shared.prefetch_vectors(table, keys)
        self._prefetched[table] = list(keys)

    @contextmanager
    def deferred(self, pipe):
        """Learn, then queue the local changes on ``pipe`` (the worker's transaction); the
        shared ones wait in :attr:`deltas` for the caller to take."""
        with self.local.deferred(pipe):
            yield self

    def forget_cached(self):
        self.local.forget_cached()
        self.shared.forget_cached()
        self.deltas.clear()
        self._prefetched.clear()


class OwnedLayout:
    """The owned layout in one process (replay, tests, benches): ``models`` (name → model)
    learn through delta recorders, and each chunk's records are applied by their
    :class:`Owner` (``owners[p]``) to its stores (``owner_stores[p]``: ``make_store()`` per
    model) before the next chunk, as an owner agent would apply them from the item-keyed
    topic. ``sizes`` counts records, operations and bytes."""

    def __init__(self, models: dict, partitions: int, make_store=MemoryStore) -> None:
        self.models = models
        self.deltas = ChunkDeltas(partitions)
        self.owner_stores = [{name: make_store() for name in models} for _ in range(partitions)]
        self.local = {name: make_store() for name in models}
        for name, model in models.items():
            model.bind(DeltaRecorder(self.local[name],
                                     OwnedStores([owner[name] for owner in self.owner_stores]),
                                     self.deltas, name))
        self.owners = [Owner(stores.__getitem__) for stores in self.owner_stores]
        self.sizes = {"records": 0, "operations": 0, "bytes": 0}
        self._chunks = 0

    def learn(self, signals) -> dict[int, bytes]:
        """Learn a chunk and apply its records; returns them (owner partition → record)."""
        for model in self.models.values():
            model.learn(signals)
        self._chunks += 1
        records = self.deltas.take_records({"replay:0": self._chunks})
        for partition, record in records.items():
            self.sizes["records"] += 1
            self.sizes["bytes"] += len(record)
            self.sizes["operations"] += self.owners[partition].apply(record)
        return records

    def stores(self, name: str) -> list[StateStore]:
        """Every store holding a part of model ``name``'s state: the worker's, then each
        owner's."""
        return [self.local[name], *(stores[name] for stores in self.owner_stores)]
