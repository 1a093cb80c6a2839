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
from itertools import chain
from typing import Mapping, Sequence

import msgspec
import numpy as np
import redis
from hiredis import pack_command

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

    def forget_cached(self) -> None:
        """Drop cached local rows and vectors (after a failed commit or when partitions move)."""

    @abstractmethod
    def claim(self, table: str, key: str, member: str, value: float) -> float:
        """Set ``member`` of row ``key`` to ``value`` unless it is set; return the stored value.
        Atomic and immediate even inside :meth:`RedisStore.deferred` (first writer wins). A
        claimed value never changes: the Redis store remembers it."""

    def prefetch_vectors(self, table: str, keys: Sequence[str]) -> None:
        """Read these vectors now; the next :meth:`get_vectors` of ``table`` takes them from
        here (a worker reads before starting the previous batch's commit, computes after)."""

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

    get_local_vectors = get_vectors
    set_local_vectors = set_vectors

    def row_count(self, table):
        return len(self.rows.get(table, {})) + len(self.vectors.get(table, {}))

    def sibling(self, namespace):
        return MemoryStore()


#: One call per table and batch. KEYS: the rows. ARGV: keep (-1: no trim), slack, one
#: msgpack blob: per key, a {member: value} map (one argument instead of thousands: packing
#: arguments was a third of the worker's CPU), and the TTL in ms (0: none). Members are
#: independent, so map order does not matter. OP: ZINCRBY|ZADD.
_WRITE_ROWS_LUA = """
local keep, slack, ttl = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[4])
local rows = cmsgpack.unpack(ARGV[3])
for k = 1, #KEYS do
  local key = KEYS[k]
  for member, value in pairs(rows[k]) do
    redis.call('OP', key, value, member)
  end
  if keep >= 0 then
    local size = redis.call('ZCARD', key)
    if size > keep + slack then
      redis.call('ZREMRANGEBYRANK', key, 0, size - keep - 1)
    end
  end
  if ttl > 0 then redis.call('PEXPIRE', key, ttl) end
end
return 0
"""

#: KEYS: string keys. ARGV: TTL in ms, then one value per key. SET with PX (MSET has none).
_SET_EXPIRING_LUA = """
local ttl = ARGV[1]
for k = 1, #KEYS do
  redis.call('SET', KEYS[k], ARGV[k + 1], 'PX', ttl)
end
return 0
"""

_CLAIM_LUA = """
redis.call('ZADD', KEYS[1], 'NX', ARGV[2], ARGV[1])
if tonumber(ARGV[3]) > 0 then redis.call('PEXPIRE', KEYS[1], ARGV[3]) end
return redis.call('ZSCORE', KEYS[1], ARGV[1])
"""

