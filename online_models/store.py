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

Example
-------
>>> store = MemoryStore()
>>> store.incr_rows("cooc", {"a": {"b": 1.0, "c": 2.0}})
>>> store.get_rows("cooc", ["a", "missing"])
[{'b': 1.0, 'c': 2.0}, {}]
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import contextmanager
from typing import Mapping, Sequence

import msgspec
import numpy as np

from schemas.keys import encode_id

Rows = Mapping[str, Mapping[str, float]]


def slack(keep_top: int) -> int:
    return max(1, keep_top // 10)


class StateStore(ABC):
    """Sparse rows and dense vectors by table and key."""

    @abstractmethod
    def get_rows(self, table: str, keys: Sequence[str]) -> list[dict[str, float]]:
        """Each key's row (``{}`` when absent). Read-only: copy before changing."""

    @abstractmethod
    def incr_rows(self, table: str, deltas: Rows, keep_top: int | None = None) -> None:
        """Add deltas to rows, then trim rows to ``keep_top`` (see module doc)."""

    @abstractmethod
    def set_rows(self, table: str, values: Rows, keep_top: int | None = None) -> None:
        """Overwrite members' scores, then trim."""

    @abstractmethod
    def replace_rows(self, table: str, rows: Rows, previous: Rows | None = None) -> None:
        """Make each given row exactly this mapping (atomically per row). ``previous``: the
        rows as read before the change, when only this writer touches them (partition-local
        state) — then only the difference is written."""

    @abstractmethod
    def claim(self, table: str, key: str, member: str, value: float) -> float:
        """Set ``member`` of row ``key`` to ``value`` unless it is set; return the stored value.
        Atomic and immediate even inside :meth:`RedisStore.deferred` (first writer wins)."""

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


def _trim_order(item: tuple[str, float]) -> tuple[float, bytes]:
    return item[1], item[0].encode("utf-8")


def trim_row(row: dict[str, float], keep_top: int) -> dict[str, float]:
    """The store's trim rule, for models that mirror a row between reads (in place)."""
    if len(row) > keep_top + (keep_top // 10 or 1):  # slack(keep_top), inlined: hot path
        for member, _ in sorted(row.items(), key=_trim_order)[:len(row) - keep_top]:
            del row[member]
    return row


def _add_float32(current: np.ndarray, delta: np.ndarray) -> np.ndarray:
    """``current + delta`` summed in float64 and rounded once to float32 — exactly what the
    Redis script computes (Lua numbers are doubles), so both stores agree bit for bit."""
    return (current.astype(np.float64) + delta.astype(np.float64)).astype(np.float32)


class MemoryStore(StateStore):
    """Dict-backed store for replay and tests. Not thread-safe."""

    def __init__(self) -> None:
        self.rows: dict[str, dict[str, dict[str, float]]] = {}
        self.vectors: dict[str, dict[str, np.ndarray]] = {}

    def get_rows(self, table, keys):
        # The live dicts, not copies (replay speed): callers must treat rows as read-only.
        rows = self.rows.get(table, {})
        empty: dict[str, float] = {}
        return [rows.get(k, empty) for k in keys]

    def incr_rows(self, table, deltas, keep_top=None):
        rows = self.rows.setdefault(table, {})
        for key, delta in deltas.items():
            row = rows.get(key)
            if row is None:
                rows[key] = row = {}
            get = row.get
            for member, value in delta.items():
                row[member] = get(member, 0.0) + value
            if keep_top is not None:
                trim_row(row, keep_top)

    def set_rows(self, table, values, keep_top=None):
        rows = self.rows.setdefault(table, {})
        for key, update in values.items():
            row = rows.get(key)
            if row is None:
                rows[key] = row = {}
            row.update(update)
            if keep_top is not None:
                trim_row(row, keep_top)

    def replace_rows(self, table, rows, previous=None):
        stored = self.rows.setdefault(table, {})
        for key, row in rows.items():
            stored[key] = dict(row)

    def claim(self, table, key, member, value):
        return self.rows.setdefault(table, {}).setdefault(key, {}).setdefault(member, value)

    def get_vectors(self, table, keys, dim):
        stored = self.vectors.get(table, {})
        out = np.zeros((len(keys), dim), dtype=np.float32)
        found = np.zeros(len(keys), dtype=bool)
        for i, key in enumerate(keys):
            vec = stored.get(key)
            if vec is not None:
                out[i], found[i] = vec, True
        return out, found

    def set_vectors(self, table, keys, vectors):
        stored = self.vectors.setdefault(table, {})
        for key, vec in zip(keys, np.asarray(vectors, dtype=np.float32)):
            stored[key] = vec.copy()

    def add_vectors(self, table, keys, deltas, base):
        stored = self.vectors.setdefault(table, {})
        deltas = np.asarray(deltas, dtype=np.float32)
        for key, delta, start in zip(keys, deltas, np.asarray(base, dtype=np.float32)):
            stored[key] = _add_float32(stored.get(key, start), delta)

    def row_count(self, table):
        return len(self.rows.get(table, {})) + len(self.vectors.get(table, {}))

    def sibling(self, namespace):
        return MemoryStore()


#: One call per table and batch. KEYS: the rows. ARGV: keep (-1: no trim), slack, and one
#: msgpack blob: per key, a flat [member, value, member, value, ...] array (one argument
#: instead of thousands: packing arguments was a third of the worker's CPU). OP: ZINCRBY|ZADD.
_WRITE_ROWS_LUA = """
local keep, slack = tonumber(ARGV[1]), tonumber(ARGV[2])
local rows = cmsgpack.unpack(ARGV[3])
for k = 1, #KEYS do
  local key, row = KEYS[k], rows[k]
  for i = 1, #row, 2 do
    redis.call('OP', key, row[i + 1], row[i])
  end
  if keep >= 0 then
    local size = redis.call('ZCARD', key)
    if size > keep + slack then
      redis.call('ZREMRANGEBYRANK', key, 0, size - keep - 1)
    end
  end
end
return 0
"""

#: KEYS: the rows. ARGV: one msgpack blob as above; each row becomes exactly its pairs.
_REPLACE_ROWS_LUA = """
local rows = cmsgpack.unpack(ARGV[1])
for k = 1, #KEYS do
  redis.call('DEL', KEYS[k])
  local row = rows[k]
  for i = 1, #row, 2 do
    redis.call('ZADD', KEYS[k], row[i + 1], row[i])
  end
end
return 0
"""

_CLAIM_LUA = """
redis.call('ZADD', KEYS[1], 'NX', ARGV[2], ARGV[1])
return redis.call('ZSCORE', KEYS[1], ARGV[1])
"""

#: KEYS: the rows. ARGV: one msgpack blob: per key, the members to remove.
_REMOVE_MEMBERS_LUA = """
local rows = cmsgpack.unpack(ARGV[1])
for k = 1, #KEYS do
  redis.call('ZREM', KEYS[k], unpack(rows[k]))
end
return 0
"""

#: KEYS: vector keys. ARGV: dimension, then per key its float32 delta and the float32 base to
#: start from when the key is missing. Adds in doubles, rounds once to float32.
_ADD_VECTORS_LUA = """
local fmt = '<' .. string.rep('f', tonumber(ARGV[1]))
for k = 1, #KEYS do
  local delta = {struct.unpack(fmt, ARGV[2 * k])}
  local current = redis.call('GET', KEYS[k])
  local start = current or ARGV[2 * k + 1]
  local sum
  if start ~= '' then
    sum = {struct.unpack(fmt, start)}
  else
    sum = {}
    for i = 1, #delta - 1 do sum[i] = 0 end
  end
  for i = 1, #delta - 1 do sum[i] = sum[i] + delta[i] end
  redis.call('SET', KEYS[k], struct.pack(fmt, unpack(sum, 1, #delta - 1)))
end
return 0
"""

#: KEYS: the rows. Returns each row as a flat member, score array (scores as strings: exact).
_READ_ROWS_LUA = """
local out = {}
for k = 1, #KEYS do
  out[k] = redis.call('ZRANGE', KEYS[k], 0, -1, 'WITHSCORES')
end
return out
"""


def _rows_blob(rows: Rows) -> bytes:
    """The scripts' msgpack layout: per row, a flat [member, value, ...] array."""
    return _msgpack(
        [[x for member, value in row.items() for x in (member, float(value))]
         for row in rows.values()])


_msgpack = msgspec.msgpack.Encoder().encode


def queue_script(pipe, script, keys: list[str], args: list) -> None:
    """Queue a registered script on a pipeline or MULTI transaction as EVALSHA; the pipeline
    loads the script on execute if the server lacks it."""
    pipe.scripts.add(script)
    pipe.evalsha(script.sha, len(keys), *keys, *args)


class RedisStore(StateStore):
    """Rows as sorted sets, vectors as float32 strings; one script call (or MGET/MSET) per
    table and batch.

    Keys: ``<prefix>:m:<namespace>:<table>:{<encoded key>}`` — each row is its own hash tag.
    A batch call touches many rows in one script, so all of a store's keys must live on one
    Redis primary (the exactly-once worker needs that anyway: see :mod:`stream.state`).
    ``row_count`` uses SCAN with a fixed, code-built pattern (never user input).
    """

    def __init__(self, client, prefix: str = "sr", namespace: str = "default") -> None:
        self.client = client
        self.prefix = prefix
        self.base = f"{prefix}:m:{encode_id(namespace)}"
        self._deferred = None
        self._incr = client.register_script(_WRITE_ROWS_LUA.replace("OP", "ZINCRBY"))
        self._set = client.register_script(_WRITE_ROWS_LUA.replace("OP", "ZADD"))
        self._replace = client.register_script(_REPLACE_ROWS_LUA)
        self._read = client.register_script(_READ_ROWS_LUA)
        self._claim = client.register_script(_CLAIM_LUA)
        self._remove = client.register_script(_REMOVE_MEMBERS_LUA)
        self._add_vectors = client.register_script(_ADD_VECTORS_LUA)

    def key(self, table: str, key: str) -> str:
        return f"{self.base}:{table}:{{{encode_id(key)}}}"

    @contextmanager
    def deferred(self, pipe):
        """Queue writes on ``pipe`` (e.g. a MULTI/EXEC transaction) instead of executing them;
        reads still go to the server. Not thread-safe: one deferral at a time."""
        self._deferred = pipe
        try:
            yield self
        finally:
            self._deferred = None

    def _run(self, script, keys: list[str], args: list) -> None:
        if not keys:
            return
        if self._deferred is not None:
            queue_script(self._deferred, script, keys, args)
        else:
            script(keys=keys, args=args)

    def get_rows(self, table, keys):
        if not keys:
            return []
        raw = self._read(keys=[self.key(table, k) for k in keys])
        return [{flat[i].decode(): float(flat[i + 1]) for i in range(0, len(flat), 2)}
                for flat in raw]

    def _write(self, script, table, rows, keep_top):
        head = [-1, 0] if keep_top is None else [keep_top, slack(keep_top)]
        self._run(script, [self.key(table, k) for k in rows], [*head, _rows_blob(rows)])

    def incr_rows(self, table, deltas, keep_top=None):
        self._write(self._incr, table, deltas, keep_top)

    def set_rows(self, table, values, keep_top=None):
        self._write(self._set, table, values, keep_top)

    def replace_rows(self, table, rows, previous=None):
        if previous is None:
            self._run(self._replace, [self.key(table, k) for k in rows], [_rows_blob(rows)])
            return
        changed: dict[str, dict[str, float]] = {}
        removed: dict[str, list[str]] = {}
        for key, row in rows.items():
            before = previous.get(key, {})
            diff = {m: v for m, v in row.items() if before.get(m) != v}
            if diff:
                changed[key] = diff
            gone = [m for m in before if m not in row]
            if gone:
                removed[key] = gone
        if changed:
            self._write(self._set, table, changed, None)
        if removed:
            self._run(self._remove, [self.key(table, k) for k in removed],
                      [_msgpack(list(removed.values()))])

    def claim(self, table, key, member, value):
        return float(self._claim(keys=[self.key(table, key)], args=[member, repr(float(value))]))

    def get_vectors(self, table, keys, dim):
        raw = self.client.mget([self.key(table, k) for k in keys]) if keys else []
        out = np.zeros((len(keys), dim), dtype=np.float32)
        found = np.zeros(len(keys), dtype=bool)
        for i, value in enumerate(raw):
            if value is not None:
                out[i], found[i] = np.frombuffer(value, dtype=np.float32), True
        return out, found

    def set_vectors(self, table, keys, vectors):
        if not len(keys):
            return
        vectors = np.asarray(vectors, dtype=np.float32)
        mapping = {self.key(table, k): v.tobytes() for k, v in zip(keys, vectors)}
        (self._deferred or self.client).mset(mapping)

    def add_vectors(self, table, keys, deltas, base):
        deltas = np.asarray(deltas, dtype=np.float32)
        base = np.asarray(base, dtype=np.float32)
        args: list = [deltas.shape[1] if deltas.ndim == 2 else 0]
        for delta, start in zip(deltas, base):
            args += (delta.tobytes(), start.tobytes())
        self._run(self._add_vectors, [self.key(table, k) for k in keys], args)

    def sibling(self, namespace):
        return RedisStore(self.client, self.prefix, namespace)

    def row_count(self, table):
        pattern = f"{self.base}:{table}:{{*"
        return sum(1 for _ in self.client.scan_iter(match=pattern, count=1000))
