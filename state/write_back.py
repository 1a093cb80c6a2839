"""One writer's model state in memory, with Redis as its read model written as overwrites.

:class:`WriteBackStore` learns exactly as :class:`online_models.store.MemoryStore` does (so its
state equals a replay's) and remembers which rows, members and vectors changed. :meth:`flush`
queues those changes — coalesced: a member changed by many events is written once — on a
pipeline or :class:`state.redis_store.WriteBatch`, in :class:`state.redis_store.RedisStore`'s key
layout and formats, so serving reads the result through a plain ``RedisStore`` and sees the
same rows the writer holds (absolute scores: ZADD, not ZINCRBY; members the writer trimmed:
ZREM). Redis work grows with what changed per flush, not with events.

It is correct only where this store is the **only writer** of its keys (the state-redesign
issue: item-side state owned by the item's partition). Keys the writer has not held yet are
read from Redis on first use (``complete=True``: Redis holds none of them — a fresh start —
and nothing is read). With a reader whose ``rows_as_strings`` is set, changed rows are written
whole as msgpack strings (one SET per row instead of one ZADD per member: the layout only a
single writer can use, since concurrent writers need Redis to add their increments), except
the model's ``sorted_set_tables`` (a catalogue: one row of up to ``max_items`` members, whose
changed members are written instead).
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from itertools import repeat
from typing import Collection, Iterable

import numpy as np
import redis

from online_models.store import FlatRows, MemoryStore, VectorTable, slack, trim_row
from state.redis_store import RedisStore, give_untimed_keys_ttls

log = logging.getLogger(__name__)


class WrittenKeys:
    """When this writer last wrote each key it writes without a Redis TTL, per table, and
    each table's TTL: :meth:`idle` hands back keys idle past their TTL (to delete),
    :meth:`overflow` the oldest past ``capacity`` keys per table (to hand over to Redis TTLs),
    so the keys without a TTL — which Redis's ``volatile-lru`` cannot evict — stay bounded."""

    def __init__(self, capacity: int, check_every_s: float = 3600.0,
                 idle_share: float = 1.0) -> None:
        self.capacity = capacity
        self.check_every_s = check_every_s
        self.idle_share = idle_share  # a key is idle once unwritten this share of its TTL
        self.last_written: dict[str, dict[str, float]] = {}
        self.ttl_s: dict[str, float] = {}
        self._next_check = 0.0

    def note(self, table: str, keys, ttl_s: float, now: float) -> None:
        """Record a write of ``keys`` at ``now``."""
        written = self.last_written.get(table)
        if written is None:
            written = self.last_written[table] = {}
            self.ttl_s[table] = ttl_s
        written.update(zip(keys, repeat(now)))

    def idle(self, now: float) -> dict[str, list[str]]:
        """Keys last written ``idle_share`` of a TTL or more before ``now``, forgotten here;
        looked for at most every ``check_every_s`` (or a tenth of the shortest idle time): a
        look scans every key noted (~40 ms per million)."""
        if now < self._next_check:
            return {}
        self._next_check = now + min([self.check_every_s, *(
            t * self.idle_share / 10 for t in self.ttl_s.values())])
        found = {}
        for table, written in self.last_written.items():
            cutoff = now - self.ttl_s[table] * self.idle_share
            idle = [key for key, at in written.items() if at <= cutoff]
            for key in idle:
                del written[key]
            if idle:
                found[table] = idle
        return found

    def overflow(self) -> dict[str, dict[str, float]]:
        """Past ``capacity`` keys in a table, the oldest written (down to 90 % of it),
        forgotten here: key → when its TTL would end (Unix seconds)."""
        found = {}
        for table, written in self.last_written.items():
            if len(written) <= self.capacity:
                continue
            excess = len(written) - int(self.capacity * 0.9)
            times = np.fromiter(written.values(), float, len(written))
            cutoff = np.partition(times, excess - 1)[excess - 1]
            oldest = [key for key, at in written.items() if at <= cutoff][:excess]
            found[table] = {key: written.pop(key) + self.ttl_s[table] for key in oldest}
        return found


#: Where another writer may write a key after this one (``others_may_write``), a key unwritten
#: this share of its TTL is handed to Redis with its full TTL: it lives ~1.1 TTLs idle at most
#: (plus the time between two looks for idle keys: :meth:`WrittenKeys.idle`).
HANDED_OVER_IDLE_SHARE = 0.1