#: KEYS: vector keys. ARGV: dimension, the keys' float32 deltas back to back, the float32
#: bases to start from where a key is missing, and the TTL in ms (0: none). Adds in doubles,
#: rounds once to float32.
_ADD_VECTORS_LUA = """
local dim, ttl = tonumber(ARGV[1]), tonumber(ARGV[4])
local fmt, width = '<' .. string.rep('f', dim), 4 * dim
for k = 1, #KEYS do
  local at = (k - 1) * width + 1
  local delta = {struct.unpack(fmt, string.sub(ARGV[2], at, at + width - 1))}
  local start = redis.call('GET', KEYS[k]) or string.sub(ARGV[3], at, at + width - 1)
  local sum = {struct.unpack(fmt, start)}
  for i = 1, dim do sum[i] = sum[i] + delta[i] end
  redis.call('SET', KEYS[k], struct.pack(fmt, unpack(sum, 1, dim)))
  if ttl > 0 then redis.call('PEXPIRE', KEYS[k], ttl) end
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
    """The scripts' msgpack layout: the rows' {member: value} maps, in key order."""
    return _msgpack(list(rows.values()))


def _plain_number(value):
    """msgpack fallback for numpy scalars (scores may come straight from numpy maths)."""
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot store a {type(value).__name__} as a score")


_msgpack = msgspec.msgpack.Encoder(enc_hook=_plain_number).encode
_KEY_NAMES_PER_TABLE = 1 << 18  # a table's remembered key names are dropped past this
_ABSENT = np.empty(0, np.float32)  # a cached vector known not to exist
_decode_row = msgspec.msgpack.Decoder(dict[str, float]).decode


def queue_script(pipe, script, keys: list[str], args: list) -> None:
    """Queue a registered script on a pipeline, MULTI transaction or :class:`WriteBatch` as
    EVALSHA; the pipeline loads the script on execute if the server lacks it."""
    pipe.scripts.add(script)
    pipe.evalsha(script.sha, len(keys), *keys, *args)


class WriteBatch:
    """Write commands recorded as Redis protocol arguments — the subset of redis-py's client
    methods the stores and the live state use — and sent later as one MULTI/EXEC
    (:meth:`commit`). A batch's state change is computed and packed on one thread and
    committed on another, which then only sends bytes and waits for Redis."""

    def __init__(self) -> None:
        self.commands: list[tuple] = []
        self.scripts: set = set()  # registered scripts the EVALSHAs need (queue_script)
        self._packed: bytes | None = None

    def _add(self, *command) -> None:
        self.commands.append(command)
        self._packed = None

    def delete(self, *keys) -> None:
        self._add("DEL", *keys)

    def evalsha(self, sha: str, numkeys: int, *args) -> None:
        self._add("EVALSHA", sha, numkeys, *args)

    def expire(self, key, seconds: int) -> None:
        self._add("EXPIRE", key, seconds)

    def hincrby(self, key, field, amount: int = 1) -> None:
        self._add("HINCRBY", key, field, amount)

    def mset(self, mapping: Mapping) -> None:
        self._add("MSET", *chain.from_iterable(mapping.items()))

    def sadd(self, key, *members) -> None:
        self._add("SADD", key, *members)

    def set(self, key, value) -> None:
        self._add("SET", key, value)

    def zadd(self, key, mapping: Mapping, nx: bool = False) -> None:
        pairs = chain.from_iterable((score, member) for member, score in mapping.items())
        self._add("ZADD", key, *(("NX",) if nx else ()), *pairs)

    def zremrangebyrank(self, key, start: int, end: int) -> None:
        self._add("ZREMRANGEBYRANK", key, start, end)

    def packed(self) -> bytes:
        """MULTI, the commands and EXEC in the Redis protocol (floats keep every digit); packed
        once, so the thread that computed the batch can pack it for the one that commits."""
        if self._packed is None:
            self._packed = b"".join(pack_command(command)
                                    for command in (("MULTI",), *self.commands, ("EXEC",)))
        return self._packed

    def commit(self, client, watch: list[str], expect: list[bytes | None]) -> bool:
        """WATCH ``watch``; if their values equal ``expect``, send the batch and EXEC. False —
        nothing written — if a value differs or a watched key changes before EXEC; raises the
        first error a command met (as redis-py does)."""
        pool = client.connection_pool
        connection = pool.get_connection()
        try:
            missing = [script for script, known in zip(
                self.scripts, self._call(connection, "SCRIPT", "EXISTS",
                                         *(script.sha for script in self.scripts))
                if self.scripts else []) if not known]
            for script in missing:  # Redis restarted or flushed its scripts
                self._call(connection, "SCRIPT", "LOAD", script.script)
            self._call(connection, "WATCH", *watch)
            if self._call(connection, "MGET", *watch) != expect:
                self._call(connection, "UNWATCH")
                return False
            connection.send_packed_command([self.packed()])
            for _ in range(len(self.commands) + 1):  # +OK, then +QUEUED per command
                connection.read_response()
            replies = connection.read_response()
        except BaseException:
            connection.disconnect()  # its protocol state is unknown
            raise
        finally:
            pool.release(connection)
        if replies is None:
            return False  # a watched key changed
        for reply in replies:
            if isinstance(reply, redis.ResponseError):
                raise reply
        return True

    @staticmethod
    def _call(connection, *args):
        connection.send_command(*args)
        return connection.read_response()


class RedisStore(StateStore):
    """Rows as sorted sets, local rows as msgpack strings, vectors as float32 strings; one
    script call (or MGET/MSET) per table and batch.

    ``cache_local_rows=N`` keeps up to ``N`` local rows (and local vectors) per table in
    memory, absent ones included (least recently loaded or written evicted first), so the
    worker that owns them reads them without a round trip; the owner calls
    :meth:`forget_cached` when a commit fails or partitions move. Readers that do not own the
    rows (serving) leave it at 0.

    Every write sets its key's TTL afresh: ``local_ttl_s`` for local rows and vectors (state
    of a user or session), ``shared_ttl_s`` for the rest (item-side state); 0 keeps keys
    forever. Keys with a TTL are what Redis's ``volatile-lru`` policy may evict, coldest first,
    when memory runs short (``infra/redis.conf``).

    Keys: ``<prefix>:m:<namespace>:<table>:{<encoded key>}`` — each row is its own hash tag.
    A batch call touches many rows in one script, so all of a store's keys must live on one
    Redis primary (the exactly-once worker needs that anyway: see :mod:`stream.state`).
    ``row_count`` uses SCAN with a fixed, code-built pattern (never user input).
    """

    def __init__(self, client, prefix: str = "sr", namespace: str = "default",
                 cache_local_rows: int = 0, local_ttl_s: float = 0,
                 shared_ttl_s: float = 0) -> None:
        self.client = client
        self.cache_local_rows = cache_local_rows
        self.local_ttl_ms, self.shared_ttl_ms = int(local_ttl_s * 1000), int(shared_ttl_s * 1000)
        self._local_cache: dict[str, dict] = {}
        self._prefetched: dict[str, dict[str, bytes | None]] = {}
        self._claimed: dict[tuple[str, str, str], float] = {}
        self._key_names: dict[str, dict[str, str]] = {}
        self.prefix = prefix
        self.base = f"{prefix}:m:{encode_id(namespace)}"
        self._deferred = None
        self._incr = client.register_script(_WRITE_ROWS_LUA.replace("OP", "ZINCRBY"))
        self._set = client.register_script(_WRITE_ROWS_LUA.replace("OP", "ZADD"))
        self._read = client.register_script(_READ_ROWS_LUA)
        self._claim = client.register_script(_CLAIM_LUA)
        self._add_vectors = client.register_script(_ADD_VECTORS_LUA)
        self._set_expiring = client.register_script(_SET_EXPIRING_LUA)

    def key(self, table: str, key: str) -> str:
        return self.keys(table, [key])[0]

    def keys(self, table: str, keys) -> list[str]:
        """:meth:`key` of each of ``keys`` (remembered: the worker names the same rows over
        and over, and a lookup costs 40 % of building one)."""
        known = self._key_names.get(table)
        if known is None or len(known) > _KEY_NAMES_PER_TABLE:
            known = self._key_names[table] = {}
        head = f"{self.base}:{table}:{{"
        names = []
        for k in keys:
            name = known.get(k)
            if name is None:
                name = known[k] = f"{head}{encode_id(k)}}}"
            names.append(name)
        return names

    @contextmanager
    def deferred(self, pipe):
        """Queue writes on ``pipe`` (a MULTI/EXEC transaction or a :class:`WriteBatch`) instead
        of executing them; reads still go to the server. Not thread-safe: one at a time."""
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
        names = self.keys(table, keys)
        try:  # the read-only variant: readers holding only read access may run it (ACLs)
            raw = self.client.evalsha_ro(self._read.sha, len(names), *names)
        except redis.exceptions.NoScriptError:  # Redis restarted or flushed its scripts
            self.client.script_load(self._read.script)
            raw = self.client.evalsha_ro(self._read.sha, len(names), *names)
        return [{flat[i].decode(): float(flat[i + 1]) for i in range(0, len(flat), 2)}
                for flat in raw]

    def _write(self, script, table, rows, keep_top):
        head = [-1, 0] if keep_top is None else [keep_top, slack(keep_top)]
        self._run(script, self.keys(table, rows), [*head, _rows_blob(rows), self.shared_ttl_ms])

    def incr_rows(self, table, deltas, keep_top=None):
        self._write(self._incr, table, deltas, keep_top)

    def set_rows(self, table, values, keep_top=None):
        self._write(self._set, table, values, keep_top)

    def get_local_rows(self, table, keys):
        if not self.cache_local_rows:
            return self._read_local(table, keys)
        return self._cached(table, keys, self._read_local)

    def prefetch_local_rows(self, table, keys):
        if self.cache_local_rows:
            self._cached(table, keys, self._read_local)

    def _mget(self, table, keys) -> list[bytes | None]:
        return self.client.mget(self.keys(table, keys)) if keys else []

    def _read_local(self, table, keys):
        return [_decode_row(value) if value is not None else {}
                for value in self._mget(table, keys)]

    def _read_vectors(self, table, keys):
        """Raw vectors, absent ones as an empty array (cached: known to be absent)."""
        return [np.frombuffer(value, np.float32).copy() if value is not None else _ABSENT
                for value in self._mget(table, keys)]

    def _cached(self, table, keys, read_missing) -> list:
        """The cached values of ``keys``, reading (and caching) the missing ones."""
        cache = self._local_cache.setdefault(table, {})
        values = [cache.get(k) for k in keys]
        missing = [n for n, value in enumerate(values) if value is None]
        if missing:
            for n, value in zip(missing, read_missing(table, [keys[n] for n in missing])):
                values[n] = self._remember(cache, keys[n], value)
        return values

    def _remember(self, cache, key, value):
        cache.pop(key, None)  # re-insert: eviction takes the least recently stored first
        cache[key] = value
        if len(cache) > self.cache_local_rows:
            del cache[next(iter(cache))]
        return value

    def set_local_rows(self, table, rows):
        if not rows:
            return
        target = self._deferred or self.client
        names = list(zip(self.keys(table, rows), rows.values()))
        present = {name: _msgpack(row) for name, row in names if row}
        absent = [name for name, row in names if not row]
        if present:
            self._set_strings(present, self.local_ttl_ms)
        if absent:
            target.delete(*absent)
        if self.cache_local_rows:
            cache = self._local_cache.setdefault(table, {})
            for key, row in rows.items():
                self._remember(cache, key, row)

    def get_local_vectors(self, table, keys, dim):
        if not self.cache_local_rows:
            return self.get_vectors(table, keys, dim)
        values = self._cached(table, keys, self._read_vectors)
        found = np.fromiter((value.size > 0 for value in values), bool, len(keys))
        out = np.zeros((len(keys), dim), dtype=np.float32)
        if found.any():
            out[found] = np.stack([value for value in values if value.size])
        return out, found

    def prefetch_local_vectors(self, table, keys):
        if self.cache_local_rows:
            self._cached(table, keys, self._read_vectors)

    def set_local_vectors(self, table, keys, vectors):
        self._store_vectors(table, keys, vectors, self.local_ttl_ms)
        if self.cache_local_rows:
            cache = self._local_cache.setdefault(table, {})
            for key, vector in zip(keys, np.asarray(vectors, dtype=np.float32)):
                self._remember(cache, key, vector.copy())  # not a view pinning the batch

    def forget_cached(self):
        self._local_cache.clear()
        self._prefetched.clear()
        self._claimed.clear()

    def claim(self, table, key, member, value):
        cached = self._claimed.get((table, key, member))
        if cached is None:
            cached = float(self._claim(keys=[self.key(table, key)],
                                       args=[member, repr(float(value)), self.shared_ttl_ms]))
            self._claimed[(table, key, member)] = cached
        return cached

    def prefetch_vectors(self, table, keys):
        self._prefetched[table] = dict(zip(keys, self._mget(table, keys)))

    def get_vectors(self, table, keys, dim):
        prefetched = self._prefetched.pop(table, None)
        if prefetched is None:  # serving reads whole catalogues: no dict on the way
            raw = self._mget(table, keys)
        else:
            missing = [k for k in keys if k not in prefetched]
            prefetched.update(zip(missing, self._mget(table, missing)))
            raw = [prefetched[k] for k in keys]
        out = np.zeros((len(keys), dim), dtype=np.float32)
        found = np.zeros(len(keys), dtype=bool)
        for i, value in enumerate(raw):
            if value is not None:
                out[i], found[i] = np.frombuffer(value, dtype=np.float32), True
        return out, found

    def set_vectors(self, table, keys, vectors):
        self._store_vectors(table, keys, vectors, self.shared_ttl_ms)

    def _store_vectors(self, table, keys, vectors, ttl_ms: int) -> None:
        if not len(keys):
            return
        vectors = np.asarray(vectors, dtype=np.float32)
        self._set_strings(dict(zip(self.keys(table, keys), [v.tobytes() for v in vectors])),
                          ttl_ms)

    def _set_strings(self, mapping: dict[str, bytes], ttl_ms: int) -> None:
        """MSET, or SET with PX per key (one script call) when keys expire."""
        if ttl_ms:
            self._run(self._set_expiring, list(mapping), [ttl_ms, *mapping.values()])
        else:
            (self._deferred or self.client).mset(mapping)

    def add_vectors(self, table, keys, deltas, base):
        deltas = np.ascontiguousarray(deltas, dtype=np.float32)
        base = np.ascontiguousarray(base, dtype=np.float32)
        if not len(keys) or deltas.shape[1] == 0:
            return
        self._run(self._add_vectors, self.keys(table, keys),
                  [deltas.shape[1], deltas.tobytes(), base.tobytes(), self.shared_ttl_ms])

    def sibling(self, namespace):
        return RedisStore(self.client, self.prefix, namespace, self.cache_local_rows,
                          self.local_ttl_ms / 1000, self.shared_ttl_ms / 1000)

    def row_count(self, table):
        pattern = f"{self.base}:{table}:{{*"
        return sum(1 for _ in self.client.scan_iter(match=pattern, count=1000))
