"""Each worker's live figures in Redis (``sr:{stats}:workers``, one field per worker): what
``GET /v1/stats`` and the feed explorer show, with no need to scrape every worker's
Prometheus endpoint. The Prometheus histograms stay the source for alerting."""

from __future__ import annotations

import json
import threading
from collections import deque
from typing import Iterable

import numpy as np

from schemas.keys import RedisKeys

#: A report field older than this is a worker that is gone: the next report deletes it.
FORGET_AFTER_S = 3600.0


class LiveFigures:
    """Freshness (Kafka timestamp → commit of the event's state) and applied events/s over a
    sliding window, fed by the apply path; thread-safe."""

    def __init__(self, freshness_window_s: float = 60.0, rate_window_s: float = 10.0,
                 max_samples: int = 20_000) -> None:
        self.freshness_window_s, self.rate_window_s = freshness_window_s, rate_window_s
        self._ages: deque[tuple[float, float]] = deque(maxlen=max_samples)
        self._applied: deque[tuple[float, int]] = deque()
        self._lock = threading.Lock()

    def record(self, committed_at: float, ages_s: Iterable[float], events: int) -> None:
        with self._lock:
            self._ages.extend((committed_at, age) for age in ages_s)
            self._applied.append((committed_at, events))

    def snapshot(self, now: float) -> dict:
        """The figures over the windows ending at ``now`` (unix seconds)."""
        with self._lock:
            while self._ages and self._ages[0][0] < now - self.freshness_window_s:
                self._ages.popleft()
            while self._applied and self._applied[0][0] < now - self.rate_window_s:
                self._applied.popleft()
            ages = np.fromiter((age for _, age in self._ages), float, len(self._ages))
            applied = sum(events for _, events in self._applied)
        p50, p99 = (np.percentile(ages, [50, 99]) * 1000).round(1).tolist() if len(ages) \
            else (None, None)
        return {"events_per_s": round(applied / self.rate_window_s, 1),
                "freshness_p50_ms": p50, "freshness_p99_ms": p99,
                "freshness_samples": len(ages), "freshness_window_s": self.freshness_window_s}


def publish_report(client, keys: RedisKeys, worker_id: str, report: dict, now: float) -> None:
    """Write this worker's field and delete the fields of workers gone for an hour."""
    with client.pipeline(transaction=False) as pipe:
        pipe.hset(keys.worker_reports, worker_id,
                  json.dumps({**report, "worker": worker_id, "updated_at": now}))
        pipe.hgetall(keys.worker_reports)
        _, fields = pipe.execute()
    gone = [name for name, raw in fields.items()
            if json.loads(raw).get("updated_at", 0) < now - FORGET_AFTER_S]
    if gone:
        client.hdel(keys.worker_reports, *gone)


def read_reports(client, keys: RedisKeys, now: float, live_within_s: float) -> list[dict]:
    """Reports of the workers heard from within ``live_within_s``, by worker id."""
    reports = [json.loads(raw) for raw in client.hgetall(keys.worker_reports).values()]
    return sorted((r for r in reports if r.get("updated_at", 0) >= now - live_within_s),
                  key=lambda r: r["worker"])
