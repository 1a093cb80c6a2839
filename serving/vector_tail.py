"""Keeps an :class:`serving.ann.AnnIndex` in step with the compacted item-vector topic.

A daemon thread reads every partition from the beginning (compaction keeps each item's latest
vector, so the first pass rebuilds the index), then keeps polling; a record updates its item,
a tombstone (``null`` value) retires it. No consumer group: every serving process holds the
whole index. Malformed records are counted and skipped (the worker is their only producer).

With a ``snapshot_dir`` the index and the topic offsets it covers are saved every
``snapshot_interval_s`` (and on stop); a restarted process loads the snapshot and resumes the
topic from those offsets instead of re-reading it all (:meth:`VectorTail.restore`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from pathlib import Path

import msgspec
import numpy as np

from schemas import vectors
from serving.ann import AnnIndex

log = logging.getLogger("streamrec.vectors")


class VectorTail:
    def __init__(self, index: AnnIndex, bootstrap: str, topic: str,
                 client_options: dict | None = None, snapshot_dir: str | None = None,
                 snapshot_interval_s: float = 300.0, offsets: dict[int, int] | None = None
                 ) -> None:
        self.index, self.bootstrap, self.topic = index, bootstrap, topic
        self.client_options = client_options or {}
        self.snapshot_dir = Path(snapshot_dir) if snapshot_dir else None
        self.snapshot_interval_s = snapshot_interval_s
        self.offsets: dict[int, int] = dict(offsets or {})  # partition → next offset to read
        self.applied = self.malformed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="vector-tail", daemon=True)

    def start(self) -> "VectorTail":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self.save_snapshot()

    @classmethod
    def restore(cls, dim: int, bootstrap: str, topic: str, client_options: dict | None = None,
                snapshot_dir: str | None = None, max_items: int | None = None,
                **options) -> "VectorTail":
        """A tail over the saved index and offsets when a snapshot exists, else a fresh one."""
        path = Path(snapshot_dir) if snapshot_dir else None
        if path is not None and (path / "offsets.json").exists():
            offsets = {int(p): o for p, o in json.loads((path / "offsets.json").read_text())
                       .items()}
            index = AnnIndex.load(path, max_items=max_items)
            log.info("item vectors: %d from the snapshot, resuming at %s", len(index), offsets)
        else:
            offsets, index = {}, AnnIndex(dim, max_items=max_items)
        return cls(index, bootstrap, topic, client_options, snapshot_dir, offsets=offsets,
                   **options)

    def save_snapshot(self) -> None:
        """Write index + offsets to a temp dir, then swap it in (a crash never leaves half)."""
        if self.snapshot_dir is None:
            return
        tmp = self.snapshot_dir.with_name(self.snapshot_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        offsets = dict(self.offsets)  # taken before the index: replaying a little is harmless
        self.index.save(tmp)
        (tmp / "offsets.json").write_text(json.dumps(offsets))
        old = self.snapshot_dir.with_name(self.snapshot_dir.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        if self.snapshot_dir.exists():
            os.rename(self.snapshot_dir, old)
        os.rename(tmp, self.snapshot_dir)
        shutil.rmtree(old, ignore_errors=True)

    def _run(self) -> None:
        from kafka import KafkaConsumer, TopicPartition

        consumer = None
        while not self._stop.is_set():
            try:
                if consumer is None:
                    consumer = KafkaConsumer(bootstrap_servers=self.bootstrap, group_id=None,
                                             enable_auto_commit=False,
                                             bootstrap_timeout_ms=5000, **self.client_options)
                    partitions = consumer.partitions_for_topic(self.topic)
                    if not partitions:
                        consumer.close()
                        consumer = None
                        self._stop.wait(1.0)
                        continue
                    parts = [TopicPartition(self.topic, p) for p in sorted(partitions)]
                    consumer.assign(parts)
                    for tp in parts:
                        if tp.partition in self.offsets:
                            consumer.seek(tp, self.offsets[tp.partition])
                        else:
                            consumer.seek_to_beginning(tp)
                    saved_at = time.monotonic()
                for tp, records in consumer.poll(timeout_ms=200, max_records=5000).items():
                    self.apply(records)
                    self.offsets[tp.partition] = records[-1].offset + 1
                if (self.snapshot_dir is not None
                        and time.monotonic() - saved_at > self.snapshot_interval_s):
                    self.save_snapshot()
                    saved_at = time.monotonic()
            except Exception:  # broker blip: reconnect and resume from the offsets read so far
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
