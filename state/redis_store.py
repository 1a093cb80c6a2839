"""The Redis state store and the write batches the worker commits in one transaction.

:class:`RedisStore` implements :class:`online_models.store.StateStore` on Redis with the same
semantics as the memory store (rows as sorted sets, local rows as msgpack strings, vectors as
float32 strings); :class:`WriteBatch` records writes as Redis protocol for one MULTI/EXEC.
Models never import this module: the worker and serving bind them to it
(:func:`build_on_redis`).
"""

from __future__ import annotations

import logging
import threading
import time
import zlib
from contextlib import contextmanager
from itertools import chain, islice
from typing import Callable, Iterable, Mapping, NamedTuple

import msgspec
import numpy as np
import redis

from infra.redis_client import (ReplicaWait, by_slot, is_cluster, mget_any, pack, send_per_node,
                                send_and_wait, slot_of)
from online_models.base import OnlineModel
from online_models.registry import build_live
from online_models.store import Rows, StateStore, slack
from schemas.keys import RedisKeys, encode_id


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

#: KEYS: the rows. ARGV: one msgpack blob — per key a {member: score} map where ``false``
#: means "remove" — and the TTL in ms (0: none). Scores are absolute: the rows' one writer
#: (:mod:`state.write_back`) sends what it holds.
_OVERWRITE_ROWS_LUA = """
local ttl = tonumber(ARGV[2])
local rows = cmsgpack.unpack(ARGV[1])
for k = 1, #KEYS do
  local key = KEYS[k]
  for member, value in pairs(rows[k]) do
    if value == false then
      redis.call('ZREM', key, member)
    else
      redis.call('ZADD', key, value, member)
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


#: On a Redis Cluster, model keys carry one of this many hash tags (slots): enough to spread
#: over hundreds of primaries, few enough that a batch's writes are a few calls per table.
CLUSTER_KEY_BUCKETS = 256

#: Scripts a cluster commit's redo record may name (besides the worker's own).
CLUSTER_WRITE_SCRIPTS = (_SET_EXPIRING_LUA, _OVERWRITE_ROWS_LUA)


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
_decode_commands = msgspec.msgpack.Decoder(list[tuple]).decode  # a redo record's commands
log = logging.getLogger(__name__)


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

    def hdel(self, key, *fields) -> None:
        self._add("HDEL", key, *fields)

    def hincrby(self, key, field, amount: int = 1) -> None:
        self._add("HINCRBY", key, field, amount)

    def hset(self, key, mapping: Mapping) -> None:
        self._add("HSET", key, *chain.from_iterable(mapping.items()))

    def mset(self, mapping: Mapping) -> None:
        self._add("MSET", *chain.from_iterable(mapping.items()))

    def sadd(self, key, *members) -> None:
        self._add("SADD", key, *members)

    def srem(self, key, *members) -> None:
        self._add("SREM", key, *members)

    def set(self, key, value, px: int | None = None) -> None:
        self._add("SET", key, value, *(("PX", px) if px else ()))

    def pexpire(self, key, milliseconds: int) -> None:
        self._add("PEXPIRE", key, milliseconds)

    def pexpireat(self, key, when_ms: int) -> None:
        self._add("PEXPIREAT", key, when_ms)

    def zrem(self, key, *members) -> None:
        self._add("ZREM", key, *members)

    def zadd(self, key, mapping: Mapping, nx: bool = False) -> None:
        pairs = chain.from_iterable((score, member) for member, score in mapping.items())
        self._add("ZADD", key, *(("NX",) if nx else ()), *pairs)

    def zremrangebyrank(self, key, start: int, end: int) -> None:
        self._add("ZREMRANGEBYRANK", key, start, end)

    def packed(self) -> bytes:
        """MULTI, the commands and EXEC in the Redis protocol (floats keep every digit); packed
        once, so the thread that computed the batch can pack it for the one that commits."""
        if self._packed is None:
            self._packed = b"".join(pack(command)
                                    for command in (("MULTI",), *self.commands, ("EXEC",)))
        return self._packed

    def commit(self, client, watch: list[str], expect: list[bytes | None],
               present: Mapping[str, Iterable[str]] | None = None,
               wait: ReplicaWait | None = None) -> bool:
        """WATCH ``watch``; if their values equal ``expect`` (and every field of ``present``,
        hash key → fields, exists), send the batch and EXEC. False — nothing written — if a
        value differs, a field is missing or a watched key changes before EXEC; raises the
        first error a command met (as redis-py does). ``wait``: True only once replicas
        acknowledged the transaction (:class:`infra.redis_client.ReplicaWait`)."""
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
            checks = [("MGET", *watch), *(("HMGET", key, *fields)
                                          for key, fields in (present or {}).items())]
            connection.send_packed_command(connection.pack_commands(checks))  # one round trip
            values, *fields_found = [connection.read_response() for _ in checks]
            if values != expect or any(None in found for found in fields_found):
                self._call(connection, "UNWATCH")
                return False
            connection.send_packed_command([self.packed()])
            for _ in range(len(self.commands) + 1):  # +OK, then +QUEUED per command
                connection.read_response()
            replies = connection.read_response()
            if wait is not None and replies is not None:
                wait.until_acknowledged(connection, self._call(connection, *wait.command))
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

    def commit_with_redo(self, client, watch: list[str], expect: list[bytes | None],
                         redo_key: str, seq: int, scripts, window_s: float,
                         claim: Claim | None = None, wait: ReplicaWait | None = None) -> bool:
        """:meth:`commit` for a Redis Cluster, where one transaction holds one slot: WATCH
        ``watch`` (in ``redo_key``'s slot); if their values equal ``expect``, write in one
        MULTI/EXEC the commands of that slot and the redo record ``redo_key`` = {seq, the
        other commands}, then apply those (:func:`apply_commands`). False: nothing written.
        If the apply fails the record stays, and the writer applies it again before its next
        batch: every command in it must be an overwrite or guarded by ``seq``. ``claim``
        (its key in the same slot) is WATCHed too: where another process claimed the
        partition, nothing is written and :class:`PartitionClaimed` raised. The writes to
        other nodes are sent within ``window_s`` of the WATCH or not at all
        (:class:`ClaimWindowPassed`: the redo record holds them). ``wait``: the record
        replicated before the other writes go out, and True only once every node written
        acknowledged them (:func:`_send_recorded`)."""
        started = time.monotonic()  # before the claim is read: its window starts no later
        if claim is not None:
            watch, expect = [*watch, claim.key], [*expect, claim.writer_id]
        slot = slot_of(redo_key)
        local, remote = [], []
        for command in self.commands:
            (local if slot_of(_first_key(command)) == slot else remote).append(command)
        try:
            with client.pipeline(transaction=True) as tx:
                tx.watch(*watch)
                if [tx.get(key) for key in watch] != expect:  # MGET: blocked here
                    tx.unwatch()
                    return _not_written(client, claim)
                tx.multi()
                if claim is not None:  # when it was last checked, for the next claimer
                    tx.pexpire(claim.key, CLAIM_TOUCH_MS)
                tx.hset(redo_key, mapping={"seq": seq, "commands": _msgpack(remote)})
                for command in local:
                    tx.execute_command(*command)
                tx.execute()
        except redis.WatchError:
            return _not_written(client, claim)
        _send_recorded(client, redo_key, seq, remote,
                       [*scripts, *(script.script for script in self.scripts)],
                       _within_window(window_s, started, claim), wait)
        return True

    @staticmethod
    def _call(connection, *args):
        connection.send_command(*args)
        return connection.read_response()


class PartitionClaimed(RuntimeError):
    """Owned layout on a Redis Cluster: the group assigned a partition this process was
    writing (a source partition, or an item partition as its owner) to another worker, which
    claimed it (:func:`claim_partitions`). This process was evicted without knowing (frozen
    past the session timeout, say) and must write none of it again: the worker exits."""


class ClaimWindowPassed(redis.exceptions.TimeoutError):
    """A commit's writes to other Redis Cluster nodes could not be sent within the claim
    window (``STREAMREC_CLUSTER_CLAIM_WINDOW_S``) of the check that this process was the
    writer (its claim, or the single writer's lease): it was frozen, or Redis stalled (a
    primary failing over), and another worker may be the writer now, writing newer rows.
    Nothing is sent (the redo record holds the writes). Transient, as a Redis timeout: the
    caller forgets what it had not committed and tries again, and the next try checks again
    that this process is the writer before sending anything (it applies the redo record as
    the writer): :class:`PartitionClaimed` where another worker claimed the partition."""


class Claim(NamedTuple):
    """A partition's writer key, the process that must hold it for a commit to be written,
    and the partition's name (for the error)."""

    key: str
    writer_id: bytes
    partition: str


def _within_window(window_s: float, checked: float,
                   claim: Claim | None = None) -> Callable[[], None]:
    """What must hold just before writes checked at ``checked`` (monotonic) against
    ``claim`` (or the single writer's lease) are sent: still inside the claim window, else
    :class:`ClaimWindowPassed`."""
    def check() -> None:
        late = time.monotonic() - checked
        if late > window_s:
            raise ClaimWindowPassed(
                f"{claim.partition if claim else 'the single writer'}: writes to other nodes "
                f"not sent within {window_s:g} s of the check that this process is the writer "
                f"({late:.1f} s: frozen, or Redis stalled); another worker may be the writer "
                f"now, so none is sent (the redo record holds them)")
    return check


_RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


#: A claim key's expiry, set again by every check of the claim that may be followed by writes
#: (a commit's transaction, a redo record's replay): what is left of it tells the next
#: claimer how long ago its holder last checked, on Redis's clock. Far longer than any idle
#: spell: it never lapses. Never change it: a claimer dates an older version's touch with it.
CLAIM_TOUCH_MS = 100 * 365 * 86_400_000

#: KEYS: a writer key. ARGV: the claiming process's id, CLAIM_TOUCH_MS. Claims the partition
#: and returns its previous holder with what was left of its expiry (-1: none), read at once.
_TAKE_LUA = """
local left = redis.call('PTTL', KEYS[1])
local before = redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2], 'GET')
return {before, left}
"""

#: KEYS: a writer key. ARGV: the process's id, CLAIM_TOUCH_MS. Claims the partition where no
#: process has; the holder's expiry set again where it is this process; returns the holder.
_CHECK_LUA = """
local holder = redis.call('GET', KEYS[1])
if not holder then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return ARGV[1]
end
if holder == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return holder
"""


def touched_ago_ms(expiry_ms: int, left_ms: int) -> int | None:
    """How long ago a key's expiry was last set to ``expiry_ms``, on Redis's clock, from what
    is left of it (``left_ms``, its PTTL: whole ms, rounded down, so the touch may be up to
    1 ms more recent: counted so); None where the key has no expiry."""
    return None if left_ms < 0 else max(0, expiry_ms - left_ms - 1)


def claim_partitions(client, writer_keys: list[str], writer_id: bytes,
                     wait_s: float = 0.0) -> None:
    """Make the process ``writer_id`` the writer of the partitions whose writer keys these
    are (a worker, when the group assigns it them; ids are unique to a process). Where
    another process held one and did not release it (:func:`release_partitions`: it
    crashed, or was evicted without knowing and may be frozen mid-commit), wait until
    ``wait_s`` (the claim window) has passed since it last checked its claim: a write it
    checked before this claim is sent by then, or never (:class:`ClaimWindowPassed`). A
    holder that crashed a session timeout ago costs no wait."""
    sha = client.register_script(_TAKE_LUA).sha
    replies = apply_commands(client, [("EVALSHA", sha, 1, key, writer_id, CLAIM_TOUCH_MS)
                                      for key in writer_keys], [_TAKE_LUA])
    waits = {}  # key → ms left of its holder's window
    for key, (holder, left) in zip(writer_keys, replies):
        # this process's own claim (a retried claim, or one whose release failed) needs no
        # wait: its writes finished before it gave the partition up, or it exited
        if holder is not None and holder != writer_id:
            checked_ago_ms = touched_ago_ms(CLAIM_TOUCH_MS, left) or 0  # no expiry: unknown
            waits[key] = 1000 * wait_s - checked_ago_ms
    if not waits:
        return
    wait = max(max(waits.values()), 0.0) / 1000
    log.warning("claimed %d partitions another process had not given up (%s…): %s",
                len(waits), next(iter(waits)),
                f"waiting {wait:.2f} s, until nothing it checked against its claim can still be "
                "sent" if wait else "it last checked its claim longer ago than the claim "
                "window: no wait")
    time.sleep(wait)


def release_partitions(client, writer_keys: list[str], writer_id: bytes) -> None:
    """Give up the partitions whose writer keys these are, where ``writer_id`` still holds
    them (a worker before a rebalance, once everything it wrote is in Redis): their next
    writer need not wait (:func:`claim_partitions`). One write per node."""
    sha = client.register_script(_RELEASE_LUA).sha
    apply_commands(client, [("EVALSHA", sha, 1, key, writer_id) for key in writer_keys],
                   [_RELEASE_LUA])


def replay_redo(client, redo_key: str, scripts: list[str], window_s: float,
                claim: Claim | None = None, checked: float | None = None,
                wait: ReplicaWait | None = None) -> tuple[dict, list[tuple]]:
    """Apply the redo record at ``redo_key`` again (every write in it is an overwrite or
    guarded by its seq): the record and its commands. As the writer: with a ``claim``,
    claimed first where no process has, :class:`PartitionClaimed` where another holds it;
    the writes sent within ``window_s`` of that check (or of ``checked``, monotonic: when the
    caller checked it is the writer); ``wait``: as :meth:`WriteBatch.commit_with_redo`."""
    checked = time.monotonic() if checked is None else checked
    if claim is not None:  # one round trip: claimed where unclaimed (or touched), its holder
        _check_holder(claim, client.register_script(_CHECK_LUA)(
            keys=[claim.key], args=[claim.writer_id, CLAIM_TOUCH_MS]))
    record = client.hgetall(redo_key)
    commands = _decode_commands(record[b"commands"]) if record else []
    if commands:
        _send_recorded(client, redo_key, record[b"seq"], commands, scripts,
                       _within_window(window_s, checked, claim), wait)
    return record, commands


def _send_recorded(client, redo_key: str, seq, commands: list[tuple], scripts: list[str],
                   before_send: Callable[[], None], wait: ReplicaWait | None) -> None:
    """Send the commands of the redo record at ``redo_key`` (numbered ``seq``) to their
    nodes. ``wait``: only once replicas acknowledged the record (its seq written again, and
    WAIT on that connection: it covers the record's transaction, made before), then each
    node's writes acknowledged too. In that order a failover of the record's node cannot
    lose a record whose commands went out (the writer would apply its chunk again, adding
    twice where they added), and none loses a commit once it is done."""
    if wait is not None:
        apply_commands(client, [("HSET", redo_key, "seq", seq)], [], wait=wait)
    apply_commands(client, commands, scripts, before_send=before_send, wait=wait)


def _not_written(client, claim: Claim | None) -> bool:
    """A commit's WATCH failed: False, or :class:`PartitionClaimed` where the reason is
    another process's claim."""
    if claim is not None:
        _check_holder(claim, client.get(claim.key))
    return False


def _check_holder(claim: Claim, found: bytes | None) -> None:
    """:class:`PartitionClaimed` unless ``found``, the claim key's value, is this process."""
    if found != claim.writer_id:
        raise PartitionClaimed(f"{claim.partition} was assigned to another worker ({found!r} "
                               f"claimed it)")


def _first_key(command) -> str:
    """The key a recorded command routes by (on a cluster all its keys share one slot)."""
    return command[3] if command[0] == "EVALSHA" else command[1]


def apply_commands(client, commands: list[tuple], scripts: list[str],
                   before_send: Callable[[], None] | None = None,
                   wait: ReplicaWait | None = None) -> list:
    """Send recorded commands in one pipeline (to a Redis Cluster, pipelined per node, each
    routed by its key: :func:`infra.redis_client.send_per_node`); where a server lacks a
    script (restarted), load ``scripts`` everywhere and send them all again. Returns the
    replies. Callers only send commands that may be applied twice. ``before_send``: called
    just before the commands go out (each time), may raise to send nothing. ``wait``:
    returns once replicas of each server written acknowledged the commands
    (:class:`infra.redis_client.ReplicaWait`)."""
    send = send_per_node if is_cluster(client) else _send_pipelined
    try:
        return send(client, commands, _first_key, before_send, wait)
    except redis.exceptions.NoScriptError:
        for script in scripts:
            client.script_load(script)
        return send(client, commands, _first_key, before_send, wait)


def _send_pipelined(client, commands: list[tuple], key_of=None, before_send=None,
                    wait: ReplicaWait | None = None) -> list:
    if wait is not None:  # WAIT on the connection that wrote
        return send_and_wait(client, commands, wait, before_send)
    with client.pipeline(transaction=False) as pipe:
        for command in commands:
            pipe.execute_command(*command)
        if before_send is not None:
            before_send()
        return pipe.execute()


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
    when memory runs short (``infra/redis.conf``). ``expires_by_writer``: rows written whole
    and vectors are written with one MSET and no TTL, and their one writer
    (:class:`state.write_back.WriteBackStore`) deletes them once idle past their TTL
    (:meth:`delete_names`, :meth:`expire_at`; a TTL costs Redis ~2 µs per key written).

    Keys: ``<prefix>:m:<namespace>:<table>:{<encoded key>}`` — each row is its own hash tag.
    On one server a batch call touches many rows in one script. On a Redis Cluster (a
    :class:`redis.cluster.RedisCluster` client) keys are
    ``<prefix>:m:<namespace>:<table>:{b<n>}:<encoded key>``, ``n`` = CRC-32 of the encoded key
    mod :data:`CLUSTER_KEY_BUCKETS`: one MGET or one write call per bucket and batch instead of
    one per key. The scripts that add to rows in place (the shared layout) are refused there
    (:func:`check_layout`).
    ``row_count`` uses SCAN with a fixed, code-built pattern (never user input).
    """

    def __init__(self, client, prefix: str = "sr", namespace: str = "default",
                 cache_local_rows: int = 0, local_ttl_s: float = 0,
                 shared_ttl_s: float = 0, rows_as_strings: bool = False,
                 sorted_set_tables: tuple[str, ...] = (), expires_by_writer: bool = False
                 ) -> None:
        self.client = client
        self.expires_by_writer = expires_by_writer
        self.cluster = is_cluster(client)
        self.rows_as_strings = rows_as_strings
        self.sorted_set_tables = tuple(sorted_set_tables)
        self.cache_local_rows = cache_local_rows
        self.local_ttl_ms, self.shared_ttl_ms = int(local_ttl_s * 1000), int(shared_ttl_s * 1000)
        self._local_cache: dict[str, dict] = {}
        self._prefetched: dict[str, dict[str, bytes | None]] = {}
        self._claimed: dict[tuple[str, str, str], float] = {}
        self._key_names: dict[str, dict[str, str]] = {}
        self.prefix = prefix
        self.base = f"{prefix}:m:{encode_id(namespace)}"
        self._deferred = None
        self._scope = threading.local()  # .rows: table → {key: row} within shared_reads()
        self._incr = client.register_script(_WRITE_ROWS_LUA.replace("OP", "ZINCRBY"))
        self._set = client.register_script(_WRITE_ROWS_LUA.replace("OP", "ZADD"))
        self._overwrite = client.register_script(_OVERWRITE_ROWS_LUA)
        self._read = client.register_script(_READ_ROWS_LUA)
        self._claim = client.register_script(_CLAIM_LUA)
        self._add_vectors = client.register_script(_ADD_VECTORS_LUA)
        self._set_expiring = client.register_script(_SET_EXPIRING_LUA)

    def whole_rows(self, table: str) -> bool:
        """Whether ``table``'s rows are whole msgpack strings (``rows_as_strings``, except
        the model's ``sorted_set_tables``) rather than sorted sets."""
        return self.rows_as_strings and table not in self.sorted_set_tables

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
                encoded = encode_id(k)
                name = known[k] = (
                    f"{head}{encoded}}}" if not self.cluster else
                    f"{head}b{zlib.crc32(encoded.encode()) % CLUSTER_KEY_BUCKETS}}}:{encoded}")
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

    @contextmanager
    def shared_reads(self):
        outer = getattr(self._scope, "rows", None)
        if outer is None:
            self._scope.rows = {}
        try:
            yield self
        finally:
            if outer is None:
                self._scope.rows = None

    def _scoped(self, table, keys, read):
        """``read(table, keys)``, through this thread's :meth:`shared_reads` scope if open."""
        scope = getattr(self._scope, "rows", None)
        if scope is None:
            return read(table, keys)
        known = scope.setdefault(table, {})
        missing = list(dict.fromkeys(k for k in keys if k not in known))
        if missing:
            known.update(zip(missing, read(table, missing)))
        return [known[k] for k in keys]

    def get_rows(self, table, keys):
        return self._scoped(table, keys, self._read_rows)

    def _read_rows(self, table, keys):
        if not keys:
            return []
        if self.whole_rows(table):
            return self._read_local(table, keys)
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

    def overwrite_rows(self, table: str, rows: Mapping[str, Mapping[str, float | bool]]
                       ) -> None:
        """Set members' scores as given, removing members given as ``False`` (no trim: the
        caller sends its rows' exact contents; see :mod:`state.write_back`). On a cluster, one
        call per slot. Idempotent: a redo record may apply it again."""
        named = dict(zip(self.keys(table, rows), rows.values()))
        for names in by_slot(named) if self.cluster else [list(named)]:
            self._run(self._overwrite, names, [_msgpack([named[n] for n in names]),
                                               self.shared_ttl_ms])

    def replace_rows(self, table: str, rows: Rows) -> None:
        """Write whole rows as msgpack strings (the layout of ``rows_as_strings``; an empty
        row deletes its key): for rows with one writer, which holds them whole."""
        self._write_string_rows(table, rows, self.shared_ttl_ms)

    def get_local_rows(self, table, keys):
        if not self.cache_local_rows:
            return self._scoped(table, keys, self._read_local)
        return self._cached(table, keys, self._read_local)

    def prefetch_local_rows(self, table, keys):
        if self.cache_local_rows:
            self._cached(table, keys, self._read_local)

    def _mget(self, table, keys) -> list[bytes | None]:
        return mget_any(self.client, self.keys(table, keys)) if keys else []

    def _read_local(self, table, keys):
        return [_decode_row(value) if value is not None else {}
                for value in self._mget(table, keys)]

    def read_vectors(self, table, keys) -> list[np.ndarray]:
        """Stored vectors as read (any length), absent ones as an empty array."""
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
        self._write_string_rows(table, rows, self.local_ttl_ms)
        if self.cache_local_rows:
            cache = self._local_cache.setdefault(table, {})
            for key, row in rows.items():
                self._remember(cache, key, row)

    def _write_string_rows(self, table, rows: Rows, ttl_ms: int) -> None:
        names = list(zip(self.keys(table, rows), rows.values()))
        present = {name: _msgpack(row) for name, row in names if row}
        absent = [name for name, row in names if not row]
        if present:
            self._set_strings(present, ttl_ms)
        if absent:
            self.delete_names(absent)

    def delete_names(self, names: list[str]) -> None:
        """DEL keys by name (one command per slot on a cluster)."""
        target = self._deferred or self.client
        for group in by_slot(names) if self.cluster else [names]:
            target.delete(*group)

    def expire_at(self, deadlines: Mapping[str, int]) -> None:
        """PEXPIREAT each named key at its deadline (Unix ms): keys a writer that deletes
        idle keys itself hands over to Redis (an overwrite: applying it twice changes
        nothing)."""
        target = self._deferred or self.client
        for name, deadline in deadlines.items():
            target.pexpireat(name, deadline)

    def expire_after(self, names: list[str], ttl_ms: int) -> None:
        """PEXPIRE each named key ``ttl_ms`` from now (keys a writer hands over to Redis
        where another writer may write them later: :class:`state.write_back.WriteBackStore`'s
        ``others_may_write``)."""
        target = self._deferred or self.client
        for name in names:
            target.pexpire(name, ttl_ms)

    @property
    def expiry_key(self) -> str:
        """Hash table → TTL in ms of the tables whose keys the writer expires itself
        (``expires_by_writer``): what :func:`give_untimed_keys_ttls` gives keys it finds."""
        return f"{self.base}:expiry"

    def note_expiry(self, ttl_ms_by_table: Mapping[str, int]) -> None:
        (self._deferred or self.client).hset(self.expiry_key, mapping=dict(ttl_ms_by_table))

    def get_local_vectors(self, table, keys, dim):
        if not self.cache_local_rows:
            return self.get_vectors(table, keys, dim)
        values = self._cached(table, keys, self.read_vectors)
        found = np.fromiter((value.size > 0 for value in values), bool, len(keys))
        out = np.zeros((len(keys), dim), dtype=np.float32)
        if found.any():
            out[found] = np.stack([value for value in values if value.size])
        return out, found

    def prefetch_local_vectors(self, table, keys):
        if self.cache_local_rows:
            self._cached(table, keys, self.read_vectors)

    def set_local_vectors(self, table, keys, vectors):
        self._store_vectors(table, keys, vectors, self.local_ttl_ms)
        if self.cache_local_rows:
            cache = self._local_cache.setdefault(table, {})
            for key, vector in zip(keys, np.asarray(vectors, dtype=np.float32)):
                self._remember(cache, key, vector.copy())  # not a view pinning the batch

    def remove_members(self, table, members):
        if self.whole_rows(table):  # written whole by their one writer (WriteBackStore)
            raise TypeError(f"rows of {table!r} are written whole: remove members through "
                            f"their writer's store")
        members = {key: list(gone) for key, gone in members.items() if gone}
        target = self._deferred or self.client
        for name, gone in zip(self.keys(table, members), members.values()):
            target.zrem(name, *gone)

    def delete_local_vectors(self, table, keys):
        if not keys:
            return
        self.delete_names(self.keys(table, keys))
        if self.cache_local_rows:  # known absent: a batch computed before the DEL lands
            cache = self._local_cache.setdefault(table, {})  # must not read them back
            for key in keys:
                self._remember(cache, key, _ABSENT)

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
        self.prefetch_vector_tables({table: keys})

    def prefetch_vector_tables(self, reads):
        reads = {table: list(keys) for table, keys in reads.items()}
        values = iter(mget_any(self.client, [name for table, keys in reads.items()
                                             for name in self.keys(table, keys)]))
        for table, keys in reads.items():
            self._prefetched[table] = dict(zip(keys, islice(values, len(keys))))

    def prefetch_vectors_on(self, pipe, table: str, keys) -> Callable[[list], None]:
        """:meth:`prefetch_vectors` riding on ``pipe``, a pipeline that reads other things
        too (one round trip for all): queues a GET per key; call the function returned with
        the pipeline's replies to those GETs (one per distinct key)."""
        keys = list(dict.fromkeys(keys))
        for name in self.keys(table, keys):
            pipe.get(name)

        def take(values: list) -> None:
            self._prefetched[table] = dict(zip(keys, values))
        return take

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
        """MSET, or SET with PX per key (one script call) when keys expire; on a cluster one
        such call per slot."""
        if self.cluster:  # one call per slot (a bucket: CLUSTER_KEY_BUCKETS)
            for names in by_slot(mapping):
                self._set_strings_in_one_slot({n: mapping[n] for n in names}, ttl_ms)
        else:
            self._set_strings_in_one_slot(mapping, ttl_ms)

    def _set_strings_in_one_slot(self, mapping: dict[str, bytes], ttl_ms: int) -> None:
        if ttl_ms and not self.expires_by_writer:
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
                          self.local_ttl_ms / 1000, self.shared_ttl_ms / 1000,
                          self.rows_as_strings, self.sorted_set_tables,
                          self.expires_by_writer)

    def row_count(self, table):
        pattern = f"{self.base}:{table}:{{*"
        return sum(1 for _ in self.client.scan_iter(match=pattern, count=1000))


