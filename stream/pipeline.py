"""Overlaps applying chunks: chunk N commits in Redis while the worker computes chunk N+1.

Per chunk, :class:`ApplyPipeline` runs :meth:`LiveState.read` (the chunk's Redis reads), then
starts the previous chunk's :meth:`LiveState.commit` on a second thread, then runs
:meth:`LiveState.compute` (the models' maths, on cached partition-local state and prefetched
shared state): redis-server executes one chunk's transaction while the worker's Python computes
the next (a commit spends its time waiting on Redis, so the threads barely contend for the
GIL). Reads go first because Redis is single-threaded: behind a transaction they would wait for
it. The event loop only awaits: it keeps heartbeating while chunks are applied.

If a commit finds that another worker moved a watermark (a rebalance), or fails with a Redis
error, everything computed on top of it is void: the pipeline drops it (and the cached
partition-local state) and applies those chunks again from Redis's state. Transient Redis
errors (Redis down, or at ``maxmemory``) are retried with backoff until Redis takes writes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from infra.redis_client import TRANSIENT_REDIS_ERRORS, note_redis_error, retry_delays
from state.redis_store import PartitionClaimed
from stream.state import ApplyResult, LiveState, PreparedBatch, SourceMessage

log = logging.getLogger("streamrec.pipeline")


async def run_retrying(executor: ThreadPoolExecutor, what: str, function, *args,
                       retry_max_s: float = 5.0, on_retry: Callable[[], None] = lambda: None):
    """``function(*args)`` on ``executor``'s thread; transient Redis errors back off and
    retry (up to ``retry_max_s`` apart) until it succeeds."""
    loop, delays = asyncio.get_running_loop(), retry_delays(retry_max_s)
    while True:
        try:
            return await loop.run_in_executor(executor, function, *args)
        except TRANSIENT_REDIS_ERRORS as exc:
            delay = next(delays)
            note_redis_error(log, what, exc, delay)
            on_retry()
            await asyncio.sleep(delay)


class ApplyPipeline:
    """Applies chunks of source messages exactly once, at most one commit in flight.

    ``on_applied(result, seconds)`` is called once per chunk, in order, when its commit is
    known to have succeeded (``seconds``: from the start of its prepare to that moment): when
    the pipeline next settles it. ``on_committed(result)`` is called sooner, on the event loop
    as soon as a commit's transaction succeeded (no wait for the next chunk), for work that
    must follow a commit with the least delay (the owned layout's relay). All methods are
    coroutines of one event loop; they take turns (a lock).
    """

    def __init__(self, state: LiveState, on_applied: Callable[[ApplyResult, float], None],
                 retry_max_s: float = 5.0, on_retry: Callable[[], None] = lambda: None,
                 on_committed: Callable[[ApplyResult], None] = lambda result: None,
                 on_moved: Callable[[PartitionClaimed], None] = lambda exc: None) -> None:
        self.state = state
        self.on_applied = on_applied
        self.on_committed = on_committed
        #: called (then the error raised) where a commit found its partition claimed by
        #: another process: the worker exits there, whichever coroutine awaited the commit
        self.on_moved = on_moved
        self.on_retry = on_retry  # a retry is progress of a kind: the worker is not stalled
        self.retry_max_s = retry_max_s
        self._prepare_thread = ThreadPoolExecutor(1, thread_name_prefix="redis-prepare")
        self._commit_thread = ThreadPoolExecutor(1, thread_name_prefix="redis-commit")
        self._lock = asyncio.Lock()
        # (chunk, when its prepare started, the computed batch / its commit)
        self._computed: tuple[list[SourceMessage], float, PreparedBatch] | None = None
        self._in_flight: tuple[list[SourceMessage], float, asyncio.Future] | None = None
        #: chunks applied again because a commit was voided or failed (a rebalance, a lost
        #: lease, a Redis error): each costs a second prepare and the dropped cached state
        self.redone_chunks = 0

    async def run(self, what: str, function, *args):
        """``function(*args)`` on the prepare thread; transient Redis errors back off and
        retry until it succeeds."""
        return await run_retrying(self._prepare_thread, what, function, *args,
                                  retry_max_s=self.retry_max_s, on_retry=self.on_retry)

    async def between_commits(self, function, *args):
        """``function(*args)`` on the commit thread, so never inside a commit's WATCH … EXEC:
        a write to a watched key there (renewing the single-writer lease: its PEXPIRE) would
        void the commit, and the pipeline would drop its cached state and apply it again."""
        return await asyncio.get_running_loop().run_in_executor(self._commit_thread, function,
                                                                *args)

    async def apply(self, chunk: list[SourceMessage]) -> None:
        """Read ``chunk``, start committing the chunk computed before it, compute ``chunk``.
        Its own commit starts with the next :meth:`apply` or :meth:`start_commit`."""
        async with self._lock:
            await self._settle()
            started = time.perf_counter()
            read = await self.run("read", self.state.read, chunk)
            self._start_commit()
            computed = await self.run("compute", self.state.compute, read)
            self._computed = (chunk, started, computed)

    async def start_commit(self) -> None:
        """Start committing what was computed (without waiting for it to finish)."""
        async with self._lock:
            await self._settle()
            self._start_commit()

    async def flush(self) -> None:
        """Commit everything computed and wait until it is in Redis."""
        async with self._lock:
            await self._settle()
            self._start_commit()
            await self._settle()

    async def finish_writes(self, timeout_s: float) -> bool:
        """:meth:`flush` within ``timeout_s``; False where it did not finish in time (a
        commit may then still be writing). Run before the worker gives its partitions up, so
        that nothing it computed lands after their next writer's first commit."""
        try:
            await asyncio.wait_for(asyncio.shield(self.flush()), timeout_s)
        except asyncio.TimeoutError:
            return False
        return True

    async def settle_finished(self) -> None:
        """Account for (or recover) a commit that finished while no chunk was coming."""
        if self._lock.locked():
            return  # chunks are coming: they settle it
        async with self._lock:
            if self._in_flight is not None and self._in_flight[2].done():
                await self._settle()

    async def drain(self, assigned: list[tuple[str, int]] | None = None) -> None:
        """Commit what was computed, then forget cached state (before partitions move); given
        the partitions now ``assigned``, claim them (:meth:`LiveState.claim_sources`) and
        become their writer at once (:meth:`LiveState.prepare_to_write`; not yet for the
        owned layout's per-partition records: :meth:`take_over_idle`)."""
        await self.flush()
        async with self._lock:
            await self.run("abandon", self.state.abandon_uncommitted)
            if assigned:
                await self.run("claiming the partitions", self.state.claim_sources, assigned)
                await self.run("taking the partitions over", self.state.prepare_to_write,
                               [] if self.state.parted else assigned)

    async def take_over_idle(self, sources: list[tuple[str, int]]) -> None:
        """:meth:`LiveState.prepare_to_write` for ``sources`` while no chunk is coming (a
        chunk's read does it for its own partitions)."""
        if self._lock.locked() or not sources:
            return
        async with self._lock:
            await self.run("taking idle partitions over", self.state.prepare_to_write, sources)

    def _start_commit(self) -> None:
        if self._computed is not None:
            chunk, started, computed = self._computed
            self._computed = None
            future = asyncio.get_running_loop().run_in_executor(
                self._commit_thread, self.state.commit, computed)
            future.add_done_callback(self._note_committed)
            self._in_flight = (chunk, started, future)

    def _note_committed(self, future: asyncio.Future) -> None:
        if not future.cancelled() and future.exception() is None and future.result() is not None:
            self.on_committed(future.result())

    async def _settle(self) -> None:
        """Wait for the commit in flight; if it failed, apply it and the chunk computed after
        it (void: built on it) again from Redis's state."""
        if self._in_flight is None:
            return
        chunk, started, future = self._in_flight
        self._in_flight = None
        try:
            result = await future
        except TRANSIENT_REDIS_ERRORS as exc:
            note_redis_error(log, "commit (the chunk is applied again)", exc)
            result = None
        except PartitionClaimed as exc:
            self.on_moved(exc)
            raise
        if result is not None:
            self.on_applied(result, time.perf_counter() - started)
            return
        redo = [(chunk, started)]
        if self._computed is not None:
            redo.append(self._computed[:2])
            self._computed = None
        await self.run("abandon", self.state.abandon_uncommitted)
        self.redone_chunks += len(redo)
        for chunk, started in redo:
            result = await self.run("apply", self.state.apply_messages, chunk)
            self.on_committed(result)
            self.on_applied(result, time.perf_counter() - started)


def event_chunks(sources: list[SourceMessage], max_events: int) -> list[list[SourceMessage]]:
    """Consecutive runs of whole messages holding about ``max_events`` events each. A chunk's
    erasure requests apply before its events (:meth:`LiveState.compute`), so an erasure
    starts a new chunk where the chunk so far holds events of its user or sessions (which
    must be learnt before it); elsewhere it joins the chunk: what it erases is the same."""
    chunks: list[list[SourceMessage]] = [[]]
    size = 0
    for source in sources:
        if size and (size + len(source.events) > max_events or (
                source.erasure is not None and _holds_events_of(chunks[-1], source.erasure))):
            chunks.append([])
            size = 0
        chunks[-1].append(source)
        size += len(source.events)
    return chunks


def _holds_events_of(chunk: list[SourceMessage], erasure) -> bool:
    """Whether ``chunk`` holds an event of the erasure's user or of a session it names."""
    keys = set(erasure.keys)
    return any(event.user_id in keys or event.session_id in keys
               for message in chunk for event in message.events)
