"""State stores: where online models keep learned state. Same semantics in memory and Redis.

A model's state is a few named *tables* of sparse rows (``key → {member: score}``) and of
dense vectors (``key → float32[dim]``). Models read the rows a batch needs in one call and
write their deltas in one call, so the Redis store costs one round trip per batch and table.

Row semantics are Redis sorted sets' and the memory store copies them exactly, so a replay in
memory and a live run on Redis give identical state:

* ``incr_rows`` adds deltas (ZINCRBY), ``set_rows`` overwrites scores (ZADD);
* with ``keep_top=N`` a row longer than ``N + slack(N)`` is cut back to its ``N`` largest
  members, ties ordered by member bytes as Redis orders them (``slack = max(1, N // 10)``
  amortises trimming).

*Local* rows (``get_local_rows``/``set_local_rows``) are partition-local state that one writer
owns (a session's items, its co-occurrence window): they are read and written whole, stored in
Redis as one msgpack string each, and the owning worker may keep them cached in memory.

The Redis implementation lives in :mod:`state.redis_store` (this package imports no Redis,
Kafka or Faust code: models see only this interface).

Example
-------
>>> store = MemoryStore()
>>> store.incr_rows("cooc", {"a": {"b": 1.0, "c": 2.0}})
>>> store.get_rows("cooc", ["a", "missing"])
[{'b': 1.0, 'c': 2.0}, {}]
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from contextlib import contextmanager
from itertools import repeat
from operator import add
from collections.abc import MutableMapping
from typing import Mapping, Sequence

import numpy as np

Rows = Mapping[str, Mapping[str, float]]


def slack(keep_top: int) -> int:
    return max(1, keep_top // 10)


def grown(array: np.ndarray, size: int, fill) -> np.ndarray:
    """``array`` if it holds ``size`` entries, else a copy at least twice as long, the new
    entries ``fill``: arrays indexed by item code grow with the codes."""
    if size <= len(array):
        return array
    more = np.full(max(size, 2 * len(array)) - len(array), fill, array.dtype)
    return np.concatenate((array, more))


class FlatRows:
    """Rows held flat: row ``keys[r]`` is ``members[bounds[r]:bounds[r+1]]`` with ``values``
    alike: what batch maths produce, written without a dict per row. Keys are distinct; so
    are a row's members where the rows are added (:meth:`StateStore.incr_flat_rows`); where
    they are set, a later member overwrites an earlier one, as in a dict."""

    __slots__ = ("keys", "bounds", "members", "values")

    def __init__(self, keys: list[str], bounds: list[int], members: list[str],
                 values: list[float]) -> None:
        self.keys, self.bounds, self.members, self.values = keys, bounds, members, values

    @classmethod
    def column(cls, keys: list[str], member: str, values: list[float]) -> "FlatRows":
        """One member per row (counts kept as ``{member: n}`` rows)."""
        return cls(keys, list(range(len(keys) + 1)), [member] * len(keys), values)

    @classmethod
    def from_dicts(cls, rows: Mapping[str, Mapping[str, float]]) -> "FlatRows":
        """``{key: {member: value}}`` held flat."""
        bounds = [0]
        members: list[str] = []
        values: list[float] = []
        for row in rows.values():
            members += row.keys()
            values += row.values()
            bounds.append(len(members))
        return cls(list(rows), bounds, members, values)

    def as_dicts(self) -> dict[str, dict[str, float]]:
        """As ``{key: {member: value}}`` (a later member overwriting an earlier one)."""
        b, members, values = self.bounds, self.members, self.values
        return {key: dict(zip(members[lo:hi], values[lo:hi]))
                for key, lo, hi in zip(self.keys, b, b[1:])}


class StateStore(ABC):
    """Sparse rows and dense vectors by table and key."""

    @abstractmethod
    def get_rows(self, table: str, keys: Sequence[str]) -> list[dict[str, float]]:
        """Each key's row (``{}`` when absent). Read-only: copy before changing."""

    @abstractmethod
    def incr_rows(self, table: str, deltas: Rows, keep_top: int | None = None) -> None:
        """Add deltas to rows, then trim rows to ``keep_top`` (see module doc)."""

    def incr_flat_rows(self, table: str, rows: FlatRows, keep_top: int | None = None) -> None:
        """:meth:`incr_rows` of rows held flat (members distinct within a row)."""
        self.incr_rows(table, rows.as_dicts(), keep_top)

    def set_flat_rows(self, table: str, rows: FlatRows, keep_top: int | None = None) -> None:
        """:meth:`set_rows` of rows held flat (a later member overwrites an earlier one)."""
        self.set_rows(table, rows.as_dicts(), keep_top)

    @abstractmethod
    def set_rows(self, table: str, values: Rows, keep_top: int | None = None) -> None:
        """Overwrite members' scores, then trim."""

    @abstractmethod
    def get_local_rows(self, table: str, keys: Sequence[str]) -> list[dict[str, float]]:
        """Each key's local row (``{}`` when absent). Read-only: copy before changing."""

    @abstractmethod
    def set_local_rows(self, table: str, rows: Rows) -> None:
        """Make each given local row exactly this mapping (an empty one deletes the row). The
        store keeps the mappings given (no copy): callers must not change them afterwards."""

    @abstractmethod
    def get_local_vectors(self, table: str, keys: Sequence[str], dim: int
                          ) -> tuple[np.ndarray, np.ndarray]:
        """Like :meth:`get_vectors`, for vectors one writer owns (cached like local rows)."""

    @abstractmethod
    def set_local_vectors(self, table: str, keys: Sequence[str], vectors: np.ndarray) -> None:
        """Like :meth:`set_vectors`, for vectors one writer owns."""

    def delete_local_rows(self, table: str, keys: Sequence[str]) -> None:
        """Delete local rows (an erasure): :meth:`set_local_rows` of empty rows."""
        if keys:
            self.set_local_rows(table, {key: {} for key in keys})

    def delete_local_vectors(self, table: str, keys: Sequence[str]) -> None:
        """Delete vectors one writer owns (an erasure); absent ones are ignored."""
        raise NotImplementedError(f"{type(self).__name__} cannot delete vectors")

    def remove_members(self, table: str, members: Mapping[str, Sequence[str]]) -> None:
        """Remove members from rows (``{key: [member, ...]}``; absent ones are ignored; a row
        left empty is deleted, as Redis deletes an empty sorted set): an erasure takes a
        user's or session's id out of item-side rows."""
        raise NotImplementedError(f"{type(self).__name__} cannot remove members")

    def forget_cached(self) -> None:
        """Drop cached local rows and vectors (after a failed commit or when partitions move)."""

    @contextmanager
    def shared_reads(self):
        """Within, on this thread, each row is read from the backing store at most once, so
        the sources of one serving pass that read the same rows share one read (a reader's
        scope: rows written meanwhile are not seen). Nothing to share in memory."""
        yield self

    @abstractmethod
    def claim(self, table: str, key: str, member: str, value: float) -> float:
        """Set ``member`` of row ``key`` to ``value`` unless it is set; return the stored value.
        Atomic and immediate even while a Redis store defers its writes (first writer wins). A
        claimed value never changes: the Redis store remembers it."""

    def prefetch_vectors(self, table: str, keys: Sequence[str]) -> None:
        """Read these vectors now; the next :meth:`get_vectors` of ``table`` takes them from
        here (a worker reads before starting the previous batch's commit, computes after)."""

    def prefetch_vector_tables(self, reads: Mapping[str, Sequence[str]]) -> None:
        """:meth:`prefetch_vectors` of several tables (``{table: keys}``) at once: one round
        trip where the store has a server (serving reads users' and items' vectors per pass)."""
        for table, keys in reads.items():
            self.prefetch_vectors(table, keys)

    #: True where writing a row reads it first (a writer holding state in memory with Redis
    #: as its read model): models then prefetch the rows a batch will write
    writes_read_rows = False

    def prefetch_rows(self, table: str, keys: Sequence[str]) -> None:
        """Read these rows now if writing them reads them (:attr:`writes_read_rows`)."""

    def prefetch_local_rows(self, table: str, keys: Sequence[str]) -> None:
        """Read the uncached ones of these local rows into the cache now (if caching)."""

    def prefetch_local_vectors(self, table: str, keys: Sequence[str]) -> None:
        """Read the uncached ones of these local vectors into the cache now (if caching)."""

    @abstractmethod
    def get_vectors(self, table: str, keys: Sequence[str], dim: int
                    ) -> tuple[np.ndarray, np.ndarray]:
        """(float32 matrix ``len(keys) × dim``, bool mask of keys found); absent rows are 0."""

    @abstractmethod
    def set_vectors(self, table: str, keys: Sequence[str], vectors: np.ndarray) -> None:
        """Store float32 vectors."""

    @abstractmethod
    def add_vectors(self, table: str, keys: Sequence[str], deltas: np.ndarray,
                    base: np.ndarray) -> None:
        """Add float32 deltas to stored vectors, atomically per vector, so concurrent writers'
        updates add up (none is lost); a vector not stored yet starts from its ``base`` row."""

    @abstractmethod
    def row_count(self, table: str) -> int:
        """Number of rows (keys) in a table."""

    @abstractmethod
    def sibling(self, namespace: str) -> "StateStore":
        """An empty store of the same kind for another model (Redis: same server, own keys)."""