class StateLayoutError(RuntimeError):
    """Redis's model state is laid out for another ``STREAMREC_STATE_WRITER``."""


def require_single_on_cluster(client, layout: str) -> None:
    """Refuse the shared layout on a Redis Cluster (its commits add to rows of many slots in
    one transaction: one Redis primary only)."""
    if is_cluster(client) and layout == "shared":
        raise StateLayoutError(
            "on a Redis Cluster model state needs STREAMREC_STATE_WRITER=single or owned (the "
            "shared layout adds to rows of many slots in one transaction: one Redis primary "
            "only)")


def check_layout(client, prefix: str, layout: str, claim: bool = False,
                 item_partitions: int = 0) -> None:
    """Refuse to run against model state laid out otherwise (a reader would meet values of
    the wrong type; writers would mix layouts), or, given the owned layout's
    ``item_partitions``, split among another count of owner partitions (two owners would
    write one item's rows). ``claim``: record ``layout`` (and the count) if none is."""
    require_single_on_cluster(client, layout)
    keys = RedisKeys(prefix)
    if claim:
        client.set(keys.state_layout, layout, nx=True)
    stored = client.get(keys.state_layout)
    if stored is not None and stored.decode() != layout:
        raise StateLayoutError(
            f"Redis holds model state written with STREAMREC_STATE_WRITER={stored.decode()}, "
            f"this process runs with {layout}: run every role with the same value, or empty "
            f"the model state first (docs/reliability.md)")
    if layout != "owned" or not item_partitions:
        return
    if claim:
        client.set(keys.item_partitions, item_partitions, nx=True)
    stored = client.get(keys.item_partitions)
    if stored is not None and int(stored) != item_partitions:
        raise StateLayoutError(
            f"Redis holds owned model state split among {int(stored)} item partitions, this "
            f"process runs with STREAMREC_TOPIC_PARTITIONS={item_partitions}: two owners "
            f"would write the same items; run every worker with {int(stored)}, or change it "
            f"as docs/item-ownership.md says (Changing the partition count)")