class WriteBackStore(MemoryStore):
    """Memory state + change tracking for one writer; see the module doc.

    ``others_may_write``: keys written without a TTL (``reader.expires_by_writer``) may be
    written by another writer after this one (a worker group's partitions move), so this one
    never deletes them nor gives them a deadline of its own: a key idle for
    :data:`HANDED_OVER_IDLE_SHARE` of its TTL (or past ``held_keys``) gets its table's full TTL
    from now (PEXPIRE) and leaves memory. That deadline is never earlier than the idle
    deadline of any write before it, by whichever writer; a later write (MSET) clears it."""

    def __init__(self, reader: RedisStore, complete: bool = False,
                 held_keys: int = 1_000_000, clock=time.time,
                 others_may_write: bool = False) -> None:
        super().__init__()
        self.reader = reader  # key names, formats, TTLs and reads of keys not held yet
        self.complete = complete
        self.held_keys = held_keys  # per table; past it the oldest clean keys are dropped
        self.clock = clock
        self.others_may_write = others_may_write
        # keys written without a TTL (reader.expires_by_writer): this writer expires them
        self.written = self._new_written_keys()
        self._expiry_recorded: set[str] = set()  # tables whose TTL is in reader.expiry_key
        self._last_flush: dict[str, set[str]] = {}  # keys whose commit may still be in flight
        self._row_changes: dict[str, dict[str, set[str]]] = {}  # table -> key -> members
        self._local_changes: dict[str, set[str]] = {}
        self._vector_changes: dict[str, tuple[set[str], bool]] = {}  # table -> (keys, local)
        self._absent: dict[str, set[str]] = {}  # vector keys known not to be in Redis
        self._vector_deletes: dict[str, set[str]] = {}  # table -> keys erased since the flush

    # --- keys not held yet ----------------------------------------------------------------
    def _hold_rows(self, table, keys, read) -> dict[str, dict[str, float]]:
        rows = self.rows.setdefault(table, {})
        if not self.complete:
            missing = [k for k in dict.fromkeys(keys) if k not in rows]
            if missing:
                rows.update(zip(missing, (dict(row) for row in read(table, missing))))
        return rows

    def _hold_vectors(self, table, keys) -> VectorTable:
        stored = self.vector_table(table)
        if not self.complete:
            absent = self._absent.setdefault(table, set())
            held = stored.index  # its dict: VectorTable.__contains__ is a Python call
            missing = [k for k in dict.fromkeys(keys) if k not in held and k not in absent]
            if missing:  # local and shared vectors share keys and format (TTLs differ)
                for key, vector in zip(missing, self.reader.read_vectors(table, missing)):
                    if vector.size:
                        stored[key] = vector
                    else:
                        absent.add(key)
        return stored

    # --- prefetch: a worker calls these before the previous batch's commit starts ---------
    writes_read_rows = True

    def prefetch_rows(self, table, keys):
        self._hold_rows(table, keys, self.reader.get_rows)

    def prefetch_local_rows(self, table, keys):
        self._hold_rows(table, keys, self.reader.get_local_rows)

    def prefetch_vectors(self, table, keys):
        self._hold_vectors(table, keys)

    prefetch_local_vectors = prefetch_vectors

    # --- reads ---------------------------------------------------------------------------
    def get_rows(self, table, keys):
        self._hold_rows(table, keys, self.reader.get_rows)
        return super().get_rows(table, keys)

    def get_local_rows(self, table, keys):
        self._hold_rows(table, keys, self.reader.get_local_rows)
        return super().get_rows(table, keys)

    def get_vectors(self, table, keys, dim):
        self._hold_vectors(table, keys)
        return super().get_vectors(table, keys, dim)

    get_local_vectors = get_vectors  # local and shared vectors are held alike

    # --- writes --------------------------------------------------------------------------
    def _write_whole(self, table, keys, write, rows, keep_top) -> None:
        """Rows the read model takes whole (``whole_rows``): hold them, ``write`` them
        in memory (a :class:`MemoryStore` method), note which keys changed."""
        self._hold_rows(table, keys, self.reader.get_rows)
        write(self, table, rows, keep_top)
        self._row_changes.setdefault(table, {}).update(dict.fromkeys(keys, ()))

    def _write_rows(self, table, updates, keep_top, add: bool) -> None:
        if self.reader.whole_rows(table):
            write = self.incr_flat_rows if add else self.set_flat_rows
            write(table, FlatRows.from_dicts(updates), keep_top)
            return
        rows = self._hold_rows(table, updates, self.reader.get_rows)
        changes = self._row_changes.setdefault(table, {})
        limit = None if keep_top is None else keep_top + slack(keep_top)
        for key, update in updates.items():
            row = rows.get(key)
            if row is None:
                rows[key] = row = {}
            changed = changes.get(key)
            if changed is None:
                changes[key] = changed = set()
            get = row.get
            if add:
                for member, value in update.items():
                    row[member] = get(member, 0.0) + value
                changed.update(update)
            else:  # a member set to the score it has is not written again
                changed.update(member for member, value in update.items()
                               if get(member) != value)
                row.update(update)
            if limit is not None and len(row) > limit:
                before = set(row)
                trim_row(row, keep_top)
                changed |= before - row.keys()  # trimmed: removed from the read model too

    def incr_rows(self, table, deltas, keep_top=None):
        self._write_rows(table, deltas, keep_top, add=True)

    def incr_flat_rows(self, table, rows, keep_top=None):
        if self.reader.whole_rows(table):
            self._write_whole(table, rows.keys, MemoryStore.incr_flat_rows, rows, keep_top)
        else:  # member-level changes: through the dict path
            self.incr_rows(table, rows.as_dicts(), keep_top)

    def set_flat_rows(self, table, rows, keep_top=None):
        if self.reader.whole_rows(table):
            self._write_whole(table, rows.keys, MemoryStore.set_flat_rows, rows, keep_top)
        else:
            self.set_rows(table, rows.as_dicts(), keep_top)

    def set_rows(self, table, values, keep_top=None):
        self._write_rows(table, values, keep_top, add=False)

    def set_local_rows(self, table, rows):
        super().set_local_rows(table, rows)
        for key, row in rows.items():
            if not row:
                self.rows[table][key] = {}  # held: known absent
        self._local_changes.setdefault(table, set()).update(rows)

    def remove_members(self, table, members):
        rows = self._hold_rows(table, list(members), self.reader.get_rows)
        whole = self.reader.whole_rows(table)
        changes = self._row_changes.setdefault(table, {})
        for key, gone in members.items():
            row = rows.get(key)
            removed = [member for member in gone if row and member in row]
            for member in removed:
                del row[member]
            if removed and whole:  # written whole (an empty row: its key deleted)
                changes.setdefault(key, ())
            elif removed:  # each removed member: ZREM (overwrite_rows with False)
                changes.setdefault(key, set()).update(removed)

    def claim(self, table, key, member, value):
        self._hold_rows(table, [key], self.reader.get_rows)
        row = self.rows[table].setdefault(key, {})
        if member not in row:
            row[member] = value
            self._row_changes.setdefault(table, {}).setdefault(key, set()).add(member)
        return row[member]

    def _note_vectors(self, table, keys, local: bool) -> None:
        changed, _ = self._vector_changes.get(table, (set(), local))
        changed.update(keys)
        self._vector_changes[table] = (changed, local)
        self._absent.get(table, set()).difference_update(keys)
        self._vector_deletes.get(table, set()).difference_update(keys)

    def set_vectors(self, table, keys, vectors):
        super().set_vectors(table, keys, vectors)
        self._note_vectors(table, keys, local=False)

    def set_local_vectors(self, table, keys, vectors):
        super().set_vectors(table, keys, vectors)
        self._note_vectors(table, keys, local=True)

    def delete_local_vectors(self, table, keys):
        super().delete_local_vectors(table, keys)
        self._absent.setdefault(table, set()).update(keys)
        if table in self._vector_changes:
            self._vector_changes[table][0].difference_update(keys)
        self._vector_deletes.setdefault(table, set()).update(keys)

    def add_vectors(self, table, keys, deltas, base):
        self._hold_vectors(table, keys)
        super().add_vectors(table, keys, deltas, base)
        self._note_vectors(table, keys, local=False)

    # --- the read model --------------------------------------------------------------------
    def pending(self) -> int:
        """Keys changed since the last flush."""
        return (sum(len(c) for c in self._row_changes.values())
                + sum(len(c) for c in self._local_changes.values())
                + sum(len(c) for c, _ in self._vector_changes.values())
                + sum(len(c) for c in self._vector_deletes.values()))

    def flush(self, pipe) -> int:
        """Queue every change since the last flush on ``pipe`` as overwrites (see the module
        doc: one script call or MSET per table) and forget them; returns the number of keys
        written. If ``pipe`` never reaches Redis, call :meth:`forget_cached`."""
        written = 0
        strings = []  # (table, keys, TTL in ms) of the keys written as strings
        with self.reader.deferred(pipe) as reader:
            for table, changes in self._row_changes.items():
                rows = self.rows.get(table, {})
                if reader.whole_rows(table):  # whole rows, one string each
                    reader.replace_rows(table, {key: rows.get(key) or {} for key in changes})
                    strings.append((table, changes, reader.shared_ttl_ms))
                    written += len(changes)
                    continue
                reader.overwrite_rows(table, {
                    key: {m: row.get(m, False) for m in members}
                    for key, members, row in ((k, c, rows.get(k, {})) for k, c in changes.items())})
                written += len(changes)
            for table, keys in self._local_changes.items():
                rows = self.rows.get(table, {})
                reader.set_local_rows(table, {key: rows.get(key) or {} for key in keys})
                strings.append((table, keys, reader.local_ttl_ms))
                written += len(keys)
            for table, (keys, local) in self._vector_changes.items():
                stored, keys = self.vector_table(table), list(keys)
                write = reader.set_local_vectors if local else reader.set_vectors
                write(table, keys, stored.gather(keys, stored.matrix.shape[1])[0])
                strings.append((table, keys, reader.local_ttl_ms if local else
                                reader.shared_ttl_ms))
                written += len(keys)
            for table, keys in self._vector_deletes.items():  # erased
                reader.delete_names(reader.keys(table, list(keys)))
                written += len(keys)
            deleted = (self._expire(reader, [s for s in strings if s[2]])
                       if reader.expires_by_writer else {})
        flushed = {table: set(keys) for table, keys in self._row_changes.items()}
        for table, keys in deleted.items():  # held as absent until the DEL has landed
            flushed.setdefault(table, set()).update(keys)
        for table, keys in self._local_changes.items():
            flushed.setdefault(table, set()).update(keys)
        for table, (keys, _) in self._vector_changes.items():
            flushed.setdefault(table, set()).update(keys)
        for table, keys in self._vector_deletes.items():
            flushed.setdefault(table, set()).update(keys)
        self._row_changes, self._local_changes, self._vector_changes = {}, {}, {}
        self._vector_deletes = {}
        self._drop_oldest(flushed)
        self._last_flush = flushed
        return written

    def _expire(self, reader: RedisStore, strings: list[tuple[str, object, int]]
                ) -> dict[str, list[str]]:
        """Expiry of the keys written without a TTL: note this flush's (and each table's TTL
        in ``reader.expiry_key``, for :func:`state.redis_store.give_untimed_keys_ttls`); queue
        a DEL of keys idle past their TTL (known absent from now on: a batch computed before
        this commit lands must not read them back) and a PEXPIREAT of those past
        ``held_keys`` per table, which Redis expires (and may evict) from then on. Returns
        the keys deleted, by table."""
        now = self.clock()
        for table, keys, ttl_ms in strings:
            self.written.note(table, keys, ttl_ms / 1000, now)
        unrecorded = {table: ttl_ms for table, _, ttl_ms in strings
                      if table not in self._expiry_recorded}
        if unrecorded:  # once per table, again after a failed commit (forget_cached)
            reader.note_expiry(unrecorded)
            self._expiry_recorded.update(unrecorded)
        if self.others_may_write:
            self._hand_over(reader, now)
            return {}
        deleted = self.written.idle(now)
        for table, keys in deleted.items():
            reader.delete_names(reader.keys(table, keys))
            if table in self.vectors:
                stored, absent = self.vectors[table], self._absent.setdefault(table, set())
                for key in keys:
                    stored.pop(key, None)
                    absent.add(key)
            else:
                self.rows.setdefault(table, {}).update((key, {}) for key in keys)
        for table, deadlines in self.written.overflow().items():
            reader.expire_at(dict(zip(reader.keys(table, deadlines),
                                      (int(at * 1000) for at in deadlines.values()))))
        return deleted

    def _hand_over(self, reader: RedisStore, now: float) -> None:
        """``others_may_write``: queue a PEXPIRE of the table's full TTL for the keys idle
        (dropped from memory: Redis holds what was written) and for those past ``held_keys``."""
        idle = self.written.idle(now)
        for table, keys in [*idle.items(), *self.written.overflow().items()]:
            reader.expire_after(reader.keys(table, list(keys)),
                                int(1000 * self.written.ttl_s[table]))
        for table, keys in idle.items():
            held = self.vectors[table] if table in self.vectors else self.rows.get(table, {})
            for key in keys:
                held.pop(key, None)
            self.complete = False  # read again when met

    def _new_written_keys(self) -> WrittenKeys:
        return WrittenKeys(self.held_keys, idle_share=HANDED_OVER_IDLE_SHARE
                           if self.others_may_write else 1.0)

    def _drop_oldest(self, flushed: dict[str, set[str]]) -> None:
        """Past ``held_keys`` in a table, drop its oldest held keys (in Redis already), except
        those of this flush and the one before (their commits may still be in flight: a read
        from Redis could miss them)."""
        for held in (self.rows, self.vectors):
            for table, keyed in held.items():
                if len(keyed) <= self.held_keys:
                    continue
                keep = flushed.get(table, set()) | self._last_flush.get(table, set())
                excess = len(keyed) - int(self.held_keys * 0.9)
                for key in [k for k in keyed if k not in keep][:excess]:
                    del keyed[key]
                self.complete = False  # dropped keys are read again when met
        for table, absent in self._absent.items():
            if len(absent) > self.held_keys:
                absent.clear()

    @contextmanager
    def deferred(self, pipe):
        """Learn in memory, then queue the changes on ``pipe`` (as :meth:`RedisStore.deferred`
        does, so the worker's exactly-once transaction carries them with its watermarks)."""
        yield self
        self.flush(pipe)

    def take_over(self) -> None:
        """This writer holds the lease (again): forget what it held and wrote (another writer
        may have written since). Then, once the predecessor's last writes are all applied,
        its keys without a TTL want one (:class:`UntimedKeySweeper`)."""
        self.forget_cached()
        self.written = self._new_written_keys()

    def forget_cached(self):
        """Drop everything held (a commit failed: Redis holds the last committed state);
        keys are read from Redis again on first use."""
        self.rows, self.vectors, self._absent, self._last_flush = {}, {}, {}, {}
        self._expiry_recorded = set()
        self._row_changes, self._local_changes, self._vector_changes = {}, {}, {}
        self._vector_deletes = {}
        self.complete = False