class RowCache:
    """Values computed per key from model state (rows), each kept up to ``max_age_s`` seconds
    (monotonic clock; 0: nothing kept) and at most ``max_rows`` of them (the oldest dropped
    first). Thread-safe; values are shared: read-only."""

    def __init__(self, max_age_s: float, max_rows: int = 100_000) -> None:
        self.max_age_s, self.max_rows = max_age_s, max_rows
        self._rows: dict[str, tuple[float, object]] = {}
        self._lock = threading.Lock()

    def rows(self, keys: Sequence[str], compute) -> list:
        """``compute(keys)``'s values, computed only for the keys not kept (or kept too long)."""
        if not self.max_age_s:
            return compute(keys)
        now = time.monotonic()
        with self._lock:
            kept = [self._rows.get(key) for key in keys]
        missing = list(dict.fromkeys(key for key, entry in zip(keys, kept)
                                     if entry is None or now - entry[0] > self.max_age_s))
        if not missing:
            return [row for _, row in kept]
        fresh = dict(zip(missing, compute(missing)))
        with self._lock:
            for key, row in fresh.items():
                self._rows.pop(key, None)  # re-insert: the oldest first in order
                self._rows[key] = (now, row)
            for _ in range(len(self._rows) - self.max_rows):
                del self._rows[next(iter(self._rows))]
        return [fresh[key] if key in fresh else entry[1] for key, entry in zip(keys, kept)]


