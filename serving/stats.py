"""The live figures ``GET /v1/stats`` answers: what the workers applied, how far they lag
behind the log, how fresh their state is (``stream/worker_report.py``) and the dead letters."""

from __future__ import annotations

import threading
import time

from infra.settings import Settings
from schemas.keys import RedisKeys
from stream.log_positions import LogEndProbe, read_watermarks, unapplied_records
from stream.worker_report import read_reports

COUNTERS = ("events_applied", "dlq_messages", "dlq_events", "dlq_item_messages",
            "skipped_redelivered", "skipped_duplicates", "erasures")


class LiveStats:
    """Reads Redis (counters, worker reports, watermarks) and the log's ends (its own Kafka
    client, made on first use; a broker that cannot be asked leaves ``consumer_lag`` null
    with the reason). Answers are cached for ``cache_s``; thread-safe."""

    def __init__(self, settings: Settings, client, cache_s: float = 1.0) -> None:
        self.settings, self.client, self.cache_s = settings, client, cache_s
        self.keys = RedisKeys(settings.key_prefix)
        self._probe: LogEndProbe | None = None
        self._lock = threading.Lock()
        self._cached: tuple[float, dict] | None = None

    def read(self) -> dict:
        with self._lock:
            now = time.time()
            if self._cached is None or now - self._cached[0] >= self.cache_s:
                self._cached = (now, self._read(now))
            return self._cached[1]

    def _read(self, now: float) -> dict:
        raw = self.client.hgetall(self.keys.stats)
        counters = {name: int(raw.get(name.encode(), 0)) for name in COUNTERS}
        live_within = max(5 * self.settings.worker_report_interval_s, 10.0)
        workers = read_reports(self.client, self.keys, now, live_within)
        p50s = [w["freshness_p50_ms"] for w in workers if w.get("freshness_p50_ms") is not None]
        p99s = [w["freshness_p99_ms"] for w in workers if w.get("freshness_p99_ms") is not None]
        return {"time": now, **counters,
                "events_per_s": round(sum(w.get("events_per_s", 0.0) for w in workers), 1),
                # the slowest worker's figures: a front end is as fresh as its worst partition
                "freshness_p50_ms": max(p50s, default=None),
                "freshness_p99_ms": max(p99s, default=None),
                "workers": workers, **self._lag()}

    def _lag(self) -> dict:
        topic = self.settings.topic_interactions
        try:
            if self._probe is None:
                self._probe = LogEndProbe(self.settings.kafka_bootstrap,
                                          self.settings.kafka_client_options())
            partitions, starts, ends = self._probe.bounds(topic)
        except Exception as exc:  # noqa: BLE001 - broker away: say so, keep the rest
            self.close()
            return {"consumer_lag": None, "lag_by_partition": {},
                    "lag_error": f"Kafka unavailable: {exc!r}"}
        marks = read_watermarks(self.client, self.keys, topic, partitions)
        lag = unapplied_records(marks, starts, ends)
        return {"consumer_lag": sum(lag.values()), "lag_by_partition": lag}

    def close(self) -> None:
        if self._probe is not None:
            probe, self._probe = self._probe, None
            probe.close()
