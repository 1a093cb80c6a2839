"""Prometheus metrics of the nearline trainer role (``streamrec trainer``, served on
``STREAMREC_TRAINER_METRICS_PORT``), by model: events learned, versions published and when."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

EVENTS_LEARNED = Counter("streamrec_trainer_events_learned_total",
                         "Interaction events the trainer learned", ["model"])
VERSIONS = Counter("streamrec_trainer_versions_total",
                   "Versions trained, saved as checkpoints and published", ["model"])
PUBLISH_SECONDS = Histogram("streamrec_trainer_publish_seconds",
                            "Exporting, saving and publishing one version", ["model"],
                            buckets=(.1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120))
LAST_VERSION = Gauge("streamrec_trainer_last_version_timestamp_seconds",
                     "Unix time of the last version published (before the first: of the "
                     "trainer's start)", ["model"])
