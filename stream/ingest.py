"""The ingest agent: decode and validate, dead-letter what is invalid, apply the rest to Redis.

Ordering matters because Faust acks every event of a ``take_events`` batch once the loop body
finishes (and acks messages it could not decode): dead letters are delivered *before* the
batch is released, a transient Redis error is retried here (the partition waits) rather than
raised, and any other exception is a bug that stops the process before the ack can be
committed, so the batch is redelivered to the restarted worker. Effects on Redis are exactly
once per source offset (:mod:`stream.state`). Chunks are applied by an
:class:`stream.pipeline.ApplyPipeline`: Redis commits one chunk while the worker computes the
next, on two threads, so the event loop keeps heartbeating. A batch's last commit stays in flight
while the next batch is fetched; Faust may then ack events not yet in Redis, which is safe
because Redis's watermarks, not Kafka's commits, say where to resume. At a rebalance the
worker waits for it before giving its partitions up (:func:`finish_writes_before_revocation`).

Redis, not Kafka, is the truth for progress: after every rebalance, before Faust seeks its
partitions to their committed offsets, :func:`resume_from_redis_watermarks` commits
``watermark + 1`` for each assigned partition (``0`` where Redis has no watermark). A worker
restarted after a crash skips what Redis already holds, and if Redis lost writes (restored
from an older snapshot, flushed), the lost offsets are consumed again from Kafka. If instead
the *log* lost what Redis holds (it went backwards, or retention deleted unapplied offsets),
the partition is held back, loudly, until an operator says where to resume
(:mod:`stream.log_positions`): checked at every rebalance and every
``STREAMREC_LOG_CHECK_INTERVAL_S``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Awaitable, Callable, NoReturn

import redis

from infra.redis_client import (TRANSIENT_REDIS_ERRORS, MemoryByNode, note_redis_error,
                                sync_redis)
from online_models import kernels
from state.redis_store import PartitionClaimed, RedisStore, release_partitions
from schemas import dlq, vectors
from schemas.events import split_source
from schemas.keys import RedisKeys
from stream import metrics
from stream.app import app, settings
from stream.log_positions import (LogEndProbe, LogMismatch, StallWatch, find_mismatches,
                                  hold, read_progress, read_watermarks, record_topic_ids,
                                  topic_ids_to_record)
from stream.pipeline import ApplyPipeline, event_chunks
from stream.state import (ApplyResult, LiveState, RedisLostWrites, SourceMessage,
                          WriterLeaseHeld)
from stream.topics import dlq_topic, interactions_topic, item_vectors_topic
from stream.vector_changes import MovedVectors, PendingVectors
from stream.worker_report import LiveFigures, publish_report

log = logging.getLogger("streamrec.ingest")
EXIT_ON_BUG = 70
#: Exit status to resume from Redis's watermarks (an operator released a held partition, a
#: stall, Redis lost writes under the worker): the supervisor restarts the worker.
EXIT_TO_RESUME = 75
_state: LiveState | None = None
_pipeline: ApplyPipeline | None = None
_vector_thread = ThreadPoolExecutor(1, thread_name_prefix="vector-publish")
#: (topic, partition) → why it is held: nothing of it is applied until an operator resets it
_held: dict[tuple[str, int], str] = {}
#: restarts a worker whose partitions stopped moving while records wait (:func:`watch_for_stall`)
_stall_watch = StallWatch(settings.worker_stall_timeout_s)
#: freshness and events/s, written to Redis for GET /v1/stats (:func:`report_figures`)
_live_figures = LiveFigures()
#: a partition's previous writer finishes its writes before giving it up
#: (:func:`finish_writes_before_revocation`) or exits; one frozen past the session timeout
#: (evicted without a rebalance of its own) may still be writing. This long after this worker
#: was assigned a partition, what a crash cut half-way is completed without a batch
#: (:func:`complete_idle_partitions`)
PREDECESSOR_DRAIN_S = 5.0


class AssignedSince:
    """When each partition (any hashable key) was assigned to this worker; a rebalance that
    keeps one keeps its time."""

    def __init__(self) -> None:
        self._since: dict = {}

    def update(self, keys) -> None:
        now = time.monotonic()
        self._since = {key: self._since.get(key, now) for key in keys}

    def settled(self, held, delay_s: float = PREDECESSOR_DRAIN_S) -> list:
        """Those of ``held`` (the consumer's assignment now) assigned here at least
        ``delay_s`` ago; none while a rebalance runs (the partitions may be moving)."""
        if app.rebalancing:
            return []
        due = time.monotonic() - delay_s
        return sorted(key for key in held if self._since.get(key, due + 1) <= due)


_sources_assigned = AssignedSince()


def exit_process(status: int) -> NoReturn:
    """Exit now with ``status``, logs flushed: no Faust shutdown, so nothing consumed since
    the last commit is acked (it is redelivered)."""
    logging.shutdown()
    os._exit(status)


def live_state() -> LiveState:
    global _state
    if _state is None:
        _state = LiveState.for_worker(settings)
    return _state


#: called with each chunk's result as soon as its commit succeeded (on the event loop)
committed_listeners: list[Callable[[ApplyResult], None]] = []


def _note_committed(result: ApplyResult) -> None:
    for listener in committed_listeners:
        listener(result)


def _record_applied(result: ApplyResult, seconds: float) -> None:
    metrics.REDIS_SECONDS.observe(seconds)
    ages = [max(result.committed_at - produced_at, 0.0) for produced_at in result.produced_at]
    for age in ages:
        metrics.MESSAGE_AGE.observe(age)
    _live_figures.record(result.committed_at, ages, result.applied_events)
    _changed_vectors.add(result.changed_item_vectors)
    metrics.EVENTS_APPLIED.inc(result.applied_events)
    metrics.SKIPPED_DUPLICATES.inc(result.duplicate_events)
    metrics.SKIPPED_REDELIVERED.inc(result.redelivered_messages)


def exit_when_moved(exc: PartitionClaimed) -> NoReturn:
    """Exit to be restarted: a partition this process was writing was assigned to another
    worker, which claimed it."""
    log.error("%s: this worker was evicted from the group without knowing (frozen past the "
              "session timeout?); exiting to rejoin, its computed writes dropped", exc)
    exit_process(EXIT_TO_RESUME)


def apply_pipeline() -> ApplyPipeline:
    global _pipeline
    if _pipeline is None:
        _pipeline = ApplyPipeline(live_state(), _record_applied, settings.redis_retry_max_s,
                                  on_retry=_stall_watch.note_activity,
                                  on_committed=_note_committed, on_moved=exit_when_moved)
        metrics.CHUNKS_REDONE.set_function(lambda: _pipeline.redone_chunks)
    return _pipeline


async def on_redis_thread(what: str, function, *args):
    """``function(*args)`` on the worker's Redis thread (the event loop keeps heartbeating);
    transient Redis errors back off and retry until it succeeds."""
    return await apply_pipeline().run(what, function, *args)


async def process_batch(messages) -> tuple[int, int]:
    """Handle one batch of Faust events; returns (events handed to Redis, messages
    dead-lettered). The last chunk's commit is started, not awaited: it overlaps the next
    batch's fetch (:func:`settle_finished_commit` accounts for it if no batch comes)."""
    sources: list[SourceMessage] = []
    letters = []
    for event in messages:
        message = event.message
        if _held and (message.topic, message.partition) in _held:
            metrics.HELD_MESSAGES.inc()  # read again from Kafka once released
            continue
        raw = message_bytes(event)
        good, bad, erasure = split_source(raw, settings.max_message_bytes)
        sources.append(SourceMessage(message.topic, message.partition, message.offset, good,
                                     len({index for index, _, _ in bad}),
                                     message.timestamp if message.timestamp > 0 else None,
                                     erasure))
        if bad:
            letters.append(dead_letter(raw, bad, message, len(good)))
    await deliver_dead_letters(letters)
    pipeline = apply_pipeline()
    for chunk in event_chunks(sources, settings.worker_apply_max_events):
        await pipeline.apply(chunk)
    await pipeline.start_commit()
    events = sum(len(source.events) for source in sources)
    metrics.MESSAGES_IN.inc(len(sources))
    metrics.EVENTS_IN.inc(events)
    metrics.ERASURE_REQUESTS.inc(sum(1 for source in sources if source.erasure is not None))
    return events, len(letters)


def message_bytes(event) -> bytes:
    """A Faust event's raw value (the topics use the raw codec)."""
    return event.value if isinstance(event.value, bytes) else bytes(event.value or b"")


def dead_letter(raw: bytes, problems, message, valid: int) -> dlq.DeadLetter:
    """The dead-letter record of one source message (its ``valid`` parts were applied)."""
    return dlq.dead_letter(raw, problems, message.topic, message.partition, message.offset,
                           valid, max_bytes=settings.max_message_bytes)


async def deliver_dead_letters(letters: list[dlq.DeadLetter],
                               count_in_redis: bool = False) -> None:
    """Send dead letters and wait for Kafka's acks: done before a batch can be acked; counted
    in ``streamrec_dlq_messages_total``. ``count_in_redis`` (the items and item-deltas
    topics): counted in the Redis counters front ends read too (``dlq_item_messages``), as
    delivered: a message redelivered after a crash is dead-lettered, and counted, again (the
    interactions topic's are counted once, in their batches' transactions)."""
    if letters:
        pending = [await dlq_topic.send(key=f"{r.source.partition}:{r.source.offset}".encode(),
                                        value=dlq.encode(r)) for r in letters]
        await asyncio.gather(*pending)
        metrics.DLQ_MESSAGES.inc(len(letters))
        if count_in_redis:
            state = live_state()
            await on_redis_thread("counting dead letters", state.client.hincrby,
                                  state.keys.stats, "dlq_item_messages", len(letters))


def _watermarks(partitions) -> tuple[dict[int, int | None], dict[int, str | None]]:
    """Redis's watermarks of ``partitions`` and the topic ids recorded beside them."""
    state = live_state()
    return read_progress(state.client, state.keys, settings.topic_interactions,
                         [tp.partition for tp in partitions])


def _record_topic_ids(partitions: list[int], topic_id: str) -> None:
    state = live_state()
    record_topic_ids(state.client, state.keys, settings.topic_interactions, partitions,
                     topic_id)


_log_probe: LogEndProbe | None = None
_log_probe_thread = ThreadPoolExecutor(1, thread_name_prefix="log-check")


def _probe() -> LogEndProbe:
    global _log_probe
    if _log_probe is None:
        _log_probe = LogEndProbe(settings.kafka_bootstrap, settings.kafka_client_options())
    return _log_probe


def _confirm(mismatches: list[LogMismatch]) -> list[LogMismatch]:
    return _probe().confirm(mismatches)


def _topic_id() -> str | None:
    return _probe().topic_id(settings.topic_interactions)


async def _log_positions(partitions) -> tuple[dict[int, int | None], list[LogMismatch]]:
    """Redis's watermarks of ``partitions`` and those that do not fit the Kafka log (by
    offsets, or by a topic id other than the one recorded beside them); records the topic id
    where none is recorded yet."""
    loop = asyncio.get_running_loop()
    marks, applied_ids = await on_redis_thread("reading watermarks", _watermarks, partitions)
    topic_id = await loop.run_in_executor(_log_probe_thread, _topic_id)
    starts = await app.consumer.earliest_offsets(*partitions)
    ends = await app.consumer.highwaters(*partitions)
    mismatches = find_mismatches(settings.topic_interactions, marks,
                                 {tp.partition: o for tp, o in starts.items()},
                                 {tp.partition: o for tp, o in ends.items()},
                                 applied_ids, topic_id)
    if mismatches:
        mismatches = await loop.run_in_executor(_log_probe_thread, _confirm, mismatches)
    recorded = topic_ids_to_record(marks, applied_ids, topic_id, mismatches)
    if recorded:
        await on_redis_thread("recording topic ids", _record_topic_ids, recorded, topic_id)
    return marks, mismatches


async def _hold(mismatches: list[LogMismatch], partitions) -> dict[tuple[str, int], str]:
    """Hold the mismatched partitions, and those Redis says are held (a hold outlives
    rebalances and restarts: once the new log grows past the watermark it would fit again,
    so only an operator's reset, which deletes the Redis field, releases it)."""
    new = [m for m in mismatches if (m.topic, m.partition) not in _held]
    for m in new:
        log.critical("holding partition: %s", m.reason)
        _held[(m.topic, m.partition)] = m.reason
    state = live_state()
    recorded = await on_redis_thread("recording held partitions", hold, state.client,
                                     state.keys, new)
    for tp in partitions:
        key = (tp.topic, tp.partition)
        if key in recorded and key not in _held:
            log.critical("holding partition (held before): %s", recorded[key])
            _held[key] = recorded[key]
    metrics.HELD_PARTITIONS.set(len(_held))
    return recorded


async def seek_to_positions(marks: dict[int, int | None], partitions) -> None:
    """Commit and seek each of ``partitions`` to the offset after its mark in Redis (0 where
    none): Redis, not Kafka, says where to resume."""
    offsets = {tp: marks[tp.partition] + 1 if marks[tp.partition] is not None else 0
               for tp in partitions}
    # Consumer._commit: faust's own commit of explicit offsets (faust-streaming is pinned).
    # Faust then seeks to committed offsets, but skips offset 0: seek explicitly as well.
    await app.consumer._commit(offsets)
    for tp, offset in offsets.items():
        await app.consumer.seek(tp, offset)
    log.info("resuming from Redis watermarks: %s",
             {f"{tp.topic}[{tp.partition}]": o for tp, o in offsets.items()})


def assigned_partitions() -> list:
    topic = settings.topic_interactions
    return sorted(tp for tp in app.consumer.assignment() if tp.topic == topic)


#: what must be in Redis before this worker gives its partitions up at a rebalance: each
#: coroutine function, given a time limit, returns whether it was done in time
revocation_writes: list[Callable[[float], Awaitable[bool]]] = []


@app.on_partitions_revoked.connect
async def finish_writes_before_revocation(sender, revoked, **_) -> None:
    """Before this worker gives its partitions up (the group waits for it), every chunk it
    computed (and, owned layout, every owner's commit) is in Redis, so nothing of it can land
    after the partitions' next writer's first commit: on a Redis Cluster a commit's writes to
    other nodes follow its transaction, and a late one would overwrite newer rows. Where that
    takes over half the rebalance timeout (Redis stalled), a worker on a Cluster exits to be
    restarted (what it did not write dies with it; its successor completes the commit from
    its redo record); on one Redis primary a late commit fails its WATCH and is harmless."""
    pipeline = apply_pipeline()
    limit_s = settings.kafka_rebalance_timeout_s / 2
    deadline = time.monotonic() + limit_s
    with metrics.REVOCATION_WRITES_SECONDS.time():
        done = [await finish(max(deadline - time.monotonic(), 0.001))
                for finish in [pipeline.finish_writes, *revocation_writes]]
    if all(done):
        if pipeline.state.parted:
            await _release_claims(pipeline.state, revoked, deadline - time.monotonic())
        return
    if pipeline.state.cluster:
        log.error("writes still running %.1f s into a rebalance (Redis stalled?); exiting so "
                  "that none lands after the partitions' next writer's", limit_s)
        exit_process(EXIT_TO_RESUME)
    log.warning("writes still running %.1f s into a rebalance; a late one fails its WATCH",
                limit_s)


async def _release_claims(state, revoked, timeout_s: float) -> None:
    """Owned layout on a Redis Cluster, everything written: give up the claims of the
    ``revoked`` partitions (source and item partitions), so that their next writers need not
    wait out the claim window (:func:`state.redis_store.claim_partitions`). Best effort:
    where it fails in time, they wait."""
    keys = [state.keys.owner_writer(tp.partition) if tp.topic == settings.topic_item_deltas
            else state.keys.source_writer(tp.topic, tp.partition) for tp in revoked]
    try:
        await asyncio.wait_for(asyncio.to_thread(release_partitions, state.client, keys,
                                                 state.writer_id), max(timeout_s, 0.1))
    except (asyncio.TimeoutError, redis.RedisError, OSError) as exc:
        log.warning("could not give up the claims of the revoked partitions (%r): their next "
                    "writers wait %.1f s before writing them", exc,
                    settings.cluster_claim_window_s)


@app.on_rebalance_complete.connect
async def resume_from_redis_watermarks(sender, **_) -> None:
    """Commit Redis's watermarks as the group's offsets (Faust then seeks to them); hold the
    partitions whose watermark does not fit the log."""
    partitions = assigned_partitions()
    _held.clear()  # recomputed for this assignment (holds recorded in Redis come back)
    _sources_assigned.update((tp.topic, tp.partition) for tp in partitions)
    if not partitions:
        metrics.HELD_PARTITIONS.set(0)
        return
    # commit what was computed; another worker may have changed this worker's cached rows
    # while it did not own them; complete now the one writer's commit a crash cut half-way
    # (else it would wait for the next batch, which may never come)
    try:
        await apply_pipeline().drain([(tp.topic, tp.partition) for tp in partitions])
    except WriterLeaseHeld as exc:  # the first batch waits for it again (and exits 75)
        log.warning("%s; the partitions' first batch will try again", exc)
    marks, mismatches = await _log_positions(partitions)
    await _hold(mismatches, partitions)
    await seek_to_positions(marks, partitions)


@app.timer(settings.log_check_interval_s)
async def check_log_positions() -> None:
    """Hold partitions whose log went backwards under a running worker. Once an operator has
    chosen where a held partition resumes (``streamrec offsets --reset`` deletes its Redis
    hold), drain and exit with :data:`EXIT_TO_RESUME` so that the restarted worker resumes
    every partition from Redis's watermarks: Faust seeks reliably only during a rebalance
    (records fetched before a seek outside one can still be delivered after it)."""
    partitions = assigned_partitions()
    if not partitions:
        return
    try:
        _, mismatches = await _log_positions(partitions)
        recorded = await _hold(mismatches, partitions)
    except Exception as exc:  # broker or Redis briefly unreachable: the next tick checks again
        log.warning("log position check failed (%r); retrying next interval", exc)
        return
    released = [key for key in _held if key not in recorded]
    if released:
        await apply_pipeline().drain()
        log.warning("an operator chose where %s resume: restarting to resume from Redis's "
                    "watermarks", ", ".join(f"{t}[{p}]" for t, p in released))
        exit_process(EXIT_TO_RESUME)


def _assigned_numbers() -> list[int]:
    try:  # read from the watch's thread: a snapshot of the consumer's current assignment
        return [tp.partition for tp in assigned_partitions()]
    except Exception:  # noqa: BLE001 - mid-rebalance: treat as holding nothing
        return []


def watch_for_stall(stop: threading.Event) -> None:
    """The stall watch's thread (:class:`stream.log_positions.StallWatch`): every
    ``STREAMREC_WORKER_STALL_TIMEOUT_S / 6`` it reads the log's ends with its own Kafka client
    and Redis's watermarks with its own connection; when the partitions this worker should
    apply wait without moving for the timeout, it exits with :data:`EXIT_TO_RESUME`."""
    interval = max(settings.worker_stall_timeout_s / 6, 0.5)
    probe, client = None, None
    topic = settings.topic_interactions
    while not stop.wait(interval):
        try:
            probe = probe or LogEndProbe(settings.kafka_bootstrap,
                                         settings.kafka_client_options())
            client = client or sync_redis(settings.redis_url)
            partitions, starts, ends = probe.bounds(topic)
            marks = read_watermarks(client, RedisKeys(settings.key_prefix), topic, partitions)
        except Exception as exc:  # noqa: BLE001 - broker or Redis unreachable: no verdict
            log.warning("stall check failed (%r); retrying next interval", exc)
            _stall_watch.note_activity()
            continue
        mine = [p for p in _assigned_numbers() if (topic, p) not in _held]
        held = {p for t, p in list(_held) if t == topic}
        marks = {p: m for p, m in marks.items() if p not in held}
        seconds, unmoved = _stall_watch.check(time.monotonic(), marks, starts, ends, mine)
        metrics.STALLED_SECONDS.set(seconds)
        if _stall_watch.stalled(seconds):
            log.critical("stalled: records wait unapplied in %s and nothing moved for %.0f s "
                         "(assigned here: %s); exiting to restart from Redis's watermarks",
                         ", ".join(f"{topic}[{p}]" for p in unmoved), seconds,
                         mine or "none")
            exit_process(EXIT_TO_RESUME)


def report_figures(stop: threading.Event) -> None:
    """The report thread: every ``STREAMREC_WORKER_REPORT_INTERVAL_S`` this worker's live
    figures go to its field of ``sr:{stats}:workers`` (own Redis connection)."""
    worker_id = f"{socket.gethostname()}:{os.getpid()}"
    keys, client = RedisKeys(settings.key_prefix), None
    memory = MemoryByNode(log)  # an ACL from before the worker role had +info: one warning
    while not stop.wait(settings.worker_report_interval_s):
        now = time.time()
        report = {**_live_figures.snapshot(now), "assigned": sorted(_assigned_numbers()),
                  "chunks_redone": _pipeline.redone_chunks if _pipeline else 0}
        try:
            client = client or sync_redis(settings.redis_url)
            publish_report(client, keys, worker_id, report, now)
        except Exception as exc:  # noqa: BLE001 - Redis away: the next report tries again
            log.debug("worker report not written (%r)", exc)
            continue
        try:
            for node, (used, limit, evicted) in memory(client).items():
                metrics.REDIS_USED_MEMORY.labels(node).set(used)
                metrics.REDIS_MAXMEMORY.labels(node).set(limit)
                metrics.REDIS_EVICTED_KEYS.labels(node).set(evicted)
        except Exception as exc:  # noqa: BLE001 - Redis away: the next report tries again
            log.debug("Redis memory not read (%r)", exc)


#: stops the side threads (stall watch, figures report); daemon threads, so never set live
_side_threads_stop = threading.Event()


@app.task
async def start_side_threads() -> None:
    """The stall watch and the figures report, each on a thread of its own when enabled."""
    for enabled, target, name in ((settings.worker_stall_timeout_s, watch_for_stall,
                                   "stall-watch"),
                                  (settings.worker_report_interval_s, report_figures,
                                   "figures-report")):
        if enabled:
            threading.Thread(target=target, args=(_side_threads_stop,), name=name,
                             daemon=True).start()


def _vector_model():
    return next((m for m in live_state().models if m.name == "mf"), None)


_moved = MovedVectors(settings.vector_publish_min_change)
# items whose vectors changed and were not published since
_changed_vectors = PendingVectors(_moved)
_published_store: RedisStore | None = None


def _vector_store(model) -> RedisStore:
    """The MF item vectors, through a store of its own: the apply path's store holds
    prefetched vectors for its next chunk."""
    global _published_store
    if _published_store is None:
        _published_store = RedisStore(live_state().client, settings.key_prefix, model.name)
    return _published_store


def read_changed_vectors(items: list[str]) -> tuple[list[tuple[str, bytes]], list[str]]:
    """((key, record) pairs for the item-vector topic: changed vectors that moved enough since
    last published, read from the live MF state; items that qualify but must wait)."""
    model, now = _vector_model(), time.time()
    found_vectors, found = _vector_store(model).get_vectors("item", items, model.factors)
    items = [item for item, ok in zip(items, found) if ok]
    found_vectors = found_vectors[found]
    chosen, waiting = _moved.select_limited(items, found_vectors, settings.vector_publish_max)
    return ([(items[n], vectors.encode(vectors.ItemVector(items[n], model.name,
                                                          found_vectors[n].tolist(), now)))
             for n in chosen], [items[n] for n in waiting])


@app.timer(settings.vector_publish_interval_s)
async def publish_changed_vectors() -> None:
    """Coalesce changed item vectors and publish each item's latest vector once per interval."""
    if not _changed_vectors or _vector_model() is None:
        _changed_vectors.clear()
        return
    # a bounded look per interval (a backlog after catching up can hold every item)
    items = _changed_vectors.take(4 * settings.vector_publish_max)
    # its own thread: reading and choosing thousands of vectors must not hold up a chunk
    try:
        records, waiting = await asyncio.get_running_loop().run_in_executor(
            _vector_thread, read_changed_vectors, items)
    except TRANSIENT_REDIS_ERRORS as exc:
        log.warning("redis unavailable while publishing vectors (%r); retrying", exc)
        _changed_vectors.add(items)
        return
    _changed_vectors.add(waiting)
    await send_keyed(item_vectors_topic.get_topic_name(),
                     [(item.encode(), value) for item, value in records])
    metrics.VECTORS_PUBLISHED.inc(len(records))


async def send_keyed(topic: str, records: list[tuple[bytes, bytes]]) -> None:
    """Queue ready (key, value) records on the app's producer, one record batch per partition
    (the partitioner Faust's own sends use). Faust's ``Topic.send`` costs ~80 µs a record and
    the producer's ``send`` ~30 µs, which at thousands a second starves the agent."""
    producer = await app.maybe_start_producer()
    by_partition: dict[int, list[tuple[bytes | None, bytes]]] = {}
    for key, value in records:
        by_partition.setdefault(producer.key_partition(topic, key).partition, []).append(
            (key, value))
    await send_to_partitions(topic, by_partition)


async def send_to_partitions(topic: str, by_partition: dict[int, list[tuple[bytes | None, bytes]]]
                             ) -> list[asyncio.Future]:
    """Queue (key, value) records on the app's producer in record batches, each partition's in
    the given order; returns the batches' delivery futures."""
    producer = await app.maybe_start_producer()
    kafka = producer._ensure_producer()  # faust's aiokafka producer (faust-streaming is pinned)
    sent = []
    for partition, rows in by_partition.items():
        batch = kafka.create_batch()
        for key, value in rows:
            if batch.append(key=key, value=value, timestamp=None) is None:  # full
                sent.append(await kafka.send_batch(batch, topic, partition=partition))
                batch = kafka.create_batch()
                batch.append(key=key, value=value, timestamp=None)
        sent.append(await kafka.send_batch(batch, topic, partition=partition))
    return sent


@app.timer(0.25)
async def settle_finished_commit() -> None:
    """Metrics for, or recovery of, a batch's last commit when no next batch has come."""
    await apply_pipeline().settle_finished()


@app.timer(1.0)
async def complete_idle_partitions() -> None:
    """Owned layout on a Redis Cluster: each source partition assigned here
    :data:`PREDECESSOR_DRAIN_S` ago or more gets its last commit completed from its redo
    record if no batch did it (a crash may have cut it half-way, and none may come: the
    watermark says it was applied). Not sooner: the partition's previous writer may still
    be committing, and its newer writes must not be overwritten by the older record."""
    if not live_state().parted:
        return
    held = [(tp.topic, tp.partition) for tp in assigned_partitions()]
    try:
        await apply_pipeline().take_over_idle(
            [source for source in _sources_assigned.settled(held) if source not in _held])
    except PartitionClaimed as exc:  # evicted without knowing: another worker holds it
        exit_when_moved(exc)
    except Exception as exc:  # noqa: BLE001 - the next tick tries again (a batch may first)
        log.warning("completing idle partitions' last commits failed (%r)", exc)


@app.timer(5.0)
async def report_consumer_lag() -> None:
    consumer = app.consumer
    for tp in consumer.assignment():
        if tp.topic == settings.topic_interactions:
            high = consumer.highwater(tp)
            position = consumer._read_offset.get(tp)  # faust's last read offset (pinned)
            if high is not None and position is not None:
                metrics.CONSUMER_LAG.labels(tp.topic, str(tp.partition)).set(
                    max(high - position - 1, 0))


@app.timer(settings.state_writer_lease_s / 4)
async def renew_writer_lease() -> None:
    """Keep the single-writer lease while no batch comes (each commit renews it too),
    between commits: every commit WATCHes the lease."""
    lease = live_state().lease
    if lease is not None and lease.held:
        try:
            await apply_pipeline().between_commits(lease.renew)
        except TRANSIENT_REDIS_ERRORS as exc:  # the next tick tries again; a commit that
            # finds the lease lapsed meanwhile takes it again before writing
            note_redis_error(log, "renewing the writer lease", exc)


@app.task
async def warm_up_kernels() -> None:
    """Load the models' compiled loops at start (off the event loop), not in the first batch."""
    await asyncio.get_running_loop().run_in_executor(None, kernels.warm_up)


async def consume_batches(stream, handle, what: str) -> None:
    """Hand each batch of a Faust stream to ``handle``. Any exception but cancellation is a
    bug: the process exits before Faust can ack the batch, so it is redelivered, not lost."""
    async for messages in stream.take_events(settings.worker_batch_max,
                                             within=settings.worker_batch_within_s):
        try:
            await handle(messages)
        except asyncio.CancelledError:
            raise
        except RedisLostWrites as exc:
            log.error("%s; restarting to consume the lost offsets again from Kafka", exc)
            exit_process(EXIT_TO_RESUME)
        except PartitionClaimed as exc:
            exit_when_moved(exc)
        except WriterLeaseHeld as exc:
            log.error("%s; exiting, its computed writes dropped", exc)
            exit_process(EXIT_TO_RESUME)
        except Exception:
            log.critical("%s bug; exiting so the batch is redelivered", what, exc_info=True)
            exit_process(EXIT_ON_BUG)


async def _ingest_batch(messages) -> None:
    with metrics.BATCH_SECONDS.time():
        applied, dead = await process_batch(messages)
    log.debug("batch", extra={"messages": len(messages), "applied": applied,
                              "dead_lettered": dead})


@app.agent(interactions_topic)
async def ingest(stream) -> None:
    await consume_batches(stream, _ingest_batch, "ingest")
