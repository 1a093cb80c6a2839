"""``streamrec trainer``: the nearline tier. It reads the interactions (and item descriptions)
with a consumer of its own, feeds a nearline PyTorch model (``two_tower``), and each time the
model publishes a version it

1. saves a checkpoint: ``<STREAMREC_TRAINER_DIR>/<model>/v<version>/`` holding
   ``weights.pt`` (a ``state_dict`` of tensors only, read back with ``weights_only=True``:
   nothing is ever unpickled) and ``meta.json`` (item ids, features, settings); the last
   ``STREAMREC_TRAINER_KEEP`` versions are kept;
2. points ``<model>/CURRENT`` at it (an atomic rename): what serving loads;
3. publishes the version's item vectors to the compacted topic ``<item-vectors>.<model>``
   (key = item id, the record carries model and version), for other consumers.

``streamrec trainer --rollback <version>`` points ``CURRENT`` back at a kept version and
publishes its vectors again.

``STREAMREC_TRAINER_DEVICE`` (cpu, cuda[:N], auto) is where versions train; a device torch
cannot use stops the trainer at start. Versions are saved and served from the CPU either way.

On start the trainer rebuilds its window from the log (the last ``window`` events, shared
between the partitions, and every item description) with training paused, then trains one
version on the whole window at once. Versions number on from the newest kept one, so a
restart never reuses a number (serving tells versions apart by number) and never trains
versions on a half-rebuilt window; CURRENT keeps serving until the new version is saved.

A version falls due by the model's schedule (counted in events, as replay counts them) but is
trained only after the whole poll it fell due in is learned, and only once more than one
poll's worth of interactions no longer waits in the log: a trainer that fell behind (a burst,
a slow device) catches up first and trains one version on the newest window, instead of one
per ``retrain_every`` events of backlog, which it could never catch up with. One that stays
behind (a stream faster than it learns) still trains a due version once
``CATCH_UP_MAX_S`` passed since its last.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np

from infra.settings import Settings
from online_models.base import NearlineModel, torch_device
from online_models.registry import build
from online_models.signals import SignalMapper
from schemas import vectors
from schemas.events import split_source
from schemas.items import split_items
from stream import trainer_metrics

log = logging.getLogger("streamrec.trainer")
CURRENT = "CURRENT"


class Checkpoints:
    """One model's versions in a folder: save, keep the last ``keep``, point CURRENT."""

    def __init__(self, directory: str | Path, model: str, keep: int = 5) -> None:
        self.root = Path(directory) / model
        self.keep = keep

    def _path(self, version: int) -> Path:
        return self.root / f"v{version:06d}"

    def versions(self) -> list[int]:
        if not self.root.exists():
            return []
        return sorted(int(p.name[1:]) for p in self.root.iterdir()
                      if p.is_dir() and p.name.startswith("v") and p.name[1:].isdigit())

    def save(self, version: int, state: dict, meta: dict) -> Path:
        """Write the version (temp folder, then rename), make it CURRENT, drop old ones."""
        import torch

        final = self._path(version)
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        torch.save(state, tmp / "weights.pt")
        (tmp / "meta.json").write_text(json.dumps({**meta, "saved_at": time.time()}))
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
        self.point(version)
        for old in self.versions()[:-self.keep]:
            if old != version:  # CURRENT, just pointed at
                shutil.rmtree(self._path(old), ignore_errors=True)
        return final

    def require(self, version: int) -> None:
        """Raise ValueError naming the kept versions unless ``version`` is one of them."""
        if version not in self.versions():
            raise ValueError(f"no kept version {version} of {self.root.name} (kept: "
                             f"{self.versions() or 'none'})")

    def point(self, version: int) -> None:
        self.require(version)
        tmp = self.root / (CURRENT + ".tmp")
        tmp.write_text(str(version))
        os.replace(tmp, self.root / CURRENT)

    def current(self) -> int | None:
        path = self.root / CURRENT
        return int(path.read_text()) if path.exists() else None

    def meta(self, version: int) -> dict:
        return json.loads((self._path(version) / "meta.json").read_text())

    def load(self, version: int) -> tuple[dict, dict]:
        """(state_dict, meta) of a kept version; tensors only (``weights_only=True``)."""
        import torch

        state = torch.load(self._path(version) / "weights.pt", weights_only=True)
        return state, self.meta(version)


