"""The ingest agent: decode and validate, dead-letter what is invalid, apply the rest to Redis.

Ordering matters because Faust acks every event of a ``take_events`` batch once the loop body
finishes (and acks messages it could not decode): dead letters are delivered *before* the
batch is released, a transient Redis error is retried here (the partition waits) rather than
raised, and any other exception is a bug that stops the process before the ack can be
committed, so the batch is redelivered to the restarted worker. Effects on Redis are exactly
once per source offset (:meth:`stream.state.LiveState.apply_messages`); the Redis work runs on
one worker thread so the event loop keeps heartbeating while a batch is applied.

Redis, not Kafka, is the truth for progress: after every rebalance, before Faust seeks its
partitions to their committed offsets, :func:`resume_from_redis_watermarks` commits
``watermark + 1`` for each assigned partition (``0`` where Redis has no watermark). A worker
restarted after a crash skips what Redis already holds, and if Redis lost writes (restored
from an older snapshot, flushed), the lost offsets are consumed again from Kafka.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor

from infra.redis_client import TRANSIENT_REDIS_ERRORS, sync_redis
from online_models.registry import build_on_redis
from schemas import dlq, vectors
from schemas.events import split_message
from stream import metrics
from stream.app import app, settings
from stream.state import LiveState, SourceMessage
from stream.topics import dlq_topic, interactions_topic, item_vectors_topic
from stream.vector_changes import MovedVectors

log = logging.getLogger("streamrec.ingest")
EXIT_ON_BUG = 70
_state: LiveState | None = None
_changed_vectors: set[str] = set()  # items whose vectors changed since the last publish
_redis_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="redis-apply")


def live_state() -> LiveState:
    global _state
    if _state is None:
        client = sync_redis(settings.redis_url)
        models = build_on_redis(settings.live_model_names, client, settings.key_prefix)
        _state = LiveState(settings, client, list(models.values()))
    return _state


async def on_redis_thread(what: str, function, *args):
    """``function(*args)`` on the worker's Redis thread (the event loop keeps heartbeating);
    transient Redis errors back off and retry until it succeeds."""
    loop, delay = asyncio.get_running_loop(), 0.05
    while True:
        try:
            return await loop.run_in_executor(_redis_thread, function, *args)
        except TRANSIENT_REDIS_ERRORS as exc:
            log.warning("redis unavailable during %s (%r); retrying in %.2fs", what, exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, settings.redis_retry_max_s)


async def process_batch(messages) -> tuple[int, int]:
    """Handle one batch of Faust events; returns (events applied, messages dead-lettered)."""
    sources: list[SourceMessage] = []
    letters = []
    for event in messages:
        message = event.message
        raw = event.value if isinstance(event.value, bytes) else bytes(event.value or b"")
        good, bad = split_message(raw, settings.max_message_bytes)
        sources.append(SourceMessage(message.topic, message.partition, message.offset, good,
                                     len({index for index, _, _ in bad})))
        if bad:
            letters.append(dlq.dead_letter(raw, bad, message.topic, message.partition,
                                           message.offset, len(good)))
    if letters:
        pending = [await dlq_topic.send(key=f"{r.source.partition}:{r.source.offset}".encode(),
                                        value=dlq.encode(r)) for r in letters]
        await asyncio.gather(*pending)  # delivered before the batch can be acked
    applied = 0
    for chunk in event_chunks(sources, settings.worker_apply_max_events):
        started = time.perf_counter()
        result = await on_redis_thread("apply", live_state().apply_messages, chunk)
        metrics.REDIS_SECONDS.observe(time.perf_counter() - started)
        applied += result.applied_events
        _changed_vectors.update(result.changed_item_vectors)
        metrics.EVENTS_APPLIED.inc(result.applied_events)
        metrics.SKIPPED_DUPLICATES.inc(result.duplicate_events)
        metrics.SKIPPED_REDELIVERED.inc(result.redelivered_messages)
    metrics.MESSAGES_IN.inc(len(sources))
    metrics.EVENTS_IN.inc(sum(len(source.events) for source in sources))
    metrics.DLQ_MESSAGES.inc(len(letters))
    return applied, len(letters)


def event_chunks(sources: list[SourceMessage], max_events: int) -> list[list[SourceMessage]]:
    """Consecutive runs of whole messages holding about ``max_events`` events each."""
    chunks: list[list[SourceMessage]] = [[]]
    size = 0
    for source in sources:
        if size and size + len(source.events) > max_events:
            chunks.append([])
            size = 0
        chunks[-1].append(source)
        size += len(source.events)
    return chunks


def redis_resume_offsets(partitions) -> dict:
    """``{tp: watermark + 1}`` for the given topic partitions (0 where Redis has none)."""
    state = live_state()
    marks = state.client.mget([state.keys.watermark(tp.topic, tp.partition)
                               for tp in partitions]) if partitions else []
    return {tp: int(mark) + 1 if mark is not None else 0 for tp, mark in zip(partitions, marks)}


@app.on_rebalance_complete.connect
async def resume_from_redis_watermarks(sender, **_) -> None:
    """Commit Redis's watermarks as the group's offsets; Faust then seeks to them."""
    topic = settings.topic_interactions
    partitions = sorted(tp for tp in app.consumer.assignment() if tp.topic == topic)
    if not partitions:
        return
    offsets = await on_redis_thread("reading watermarks", redis_resume_offsets, partitions)
    # Consumer._commit: faust's own commit of explicit offsets (faust-streaming is pinned).
    # Faust then seeks to committed offsets, but skips offset 0: seek explicitly as well.
    await app.consumer._commit(offsets)
    for tp, offset in offsets.items():
        await app.consumer.seek(tp, offset)
    log.info("resuming from Redis watermarks: %s",
             {f"{tp.topic}[{tp.partition}]": o for tp, o in offsets.items()})


def _vector_model():
    return next((m for m in live_state().models if m.name == "mf"), None)


_moved = MovedVectors(settings.vector_publish_min_change)


def read_changed_vectors(items: list[str]) -> list[tuple[str, bytes]]:
    """(key, record) pairs for the item-vector topic: the changed vectors that moved enough
    since last published, read from the live MF state."""
    model, now = _vector_model(), time.time()
    found_vectors, found = model.store.get_vectors("item", items, model.factors)
    items = [item for item, ok in zip(items, found) if ok]
    found_vectors = found_vectors[found]
    return [(items[n], vectors.encode(vectors.ItemVector(items[n], model.name,
                                                         found_vectors[n].tolist(), now)))
            for n in _moved.select(items, found_vectors)]


@app.timer(settings.vector_publish_interval_s)
async def publish_changed_vectors() -> None:
    """Coalesce changed item vectors and publish each item's latest vector once per interval."""
    if not _changed_vectors or _vector_model() is None:
        _changed_vectors.clear()
        return
    items = sorted(_changed_vectors)
    _changed_vectors.clear()
    records = await on_redis_thread("reading changed vectors", read_changed_vectors, items)
    for item, value in records:
        await item_vectors_topic.send(key=item.encode(), value=value)
    metrics.VECTORS_PUBLISHED.inc(len(records))


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


@app.task
async def serve_metrics() -> None:
    if settings.worker_metrics_port:
        from prometheus_client import start_http_server
        start_http_server(settings.worker_metrics_port, addr=settings.worker_metrics_host)
        log.info("metrics on http://%s:%d/metrics", settings.worker_metrics_host,
                 settings.worker_metrics_port)


@app.agent(interactions_topic)
async def ingest(stream) -> None:
    async for messages in stream.take_events(settings.worker_batch_max,
                                             within=settings.worker_batch_within_s):
        try:
            with metrics.BATCH_SECONDS.time():
                applied, dead = await process_batch(messages)
            log.debug("batch", extra={"messages": len(messages), "applied": applied,
                                      "dead_lettered": dead})
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug: crash before Faust acks the batch, so nothing is lost
            log.critical("ingest bug; exiting so the batch is redelivered", exc_info=True)
            logging.shutdown()
            os._exit(EXIT_ON_BUG)