class CodedValueCache:
    """One number per item code (:class:`online_models.base.ItemCodes`), each kept up to
    ``max_age_s`` seconds (monotonic clock; 0: read every time): :class:`RowCache` for numbers
    a query needs for thousands of items at once, where work per item in Python would cost
    more than the read. Thread-safe."""

    def __init__(self, max_age_s: float) -> None:
        self.max_age_s = max_age_s
        self._values = np.zeros(0)
        self._read_at = np.zeros(0)
        self._lock = threading.Lock()

    def values(self, codes: np.ndarray, read) -> np.ndarray:
        """The values of ``codes`` (distinct); ``read(codes)`` gives those not kept (or kept
        too long), one number per code."""
        now = time.monotonic()
        with self._lock:
            size = int(codes.max(initial=-1)) + 1  # new codes: never read
            self._values, self._read_at = grown(self._values, size, 0.0), grown(
                self._read_at, size, -np.inf)
            stale = codes[now - self._read_at[codes] > self.max_age_s] if self.max_age_s \
                else codes
        if len(stale):
            fresh = np.asarray(read(stale), np.float64)
            with self._lock:
                self._values[stale], self._read_at[stale] = fresh, now
        with self._lock:
            return self._values[codes]


def _trim_order(item: tuple[str, float]) -> tuple[float, bytes]:
    return item[1], item[0].encode("utf-8")