def vector_topic(settings: Settings, model: str) -> str:
    return f"{settings.topic_item_vectors}.{model}"


def publish_vectors(producer, topic: str, model: str, version: int, items: list[str],
                    item_vectors: np.ndarray) -> None:
    now = time.time()
    for item, vector in zip(items, item_vectors.tolist()):
        producer.send(topic, key=item.encode(), value=vectors.encode(
            vectors.ItemVector(item, model, vector, now, version)))
    producer.flush()


class Trainer:
    """Consumes, learns, and saves + publishes every new version (see module doc)."""

    POLL_RECORDS = 5000  # the most records one poll returns
    CATCH_UP_MAX_S = 600.0  # behind for longer: a due version trains anyway (module doc)

    def __init__(self, settings: Settings, model_name: str = "two_tower", model=None) -> None:
        self.settings, self.model_name = settings, model_name
        self.model = model if model is not None else build(model_name)
        if not isinstance(self.model, NearlineModel):
            raise ValueError(f"{model_name} is not a nearline model (no versions to export)")
        if model is None:
            self.model.device = settings.trainer_device
        torch_device(self.model.device)  # ValueError now, not at the first training
        self.checkpoints = Checkpoints(settings.trainer_dir, model_name, settings.trainer_keep)
        self.events = self.invalid = self.vectors_published = 0
        self.published: list[int] = []
        self._kafka = None  # (consumer, producer), made on the first run
        #: while rebuilding the window (module doc): partition → the log end it reads to;
        #: None once rebuilt
        self._rebuild_to: dict | None = None
        self._last_version_at = time.monotonic()
        self._mapper = SignalMapper()
        self._learned, self._versions, self._publish_seconds, self._last_version = (
            metric.labels(model_name) for metric in (
                trainer_metrics.EVENTS_LEARNED, trainer_metrics.VERSIONS,
                trainer_metrics.PUBLISH_SECONDS, trainer_metrics.LAST_VERSION))
        self._last_version.set_to_current_time()  # no version yet: the start counts

    def _consumer(self):
        from kafka import KafkaConsumer, TopicPartition

        s = self.settings
        consumer = KafkaConsumer(bootstrap_servers=s.kafka_bootstrap, enable_auto_commit=False,
                                 group_id=f"{s.app_id}-trainer-{self.model_name}",
                                 **s.kafka_client_options())
        parts = [TopicPartition(topic, p) for topic in (s.topic_interactions, s.topic_items)
                 for p in sorted(consumer.partitions_for_topic(topic) or [])]
        consumer.assign(parts)
        ends, starts = consumer.end_offsets(parts), consumer.beginning_offsets(parts)
        events = [tp for tp in parts if tp.topic == s.topic_interactions]
        share = max(getattr(self.model, "window", 100_000) // max(len(events), 1), 1)
        for tp in parts:  # item descriptions: all of them; events: the window's share
            start = starts[tp] if tp.topic == s.topic_items else max(starts[tp], ends[tp] - share)
            consumer.seek(tp, start)
        self._rebuild_to = {tp: end for tp, end in ends.items() if end > 0}
        return consumer

    def _rebuilt(self, consumer) -> bool:
        """Whether the window rebuild has read to the log ends seen at start."""
        self._rebuild_to = {tp: end for tp, end in self._rebuild_to.items()
                            if consumer.position(tp) < end}
        return not self._rebuild_to

    def _behind(self, consumer) -> bool:
        """Whether more interactions wait in the log than one poll takes (module doc). Log
        ends asked of the broker: a consumer's ``highwater`` is only as fresh as its last
        fetch from that partition, and a backlog is fetched a partition at a time."""
        parts = [tp for tp in consumer.assignment()
                 if tp.topic == self.settings.topic_interactions]
        ends = consumer.end_offsets(parts) if parts else {}
        return sum(end - consumer.position(tp) for tp, end in ends.items()) > self.POLL_RECORDS

    def run(self, stop: threading.Event | None = None, until_version: int | None = None,
            learn_chunk: int = 1000) -> None:
        """Train until ``stop`` is set (or ``until_version`` is published), learning
        ``learn_chunk`` events at a time (the replay's chunks) and training a version that
        fell due once the poll is learned and the log caught up with (module doc). A later
        call resumes where this one stopped."""
        from kafka import KafkaProducer

        stop = stop or threading.Event()
        s = self.settings
        self._kafka = self._kafka or (self._consumer(), KafkaProducer(
            bootstrap_servers=s.kafka_bootstrap, **s.kafka_client_options()))
        consumer, producer = self._kafka
        topic = vector_topic(s, self.model_name)
        while not stop.is_set():
            if until_version is not None and self.model.version >= until_version:
                return
            records, events, erasures = [], [], []
            polled = consumer.poll(timeout_ms=500, max_records=self.POLL_RECORDS)
            for tp, batch in polled.items():
                for record in batch:
                    if tp.topic == s.topic_items:
                        good, bad = split_items(record.value, s.max_message_bytes)
                        records.extend(good)
                    else:
                        good, bad, erasure = split_source(record.value, s.max_message_bytes)
                        events.extend(good)
                        erasures += [erasure] if erasure is not None else []
                    self.invalid += len(bad)  # the worker dead-letters them; skipped here
            self.model.schedule.paused = True  # a version due waits for the whole poll
            if records:
                self.model.learn_items(records)
            events.sort(key=lambda e: e.timestamp)
            for start in range(0, len(events), learn_chunk):
                chunk = events[start:start + learn_chunk]
                self.model.learn(self._mapper.map(chunk))
                self.events += len(chunk)
                self._learned.inc(len(chunk))
            for erasure in erasures:  # after the poll's events: those before it go too
                self.model.forget(erasure.keys)
            if self._rebuild_to is not None:
                if not self._rebuilt(consumer):
                    continue
                self._rebuild_to = None
                self.model.schedule.resume(max(self.checkpoints.versions(), default=0))
            overdue = time.monotonic() - self._last_version_at > self.CATCH_UP_MAX_S
            # an empty poll: nothing waits (no need to ask the broker for the log ends)
            self.model.schedule.paused = bool(polled) and not overdue and self._behind(consumer)
            if self.model.train_if_due():
                self._publish_and_commit(consumer, producer, topic)

    def _publish_and_commit(self, consumer, producer, topic: str) -> None:
        self.publish(producer, topic)
        self._last_version_at = time.monotonic()
        consumer.commit()  # the group's lag shows how far behind the trainer is

    def close(self) -> None:
        if self._kafka is not None:
            consumer, producer = self._kafka
            consumer.close()
            producer.close()
            self._kafka = None

    def publish(self, producer, topic: str) -> None:
        started = time.monotonic()
        state, meta, items, item_vectors = self.model.export_version()
        version = meta["version"]
        self.checkpoints.save(version, state, {**meta, "events_seen": self.events})
        publish_vectors(producer, topic, self.model_name, version, items, item_vectors)
        self.published.append(version)
        self.vectors_published += len(items)
        spent = time.monotonic() - started
        self._versions.inc()
        self._publish_seconds.observe(spent)
        self._last_version.set_to_current_time()
        log.info("%s version %d: %d items, saved and published in %.1f s", self.model_name,
                 version, len(items), spent)


def rollback(settings: Settings, model_name: str, version: int) -> int:
    """Point CURRENT at a kept version and publish its vectors again (items only the version
    it replaces knew get tombstones); the vectors published."""
    from kafka import KafkaProducer

    checkpoints = Checkpoints(settings.trainer_dir, model_name, settings.trainer_keep)
    checkpoints.require(version)
    state, meta = checkpoints.load(version)
    previous = checkpoints.current()
    newer_items = set()
    if previous is not None and previous != version and previous in checkpoints.versions():
        newer_items = set(checkpoints.meta(previous)["items"]) - set(meta["items"])
    checkpoints.point(version)
    model = build(model_name)
    model.load_version(state, meta)
    _, _, items, item_vectors = model.export_version()
    producer = KafkaProducer(bootstrap_servers=settings.kafka_bootstrap,
                             **settings.kafka_client_options())
    try:
        for item in sorted(newer_items):  # unknown to this version: retired (tombstones)
            producer.send(vector_topic(settings, model_name), key=item.encode(), value=None)
        publish_vectors(producer, vector_topic(settings, model_name), model_name, version,
                        items, item_vectors)
    finally:
        producer.close()
    return len(items)
