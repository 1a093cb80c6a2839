"""Producer SDK: validate, batch into envelopes, publish to ``interactions``; item
descriptions to ``items`` (:class:`ItemPublisher`).

Events are validated before anything is sent (an invalid one raises
:class:`schemas.events.InvalidEvent` and nothing of it is buffered). Each event goes to the
partition Kafka's default partitioner gives its ``user_id`` (murmur2), so one user's events
stay ordered; events bound for one partition share envelopes of up to ``max_batch_events``.

Example
-------
>>> with InteractionProducer("127.0.0.1:9092") as producer:       # doctest: +SKIP
...     producer.send({"event_id": "e1", "user_id": "u1", "item_id": "i1",
...                    "type": "click", "timestamp": 1.7e9})
...     producer.flush()
"""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterable

import msgspec
from kafka import KafkaProducer
from kafka.errors import KafkaTimeoutError
from kafka.partitioner.default import murmur2

from schemas.events import (DEFAULT_MAX_MESSAGE_BYTES, MAX_ENVELOPE_EVENTS, Interaction,
                            encode_envelope, encode_erasure, validate_erasure, validate_event)
from schemas.items import ItemRecord, validate_item


class DeliveryError(RuntimeError):
    """Some envelopes were not acknowledged by Kafka. ``failed`` holds their events."""

    def __init__(self, failed: list[tuple[list[Interaction], BaseException]]) -> None:
        self.failed = failed
        events = sum(len(batch) for batch, _ in failed)
        super().__init__(f"{events} events in {len(failed)} messages not delivered; "
                         f"first error: {failed[0][1]!r}")


def partition_for(user_id: str, partitions: int) -> int:
    """The partition Kafka's default (murmur2) partitioner picks for key ``user_id``."""
    return (murmur2(user_id.encode("utf-8")) & 0x7FFFFFFF) % partitions


@dataclass(frozen=True)
class ErasureReceipt:
    """Where an erasure request landed: it has been applied once the worker's watermark of
    ``partition`` reaches ``offset`` (:func:`stream.log_positions.wait_until_applied`)."""

    request_id: str
    user_id: str
    topic: str
    partition: int
    offset: int


@dataclass
class ProducerStats:
    events_sent: int = 0
    messages_sent: int = 0
    events_failed: int = 0
    failures: list[tuple[list[Interaction], BaseException]] = field(default_factory=list)