def writes_alone(model: OnlineModel) -> bool:
    """Whether the stream worker is the only writer of this model's state (models that learn
    item descriptions are also written by the items agent): the models that
    ``STREAMREC_STATE_WRITER=single`` lays out for one writer."""
    return type(model).learn_items is OnlineModel.learn_items


def build_on_redis(names: list[str], client, prefix: str, cache_local_rows: int = 0,
                   local_ttl_s: float = 0, shared_ttl_s: float = 0, layout: str = "shared",
                   writer: bool = False, held_keys: int = 1_000_000,
                   options: Mapping[str, dict] | None = None,
                   item_partitions: int = 0,
                   expires_by_writer: bool = False) -> dict[str, OnlineModel]:
    """The named models, each bound to its own :class:`RedisStore` namespace on ``client``
    (``cache_local_rows`` and the TTLs: only for the worker, which owns and writes state).

    ``layout="single"`` (STREAMREC_STATE_WRITER): models the worker alone writes keep rows as
    whole msgpack strings, and for the ``writer`` their state is held in its memory
    (:class:`state.write_back.WriteBackStore`, at most ``held_keys`` keys per table), which
    writes those strings without TTLs and expires them itself (``expires_by_writer``).
    ``layout="owned"``: rows laid out as in ``single``; a ``writer`` (one worker of the
    group) holds its partition-local state in memory and records its item-side writes as
    delta records for ``item_partitions`` owner partitions (one
    :class:`state.ownership.ChunkDeltas` for all its models: ``model.store.deltas``), which
    their owners apply (:mod:`state.owner_commits`); its keys go without TTLs, handed to
    Redis's TTLs once idle (``WriteBackStore(others_may_write=True)``).
    ``expires_by_writer``: rows written whole go without TTLs, their writer expires them
    (always for ``single``'s and ``owned``'s writers; the stores of an item partition's
    owner).
    ``options``: constructor options by model name (``Settings.model_options``)."""
    from state.ownership import ChunkDeltas, DeltaRecorder
    from state.write_back import WriteBackStore  # it builds on this module

    check_layout(client, prefix, layout, claim=writer,
                 item_partitions=item_partitions if writer else 0)
    deltas = ChunkDeltas(item_partitions) if layout == "owned" and writer else None
    models = {}
    for name in names:
        model = build_live(name, **(options or {}).get(name, {}))
        whole = layout in ("single", "owned") and writes_alone(model)
        if layout == "owned" and (model.claims_shared_rows or not writes_alone(model)):
            raise StateLayoutError(
                f"model {name!r} claims shared rows or is also written by the items agent: "
                f"not in the owned layout; leave it out of STREAMREC_LIVE_MODELS there")
        if is_cluster(client) and not whole:
            raise StateLayoutError(
                f"model {name!r} is also written by the items agent (rows added to in place): "
                f"not on a Redis Cluster; leave it out of STREAMREC_LIVE_MODELS there")
        store = RedisStore(client, prefix, name, 0 if whole else cache_local_rows,
                           local_ttl_s, shared_ttl_s, rows_as_strings=whole,
                           sorted_set_tables=model.sorted_set_tables,
                           expires_by_writer=whole and (expires_by_writer or (
                               writer and layout in ("single", "owned"))))
        if deltas is not None:  # partitions move between the group's workers
            model.bind(DeltaRecorder(WriteBackStore(store, held_keys=held_keys,
                                                    others_may_write=True),
                                     store, deltas, name))
        else:
            model.bind(WriteBackStore(store, held_keys=held_keys) if whole and writer
                       else store)
        models[name] = model
    return models