def sweep_untimed_keys(stores: Iterable[WriteBackStore],
                       among: Iterable[str] | None = None) -> int:
    """Give the keys without a TTL of the tables of ``stores`` that write keys without TTLs
    their table's TTL (:func:`state.redis_store.give_untimed_keys_ttls`: one SCAN per
    namespace, or only the key names ``among``: keys another writer wrote and these stores
    do not track, such as a redo record's); returns how many got one (0 where Redis failed:
    logged)."""
    readers = [store.reader for store in stores if store.reader.expires_by_writer]
    if not readers:
        return 0
    names = ", ".join(sorted({reader.base for reader in readers}))
    try:
        given = give_untimed_keys_ttls(readers, among=among)
    except redis.RedisError as exc:
        log.warning("giving TTLs to %s keys without one failed: %r", names, exc)
        return 0
    log.info("gave %d keys of %s without a TTL their table's TTL", given, names)
    return given


class UntimedKeySweeper:
    """Gives the keys without a TTL of the tables of stores that write keys without TTLs
    their table's TTL (:func:`sweep_untimed_keys`: one SCAN per namespace for all the stores
    asked for), on a thread of its own: when a single writer takes the lease over, when new
    owners start and after each rebalance (owned layout). Keys a predecessor wrote (and, on a
    Redis Cluster, its redo record's) would otherwise never expire. One sweep at a time;
    requests while one waits to start join it (their stores with it), a request while one
    runs queues one more. A key another writer still writes loses the TTL at its next write,
    and that writer expires it once idle, never before the TTL given here runs out."""

    def __init__(self) -> None:
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="expiry-sweep")
        self._lock = threading.Lock()
        self._queued: Future | None = None
        self._stores: list[WriteBackStore] = []  # those of the sweep queued

    def request(self, stores: Collection[WriteBackStore]) -> Future:
        """Sweep ``stores``' tables soon; the future ends with the keys given a TTL."""
        with self._lock:
            self._stores.extend(stores)
            if self._queued is None:
                self._queued = self._thread.submit(self._sweep)
            return self._queued

    def _sweep(self) -> int:
        with self._lock:
            self._queued = None  # requests from now on queue the next sweep
            stores, self._stores = self._stores, []
        return sweep_untimed_keys(stores)
