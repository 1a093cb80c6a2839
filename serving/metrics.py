"""Prometheus metrics of the API (served on ``STREAMREC_API_METRICS_PORT``): where an on-demand
list's time goes inside the API process, so that an operator (and ``bench/api.py``) reads the
server's own latency apart from the network and the client's.

With ``streamrec api --workers N`` every worker process writes its samples to files in
``PROMETHEUS_MULTIPROC_DIR`` (prometheus_client's multiprocess mode, set up by the CLI) and the
supervising process serves their sum.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Callable

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, start_http_server

#: Seconds: fine around the 20 ms that on-demand lists are held to (issue 13).
LATENCY_BUCKETS = (0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.0125, 0.015, 0.0175, 0.02,
                   0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

ON_DEMAND_SECONDS = Histogram(
    "streamrec_on_demand_seconds", "An on-demand list's seconds in the API by stage: queued "
    "(asked until its compute pass starts), computed (its pass), logged (until the impression "
    "log's acks), total (asked until answered)", ["stage"], buckets=LATENCY_BUCKETS)
QUEUED, COMPUTED, LOGGED, TOTAL = (ON_DEMAND_SECONDS.labels(stage)
                                   for stage in ("queued", "computed", "logged", "total"))
PASS_SECONDS = Histogram(
    "streamrec_on_demand_pass_seconds", "A compute pass's seconds: wall (start to end) and cpu "
    "(its thread's own CPU time); the difference is time spent waiting for the interpreter "
    "lock or the core while the HTTP and log threads run", ["clock"], buckets=LATENCY_BUCKETS)
PASS_WALL, PASS_CPU = PASS_SECONDS.labels("wall"), PASS_SECONDS.labels("cpu")
PASS_LISTS = Histogram("streamrec_on_demand_pass_lists", "On-demand lists per compute pass",
                       buckets=(1, 2, 4, 8, 16, 32, 64, 128))
FAILED = Counter("streamrec_on_demand_failed_total",
                 "On-demand lists answered with an error, by stage", ["stage"])

HTTP_ERRORS = Counter("streamrec_http_error_responses_total",
                      "HTTP answers with a status of 400 or more, by status code (the fast "
                      "paths answer only 200s and hand every other case to these)", ["code"])

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def serve(port: int, host: str, registry: CollectorRegistry = REGISTRY) -> Callable[[], None]:
    """Serve ``registry`` (this process's metrics) on ``host:port`` from a thread; returns the
    function that stops it and frees the port."""
    server, _thread = start_http_server(port, addr=host, registry=registry)

    def stop() -> None:
        server.shutdown()
        server.server_close()

    return stop


class WorkerMetrics:
    """The sum of ``streamrec api --workers N``'s processes, served by the supervising process:
    enter before the workers start (they inherit the samples folder), leave after they stop."""

    def __init__(self, port: int, host: str) -> None:
        self.port, self.host = port, host
        self._made: str | None = None
        self._stop: Callable[[], None] | None = None

    def __enter__(self) -> "WorkerMetrics":
        from prometheus_client import multiprocess

        if not os.environ.get(MULTIPROC_ENV):  # an operator's own folder is kept
            self._made = os.environ[MULTIPROC_ENV] = tempfile.mkdtemp(prefix="streamrec-api-")
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        self._stop = serve(self.port, self.host, registry)
        return self

    def __exit__(self, *_exc) -> None:
        self._stop()
        if self._made:
            os.environ.pop(MULTIPROC_ENV, None)
            shutil.rmtree(self._made, ignore_errors=True)