class InteractionProducer:
    """Thread-safe batching producer of interaction events (kafka-python underneath).

    Parameters
    ----------
    bootstrap : Kafka bootstrap servers.
    topic : destination topic (``interactions``).
    max_batch_events : events per envelope, at most 1000.
    linger_s : a partition's buffer is sent once its oldest event waited this long.
    client_options : extra kafka-python options (security, SASL: ``Settings.kafka_client_options``).
    """

    def __init__(self, bootstrap: str, topic: str = "interactions", *,
                 max_batch_events: int = 500, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 linger_s: float = 0.05, client_options: dict[str, Any] | None = None) -> None:
        if not 1 <= max_batch_events <= MAX_ENVELOPE_EVENTS:
            raise ValueError(f"max_batch_events must be in 1..{MAX_ENVELOPE_EVENTS}")
        self.topic = topic
        self.max_batch_events = max_batch_events
        self.max_message_bytes = max_message_bytes
        self.linger_s = linger_s
        self._kafka = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5,
                                    retries=5, max_request_size=max_message_bytes + 65_536,
                                    **(client_options or {}))
        partitions = self._kafka.partitions_for(topic)
        if not partitions:
            self._kafka.close()
            raise ValueError(f"topic {topic!r} does not exist on {bootstrap}")
        self.partitions = len(partitions)
        self._buffers: dict[int, list[Interaction]] = {}
        self._oldest: dict[int, float] = {}
        self._lock = threading.Lock()
        # kafka-python runs callbacks on its sender thread, which send() may be waiting on:
        # they take their own lock, never the buffer lock.
        self._stats_lock = threading.Lock()
        self._futures: list = []
        self.stats = ProducerStats()

    # --- public API ------------------------------------------------------------------------
    def send(self, event: Interaction | dict[str, Any]) -> None:
        """Validate and buffer one event; raises ``InvalidEvent`` (nothing sent) if invalid."""
        self.send_many([event])

    def send_many(self, events: Iterable[Interaction | dict[str, Any]]) -> int:
        """Validate all events first, then buffer them; all-or-nothing on invalid input."""
        validated = [validate_event(e) for e in events]
        now = time.monotonic()
        with self._lock:
            for event in validated:
                p = partition_for(event.user_id, self.partitions)
                buffer = self._buffers.setdefault(p, [])
                if not buffer:
                    self._oldest[p] = now
                buffer.append(event)
                if len(buffer) >= self.max_batch_events:
                    self._send_partition(p)
            for p in [p for p, t in self._oldest.items() if now - t >= self.linger_s]:
                self._send_partition(p)
        return len(validated)

    def erase_user(self, user_id: str, session_ids: Iterable[str] = (),
                   request_id: str | None = None, timeout_s: float = 30.0) -> ErasureReceipt:
        """Ask the workers to erase what they learned of ``user_id`` (and of the sessions
        named): every event buffered here is delivered first, then the request, on the
        user's partition (it follows the user's events), and Kafka's ack is awaited. Raises
        ``InvalidEvent`` on bad ids, :class:`DeliveryError` when not acknowledged."""
        erasure = validate_erasure({  # the decoder's checks (a struct's init runs none)
            "request_id": request_id or uuid.uuid4().hex, "user_id": user_id,
            "timestamp": time.time(), "session_ids": list(session_ids)})
        self.flush(timeout_s)  # earlier events first: a retried send could overtake them
        partition = partition_for(user_id, self.partitions)
        future = self._kafka.send(self.topic, value=encode_erasure(erasure),
                                  key=user_id.encode(), partition=partition)
        try:
            metadata = future.get(timeout=timeout_s)
        except Exception as exc:  # noqa: BLE001 - kafka-python's errors and timeouts alike
            raise DeliveryError([([], exc)]) from exc
        return ErasureReceipt(erasure.request_id, user_id, self.topic, metadata.partition,
                              metadata.offset)

    def flush(self, timeout_s: float | None = 30.0) -> None:
        """Send every buffer and wait for Kafka's acks; raises :class:`DeliveryError` on loss."""
        with self._lock:
            for p in list(self._buffers):
                self._send_partition(p)
            futures, self._futures = self._futures, []
        try:
            self._kafka.flush(timeout=timeout_s)
        except KafkaTimeoutError:
            pass  # the records still pending fail below: sent, not acknowledged (may arrive)
        for fut in futures:
            if not fut.is_done:
                fut.failure(TimeoutError("not acknowledged before flush timeout"))
        with self._stats_lock:
            failures, self.stats.failures = self.stats.failures, []
        if failures:
            raise DeliveryError(failures)

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self._kafka.close()

    def __enter__(self) -> "InteractionProducer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- internals -------------------------------------------------------------------------
    def _send_partition(self, partition: int) -> None:
        events = self._buffers.pop(partition, [])
        self._oldest.pop(partition, None)
        for chunk in self._chunks(events):
            payload = encode_envelope(chunk)
            future = self._kafka.send(self.topic, value=payload, partition=partition)
            future.add_callback(self._delivered, len(chunk))
            future.add_errback(self._failed, chunk)
            self._futures.append(future)

    def _chunks(self, events: list[Interaction]):
        """Envelopes small enough for the broker's message limit (halve until they fit)."""
        stack = [events] if events else []
        while stack:
            chunk = stack.pop()
            if len(chunk) > 1 and len(encode_envelope(chunk)) > self.max_message_bytes:
                mid = len(chunk) // 2
                stack += [chunk[mid:], chunk[:mid]]
            else:
                yield chunk

    def _delivered(self, count: int, _metadata: Any) -> None:
        with self._stats_lock:
            self.stats.events_sent += count
            self.stats.messages_sent += 1

    def _failed(self, chunk: list[Interaction], exc: BaseException) -> None:
        with self._stats_lock:
            self.stats.events_failed += len(chunk)
            self.stats.failures.append((chunk, exc))


class ItemPublisher(InteractionProducer):
    """Publishes item descriptions (:mod:`schemas.items`) to the ``items`` topic, one message
    per description keyed by its item id: one partition per item keeps its descriptions in
    order, and the compacted topic keeps each item's newest. ``flush`` waits for the acks and
    raises :class:`DeliveryError` naming what was not delivered, as for events.

    >>> with ItemPublisher("127.0.0.1:9092") as items:                  # doctest: +SKIP
    ...     items.send_many([{"item_id": "m1", "timestamp": 1.7e9, "categories": ["Comedy"]}])
    ...     items.flush()
    """

    def __init__(self, bootstrap: str, topic: str = "items", **options: Any) -> None:
        super().__init__(bootstrap, topic, **options)

    def send_many(self, records: Iterable[ItemRecord | dict[str, Any]]) -> int:
        """Validate every record first (all-or-nothing: :class:`InvalidEvent` names the bad
        field), then send each one."""
        validated = [validate_item(r) for r in records]
        payloads = [msgspec.json.encode(record) for record in validated]
        for record, payload in zip(validated, payloads):
            if len(payload) > self.max_message_bytes:
                raise ValueError(f"item {record.item_id!r}: description of {len(payload)} "
                                 f"bytes exceeds the {self.max_message_bytes}-byte limit")
        with self._lock:
            for record, payload in zip(validated, payloads):
                future = self._kafka.send(self.topic, key=record.item_id.encode("utf-8"),
                                          value=payload)
                future.add_callback(self._delivered, 1)
                future.add_errback(self._failed, [record])
                self._futures.append(future)
        return len(validated)