def build_live_models(settings, client, writer: bool = False) -> dict[str, OnlineModel]:
    """The live models as ``settings`` (an :class:`infra.settings.Settings`) name, configure
    and lay them out, on ``client``: as serving, the items agent and the CLI read them, or
    (``writer``) as the stream worker writes them (its row cache, TTLs and held keys)."""
    worker = dict(cache_local_rows=settings.worker_cached_local_rows,
                  local_ttl_s=settings.user_state_ttl_s, shared_ttl_s=settings.item_state_ttl_s,
                  held_keys=settings.state_writer_held_keys) if writer else {}
    return build_on_redis(settings.live_model_names, client, settings.key_prefix,
                          layout=settings.state_writer, writer=writer,
                          options=settings.model_options,
                          item_partitions=settings.topic_partitions, **worker)


def give_untimed_keys_ttls(stores: RedisStore | Iterable[RedisStore], batch: int = 1000,
                           among: Iterable[str] | None = None) -> int:
    """Give each key of the ``stores``' tables listed in their :attr:`RedisStore.expiry_key`
    that has no TTL its table's TTL (PEXPIRE … NX: keys with a TTL keep theirs); returns how
    many got one. A writer that expires keys itself (``expires_by_writer``) runs this when it
    starts: the keys its predecessor wrote and no longer names would otherwise never expire.
    One SCAN of each namespace (``base:*``) for all its tables, whichever of the stores list
    them: each SCAN walks the whole keyspace (~0.6 s of Redis per million keys); the writer
    may write meanwhile (its next write of a key clears the TTL given here, and it deletes
    idle keys before that TTL passes). ``among``: only those of these key names, no SCAN
    (the keys of a record another writer left)."""
    stores = [stores] if isinstance(stores, RedisStore) else list(stores)
    if among is not None:  # decoded once, whatever the namespaces
        among = [name.decode() if isinstance(name, bytes) else name for name in among]
    given = 0
    for store in {store.base: store for store in stores}.values():  # one per namespace
        client = store.client
        ttl_of = {table.decode(): int(ttl_ms)
                  for table, ttl_ms in client.hgetall(store.expiry_key).items()}
        if not ttl_of:
            continue
        head = f"{store.base}:"
        found = (client.scan_iter(match=f"{head}*", count=batch, _type="string")
                 if among is None else among)
        waiting: dict[int, list] = {}
        for name in found:
            text = name.decode() if isinstance(name, bytes) else name  # SCAN's are bytes
            ttl_ms = (ttl_of.get(text[len(head):].partition(":")[0])
                      if text.startswith(head) else None)
            if ttl_ms is None:
                continue
            names = waiting.setdefault(ttl_ms, [])
            names.append(name)
            if len(names) == batch:
                given += _pexpire_absent(client, waiting.pop(ttl_ms), ttl_ms)
        given += sum(_pexpire_absent(client, names, ttl_ms)
                     for ttl_ms, names in waiting.items())
    return given


def _pexpire_absent(client, names: list, ttl_ms: int) -> int:
    commands = [("PEXPIRE", name, ttl_ms, "NX") for name in names]
    if not commands:
        return 0
    if is_cluster(client):
        return sum(send_per_node(client, commands, key_of=_first_key))
    with client.pipeline(transaction=False) as pipe:
        for command in commands:
            pipe.execute_command(*command)
        return sum(pipe.execute())