def trim_row(row: dict[str, float], keep_top: int) -> dict[str, float]:
    """The store's trim rule, for models that mirror a row between reads (in place): past
    ``keep_top`` plus slack, drop the lowest scores, ties by member bytes (Redis's order).

    The cut-off score is found with a linear-time partition; only members tied at it are
    sorted (a full sort with a Python key was most of the learning time of large rows)."""
    n = len(row)
    if n <= keep_top + (keep_top // 10 or 1):  # slack(keep_top), inlined: hot path
        return row
    drop = n - keep_top
    members = list(row)
    scores = np.fromiter(row.values(), np.float64, n)
    cutoff = np.partition(scores, drop - 1)[drop - 1]
    below = np.flatnonzero(scores < cutoff)
    # str order is code-point order, which UTF-8 byte order preserves: no encoding needed
    tied = sorted(members[i] for i in np.flatnonzero(scores == cutoff).tolist())
    for i in below.tolist():
        del row[members[i]]
    for member in tied[:drop - len(below)]:
        del row[member]
    return row


def _add_float32(current: np.ndarray, delta: np.ndarray) -> np.ndarray:
    """``current + delta`` summed in float64 and rounded once to float32 — exactly what the
    Redis script computes (Lua numbers are doubles), so both stores agree bit for bit."""
    return (current.astype(np.float64) + delta.astype(np.float64)).astype(np.float32)


_ZERO = 0.0  # a new member starts at 0.0, as in Redis (-0.0 + 0.0 is 0.0)


def _last_of_each(keys: Sequence[str], *arrays: np.ndarray):
    """``keys`` with each key once (its last occurrence), and the arrays' rows to match."""
    if len(set(keys)) == len(keys):
        return keys, arrays
    last = {key: n for n, key in enumerate(keys)}
    rows = list(last.values())
    return list(last), tuple(array[rows] for array in arrays)


class VectorTable(MutableMapping):
    """One table's vectors (key → float32[dim]) as rows of one growing matrix, so a batch's
    vectors are gathered and scattered at once, with no Python object per vector. As a
    mapping, ``table[key]`` is a view of the key's row (copy it to keep it)."""

    def __init__(self) -> None:
        self.index: dict[str, int] = {}
        self.matrix = np.empty((0, 0), np.float32)
        self._free: list[int] = []

    def rows_of(self, keys: Sequence[str]) -> np.ndarray:
        """Each key's row, -1 where absent."""
        return np.array(list(map(self.index.get, keys, repeat(-1))), np.int64)

    def gather(self, keys: Sequence[str], dim: int) -> tuple[np.ndarray, np.ndarray]:
        """(vectors, found): a copy, zeros where absent."""
        rows = self.rows_of(keys)
        return self._gathered(rows, dim), rows >= 0

    def _gathered(self, rows: np.ndarray, dim: int) -> np.ndarray:
        if not self.index:
            return np.zeros((len(rows), dim), np.float32)
        if self.matrix.shape[1] != dim:
            raise ValueError(f"{dim}-dimension vectors asked of a table of "
                             f"{self.matrix.shape[1]}")
        out = self.matrix.take(rows, axis=0)  # a copy; -1 takes the last row: zeroed below
        absent = rows < 0
        if absent.any():
            out[absent] = 0.0
        return out

    def scatter(self, keys: Sequence[str], vectors: np.ndarray) -> None:
        """Store each key's vector (copied in); a key given twice keeps its last one."""
        keys, (vectors,) = _last_of_each(keys, np.asarray(vectors, dtype=np.float32))
        if not len(keys):
            return
        self._fit(vectors.shape[1])
        rows = self.rows_of(keys)
        self._place(keys, rows)
        self.matrix[rows] = vectors

    def add(self, keys: Sequence[str], deltas: np.ndarray, base: np.ndarray) -> None:
        """Add float32 ``deltas`` to the keys' vectors, a key not stored starting from its
        ``base`` row (a key given twice: its last delta, added to the stored vector)."""
        keys, (deltas, base) = _last_of_each(keys, deltas, base)
        self._fit(deltas.shape[1])
        rows = self.rows_of(keys)
        absent = rows < 0
        current = self._gathered(rows, deltas.shape[1])
        current[absent] = base[absent]
        summed = _add_float32(current, deltas)
        self._place(keys, rows)  # the matrix may grow: after the gather
        self.matrix[rows] = summed

    def _place(self, keys: Sequence[str], rows: np.ndarray) -> None:
        """Give each key without a row (-1 in ``rows``) one, in ``rows``."""
        for n in np.flatnonzero(rows < 0).tolist():
            rows[n] = self._new_row(keys[n])

    def _fit(self, dim: int) -> None:
        if self.matrix.shape[1] != dim:
            if self.index:
                raise ValueError(f"vectors of {dim} dimensions in a table of "
                                 f"{self.matrix.shape[1]}")
            self.matrix = np.empty((0, dim), np.float32)

    def _new_row(self, key: str) -> int:
        if self._free:
            row = self._free.pop()
        else:
            row = len(self.index)
            if row >= len(self.matrix):
                grown = np.empty((max(64, 2 * len(self.matrix)), self.matrix.shape[1]),
                                 np.float32)
                grown[:len(self.matrix)] = self.matrix
                self.matrix = grown
        self.index[key] = row
        return row

    def __getitem__(self, key: str) -> np.ndarray:
        return self.matrix[self.index[key]]

    def __setitem__(self, key: str, vector) -> None:
        self.scatter([key], np.asarray(vector, dtype=np.float32)[None, :])

    def __delitem__(self, key: str) -> None:
        self._free.append(self.index.pop(key))

    def __contains__(self, key) -> bool:
        return key in self.index

    def __iter__(self):
        return iter(self.index)

    def __len__(self) -> int:
        return len(self.index)

    def copy(self) -> dict[str, np.ndarray]:
        """A plain dict of copies."""
        return {key: self.matrix[row].copy() for key, row in self.index.items()}


class MemoryStore(StateStore):
    """In-memory store for replay and tests (rows as dicts, each vector table one matrix).
    Not thread-safe."""

    def __init__(self) -> None:
        self.rows: dict[str, dict[str, dict[str, float]]] = {}
        self.vectors: dict[str, VectorTable] = {}

    def get_rows(self, table, keys):
        # The live dicts, not copies (replay speed): callers must treat rows as read-only.
        rows = self.rows.get(table, {})
        empty: dict[str, float] = {}
        return [rows.get(k, empty) for k in keys]

    def incr_rows(self, table, deltas, keep_top=None):
        self.incr_flat_rows(table, FlatRows.from_dicts(deltas), keep_top)

    def incr_flat_rows(self, table, rows, keep_top=None):
        # the one add-and-trim loop; flat: the kernels' sums need no dict per row
        stored = self.rows.setdefault(table, {})
        limit = None if keep_top is None else keep_top + slack(keep_top)
        bounds, members, values = rows.bounds, rows.members, rows.values
        for key, lo, hi in zip(rows.keys, bounds, bounds[1:]):
            row = stored.get(key)
            if row is None:
                stored[key] = row = dict(zip(members[lo:hi],
                                             map(add, repeat(_ZERO), values[lo:hi])))
            else:
                get = row.get
                for member, value in zip(members[lo:hi], values[lo:hi]):
                    row[member] = get(member, 0.0) + value
            if limit is not None and len(row) > limit:
                trim_row(row, keep_top)

    def set_flat_rows(self, table, rows, keep_top=None):
        stored = self.rows.setdefault(table, {})
        bounds, members, values = rows.bounds, rows.members, rows.values
        for key, lo, hi in zip(rows.keys, bounds, bounds[1:]):
            row = stored.get(key)
            if row is None:
                stored[key] = row = {}
            row.update(zip(members[lo:hi], values[lo:hi]))
            if keep_top is not None:
                trim_row(row, keep_top)

    def set_rows(self, table, values, keep_top=None):
        self.set_flat_rows(table, FlatRows.from_dicts(values), keep_top)

    get_local_rows = get_rows

    def set_local_rows(self, table, rows):
        stored = self.rows.setdefault(table, {})
        for key, row in rows.items():
            if row:
                stored[key] = row
            else:
                stored.pop(key, None)

    def claim(self, table, key, member, value):
        return self.rows.setdefault(table, {}).setdefault(key, {}).setdefault(member, value)

    def vector_table(self, table: str) -> VectorTable:
        stored = self.vectors.get(table)
        if stored is None:
            self.vectors[table] = stored = VectorTable()
        return stored

    def get_vectors(self, table, keys, dim):
        stored = self.vectors.get(table)
        if stored is None:
            return np.zeros((len(keys), dim), np.float32), np.zeros(len(keys), bool)
        return stored.gather(keys, dim)

    def set_vectors(self, table, keys, vectors):
        self.vector_table(table).scatter(keys, vectors)

    def add_vectors(self, table, keys, deltas, base):
        if not len(keys):
            return
        self.vector_table(table).add(keys, np.asarray(deltas, dtype=np.float32),
                                     np.asarray(base, dtype=np.float32))

    get_local_vectors = get_vectors
    set_local_vectors = set_vectors

    def remove_members(self, table, members):
        stored = self.rows.get(table, {})
        for key, gone in members.items():
            row = stored.get(key)
            if row:
                for member in gone:
                    row.pop(member, None)
                if not row:
                    del stored[key]

    def delete_local_vectors(self, table, keys):
        stored = self.vectors.get(table)
        for key in keys if stored is not None else ():
            if key in stored:
                del stored[key]

    def row_count(self, table):
        return len(self.rows.get(table, {})) + len(self.vectors.get(table, {}))

    def sibling(self, namespace):
        return MemoryStore()
