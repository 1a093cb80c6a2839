"""Keeps an :class:`serving.ann.AnnIndex` in step with the compacted item-vector topic.

A daemon thread reads every partition from the beginning (compaction keeps each item's latest
vector, so the first pass rebuilds the index), then keeps polling; a record updates its item,
a tombstone (``null`` value) retires it. No consumer group: every serving process holds the
whole index. Malformed records are counted and skipped (the worker is their only producer).
"""

from __future__ import annotations

import logging
import threading

import msgspec
import numpy as np

from schemas import vectors
from serving.ann import AnnIndex

log = logging.getLogger("streamrec.vectors")


class VectorTail:
    def __init__(self, index: AnnIndex, bootstrap: str, topic: str,
                 client_options: dict | None = None) -> None:
        self.index, self.bootstrap, self.topic = index, bootstrap, topic
        self.client_options = client_options or {}
        self.applied = self.malformed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="vector-tail", daemon=True)

    def start(self) -> "VectorTail":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        from kafka import KafkaConsumer, TopicPartition

        consumer = None
        while not self._stop.is_set():
            try:
                if consumer is None:
                    consumer = KafkaConsumer(bootstrap_servers=self.bootstrap, group_id=None,
                                             enable_auto_commit=False, **self.client_options)
                    partitions = consumer.partitions_for_topic(self.topic)
                    if not partitions:
                        consumer.close()
                        consumer = None
                        self._stop.wait(1.0)
                        continue
                    parts = [TopicPartition(self.topic, p) for p in sorted(partitions)]
                    consumer.assign(parts)
                    consumer.seek_to_beginning(*parts)
                for records in consumer.poll(timeout_ms=200, max_records=5000).values():
                    self.apply(records)
            except Exception:  # broker blip: reconnect, resuming from the beginning is safe
                log.warning("item-vector tail failed; reconnecting", exc_info=True)
                if consumer is not None:
                    consumer.close()
                consumer = None
                self._stop.wait(1.0)
        if consumer is not None:
            consumer.close()

    def apply(self, records) -> None:
        """Apply a batch of topic records (latest per item wins within the batch)."""
        latest: dict[str, bytes | None] = {}
        for record in records:
            if record.key is None:
                self.malformed += 1
                continue
            latest[record.key.decode("utf-8", "replace")] = record.value
        upserts, deletes = [], []
        for item, value in latest.items():
            if value is None:
                deletes.append(item)
                continue
            try:
                upserts.append(vectors.decode(value))
            except (msgspec.DecodeError, msgspec.ValidationError):
                self.malformed += 1
        ok = [r for r in upserts if len(r.vector) == self.index.dim]
        self.malformed += len(upserts) - len(ok)
        if ok:
            self.index.upsert([r.item_id for r in ok],
                              np.array([r.vector for r in ok], np.float32))
        if deletes:
            self.index.delete(deletes)
        self.applied += len(ok) + len(deletes)
