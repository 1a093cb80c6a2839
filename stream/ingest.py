"""The ingest agent: decode and validate, dead-letter what is invalid, apply the rest to Redis.

Ordering matters because Faust acks every event of a ``take_events`` batch once the loop body
finishes (and acks messages it could not decode): dead letters are delivered *before* the
batch is released, a transient Redis error is retried here (the partition waits) rather than
raised, and any other exception is a bug that stops the process before the ack can be
committed, so the batch is redelivered to the restarted worker. Effects on Redis are exactly
once per source offset (:meth:`stream.state.LiveState.apply_messages`); the Redis work runs on
one worker thread so the event loop keeps heartbeating while a batch is applied.
"""

from __future__ import annotations

import asyncio
import logging
import os
from concurrent.futures import ThreadPoolExecutor

from infra.redis_client import TRANSIENT_REDIS_ERRORS, sync_redis
from online_models.registry import build
from online_models.store import RedisStore
from schemas import dlq
from schemas.events import split_message
from stream.app import app, settings
from stream.state import LiveState, SourceMessage
from stream.topics import dlq_topic, interactions_topic

log = logging.getLogger("streamrec.ingest")
EXIT_ON_BUG = 70
_state: LiveState | None = None
_redis_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="redis-apply")


def live_state() -> LiveState:
    global _state
    if _state is None:
        client = sync_redis(settings.redis_url)
        models = [build(name).bind(RedisStore(client, settings.key_prefix, name))
                  for name in filter(None, settings.live_models.split(","))]
        _state = LiveState(settings, client, models)
    return _state


async def with_redis_retry(operation, what: str) -> None:
    """Run ``operation()`` until it succeeds; transient Redis errors back off and retry."""
    delay = 0.05
    while True:
        try:
            return await operation()
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
    loop = asyncio.get_running_loop()
    result = await with_redis_retry(
        lambda: loop.run_in_executor(_redis_thread, live_state().apply_messages, sources),
        "apply")
    return result.applied_events, len(letters)


@app.agent(interactions_topic)
async def ingest(stream) -> None:
    async for messages in stream.take_events(settings.worker_batch_max,
                                             within=settings.worker_batch_within_s):
        try:
            await process_batch(messages)
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug: crash before Faust acks the batch, so nothing is lost
            log.critical("ingest bug; exiting so the batch is redelivered", exc_info=True)
            logging.shutdown()
            os._exit(EXIT_ON_BUG)
