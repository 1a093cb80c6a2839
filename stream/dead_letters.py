"""Dead letters read back: what the dead-letter topic holds, and re-drive after a fix.

Each record (:mod:`schemas.dlq`) keeps the rejected message (or points to it at its source
topic, partition and offset) and says which events of it failed. After a fix (a producer
bug mended by hand, a worker upgraded to a schema the producers already used), ``streamrec
dlq --redrive`` validates each original again with today's decoder and publishes what is
valid now and was not applied then:

- a message rejected whole (``valid_events_applied`` 0): all its events valid now;
- a partly applied envelope: only the failed indexes (``problems``) valid now; the events
  applied then are never sent again. Where the record could not list every problem
  (``problems_omitted``) it cannot say which were applied: left for a person to decide;
- item descriptions: every description valid now (an upsert: sending one again changes
  nothing).

Events keep their ids, so a re-drive interrupted and run again is deduplicated by the worker
(within ``STREAMREC_DEDUP_TTL_S``). Progress is the consumer group's committed offset on the
dead-letter topic, committed once Kafka acknowledged what was re-driven: a record is
re-driven once, and the next run starts after it.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import msgspec

from schemas import dlq
from schemas.events import split_message, split_source
from schemas.items import split_items
from stream.log_positions import LogEndProbe

#: Outcomes of one dead letter, as the summary counts them.
REDRIVEN, STILL_INVALID, NOTHING_LEFT = "re-driven", "still invalid", "nothing left to apply"
ORIGINAL_GONE, ORIGINAL_CHANGED = "original gone from its topic", "original changed at its offset"
UNKNOWN_APPLIED = "partly applied, problems omitted: which were applied is unknown"
ERASURE_NOT_REDRIVEN = ("an erasure request, valid now: not re-driven (applied late it would "
                        "erase what came after it): send it again")
INTERNAL_NOT_REDRIVEN = "not an item-delta record on the workers' own topic: not re-driven"


@dataclass
class Redrive:
    """What re-driving one dead letter publishes, and why."""

    outcome: str
    events: list = field(default_factory=list)  # Interaction or ItemRecord, valid now
    still_invalid: int = 0


def plan_redrive(record: dlq.DeadLetter, original: bytes | None, items_topic: str,
                 max_bytes: int, item_deltas_topic: str = "") -> Redrive:
    """What of ``record``'s original (its bytes, or None when its topic no longer holds it)
    to publish again: valid with today's decoder and not applied when it was rejected.
    Nothing from ``item_deltas_topic`` (only workers write records there)."""
    if record.source.topic == item_deltas_topic:
        return Redrive(INTERNAL_NOT_REDRIVEN)
    if original is None:
        return Redrive(ORIGINAL_GONE)
    if record.original_sha256 and hashlib.sha256(original).hexdigest() != record.original_sha256:
        return Redrive(ORIGINAL_CHANGED)
    items = record.source.topic == items_topic
    if not items and split_source(original, max_bytes)[2] is not None:
        return Redrive(ERASURE_NOT_REDRIVEN)
    valid, invalid = (split_items if items else split_message)(original, max_bytes)
    still = len(invalid)
    if items or record.valid_events_applied == 0:
        chosen = valid
    elif record.problems_omitted or any(p.index is None for p in record.problems):
        return Redrive(UNKNOWN_APPLIED, still_invalid=still)
    elif any(index is None for index, _, _ in invalid):
        chosen = []  # the whole message is refused now: nothing of it is valid
    else:
        failed = {p.index for p in record.problems}
        now_invalid = {index for index, _, _ in invalid}
        valid_indexes = [i for i in range(len(valid) + len(invalid)) if i not in now_invalid]
        chosen = [event for index, event in zip(valid_indexes, valid) if index in failed]
        still = len(now_invalid & failed)  # not those applied then that today's rules refuse
    if chosen:
        return Redrive(REDRIVEN, chosen, still)
    return Redrive(STILL_INVALID if still else NOTHING_LEFT, still_invalid=still)


_INDEX = re.compile(r"\[\d+\]")


def reason_kind(record: dlq.DeadLetter) -> str:
    """The first problem with envelope indexes dropped (``events[].dwell_ms: ...``): records
    that failed the same way count together."""
    head = f"{record.problems[0].field}: {record.problems[0].reason}" if record.problems \
        else record.reason
    return _INDEX.sub("[]", head)[:200]


@dataclass
class Summary:
    """What a pass over the dead-letter topic found (and re-drove)."""

    records: int = 0
    unreadable: int = 0
    sources: Counter = field(default_factory=Counter)
    reasons: Counter = field(default_factory=Counter)
    outcomes: Counter = field(default_factory=Counter)
    events_redriven: int = 0
    events_still_invalid: int = 0
    oldest: float | None = None
    newest: float | None = None

    def add(self, record: dlq.DeadLetter, redrive: Redrive) -> None:
        self.records += 1
        self.sources[record.source.topic] += 1
        self.reasons[reason_kind(record)] += 1
        self.outcomes[redrive.outcome] += 1
        self.events_redriven += len(redrive.events)
        self.events_still_invalid += redrive.still_invalid
        self.oldest = min(self.oldest or record.failed_at, record.failed_at)
        self.newest = max(self.newest or record.failed_at, record.failed_at)

    def as_dict(self, sent: bool) -> dict[str, Any]:
        return {"dead_letters": self.records, "unreadable": self.unreadable, "sent": sent,
                "sources": dict(self.sources),
                "oldest": _utc(self.oldest), "newest": _utc(self.newest),
                "events_redriven" if sent else "events_to_redrive": self.events_redriven,
                "events_still_invalid": self.events_still_invalid,
                "outcomes": dict(self.outcomes.most_common()),
                "reasons": dict(self.reasons.most_common(20))}


def _utc(stamp: float | None) -> str | None:
    return None if stamp is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(stamp))


def redrive_dead_letters(reader: "DeadLetterReader", summary: Summary, settings,
                         send: bool) -> None:
    """Plan each dead letter ``reader`` yields into ``summary``; with ``send``, publish each
    batch's re-drives to their source topics and commit the batch once Kafka acknowledged it
    (:class:`stream.producer.DeliveryError` otherwise: nothing of that batch committed;
    ``LookupError`` when a source topic no longer exists)."""
    from stream.producer import InteractionProducer, ItemPublisher

    producers: dict[str, InteractionProducer] = {}
    try:
        for batch in reader.batches():
            sends: dict[str, list] = {}
            for record, original in batch:
                if record is None:
                    summary.unreadable += 1
                    continue
                redrive = plan_redrive(record, original, settings.topic_items,
                                       settings.max_message_bytes, settings.topic_item_deltas)
                summary.add(record, redrive)
                if send and redrive.events:
                    sends.setdefault(record.source.topic, []).extend(redrive.events)
            for topic, events in sends.items():
                if topic not in producers:
                    kind = ItemPublisher if topic == settings.topic_items else InteractionProducer
                    try:
                        producers[topic] = kind(settings.kafka_bootstrap, topic,
                                                max_message_bytes=settings.max_message_bytes,
                                                client_options=settings.kafka_client_options())
                    except ValueError as exc:  # the source topic is gone
                        raise LookupError(str(exc)) from None
                producers[topic].send_many(events)
            if send:
                for producer in producers.values():
                    producer.flush()
                reader.commit()
    finally:
        for producer in producers.values():
            try:
                producer.close()
            except Exception:  # closing after a failed delivery: the error is already raised
                pass


class DeadLetterReader:
    """The dead-letter topic from the group's committed offsets (or the log start) to its
    end as this run began, with each original (fetched from its source where the record only
    points to it); :meth:`commit` records how far a re-drive got."""

    def __init__(self, bootstrap: str, topic: str, group: str, from_beginning: bool,
                 client_options: dict[str, Any]) -> None:
        from kafka import KafkaConsumer, TopicPartition

        self.topic = topic
        self._consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group,
                                       enable_auto_commit=False, **client_options)
        self._log = LogEndProbe(bootstrap, client_options)  # reads ends and originals
        partitions = self._consumer.partitions_for_topic(topic)
        if not partitions:
            self.close()
            raise LookupError(f"topic {topic!r} does not exist on {bootstrap}")
        self._partitions = [TopicPartition(topic, p) for p in sorted(partitions)]
        self._consumer.assign(self._partitions)
        self._ends = {tp: self._log.log_end(topic, tp.partition, reported)  # answers can trail
                      for tp, reported in self._consumer.end_offsets(self._partitions).items()}
        starts = self._consumer.beginning_offsets(self._partitions)
        self._done: dict = {}  # partition → the offset after the last record yielded
        for tp in self._partitions:
            committed = None if from_beginning else self._consumer.committed(tp)
            self._consumer.seek(tp, max(committed or 0, starts[tp]))

    def batches(self, timeout_s: float = 30.0):
        """Lists of ``(record, original bytes or None)``, in order, until the ends (``record``
        None: not a dead-letter record)."""
        deadline = time.monotonic() + timeout_s
        while any(self._consumer.position(tp) < self._ends[tp] for tp in self._partitions):
            polled = self._consumer.poll(timeout_ms=1000, max_records=500)
            if not polled:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{self.topic}: no records within {timeout_s:g} s "
                                       f"before its end")
                continue
            deadline = time.monotonic() + timeout_s
            batch = []
            for tp, messages in polled.items():
                for message in messages:
                    if message.offset >= self._ends[tp]:
                        continue  # came after this run began: the next run's
                    self._done[tp] = message.offset + 1
                    try:
                        record = dlq.decode(message.value)
                    except msgspec.MsgspecError:  # not written by a worker: counted, left
                        batch.append((None, None))
                        continue
                    source = record.source
                    batch.append((record, record.original if not record.original_omitted
                                  else self._log.message_at(source.topic, source.partition,
                                                            source.offset)))
            yield batch

    def commit(self) -> None:
        """Record in the group that every record yielded so far is done (not those read past
        the run's end: they are the next run's)."""
        from kafka.structs import OffsetAndMetadata

        if self._done:
            self._consumer.commit({tp: OffsetAndMetadata(offset, "", -1)
                                   for tp, offset in self._done.items()})

    def close(self) -> None:
        self._consumer.close()
        self._log.close()
