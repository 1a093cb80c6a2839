"""On-demand lists behind a slow impression log: what one flush for every pass computed while
the last flush waited buys (``serving.api.OnDemandBatches``), where Kafka's acks take longer
than a pass (a remote cluster with ``acks=all``).

The batching is the API's own; compute and log are simulated (a pass sleeps 0.5 ms + 0.2 ms a
list, a flush sleeps ``--ack-ms``), so the figures are about the batching, not the machine.
Requests arrive at ``--rate``/s for ``--seconds``; each reports its latency from submission to
answer. Baseline in the same run: one flush per pass, the design before session 22 (the same
class, its log thread never shown a second waiting pass). Usage:
``python bench/log_flush.py [--rate 500] [--ack-ms 2,10,20]``. Last line: JSON.
"""

from __future__ import annotations

import argparse
import queue
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from bench.report import print_result  # noqa: E402
from serving.api import OnDemandBatches  # noqa: E402


class _OnePassAtATime(queue.SimpleQueue):
    """A computed-pass queue that never shows a second waiting pass."""

    def get_nowait(self):
        raise queue.Empty


class OneFlushPerPass(OnDemandBatches):
    """The baseline: every pass waits for a flush of its own."""

    def __init__(self, compute, log) -> None:
        super().__init__(compute, log)
        self._computed = _OnePassAtATime()


def run(kind: type, rate: float, seconds: float, ack_ms: float) -> dict:
    flushes = [0]

    def compute(users, *_):
        time.sleep(0.0005 + 0.0002 * len(users))
        return list(users)

    def log(_feeds):
        flushes[0] += 1
        time.sleep(ack_ms / 1000)

    batches, latencies, futures = kind(compute, log), [], []
    start = time.perf_counter()
    for n in range(int(rate * seconds)):
        due = start + n / rate
        while time.perf_counter() < due:
            time.sleep(0.0002)
        submitted = time.perf_counter()
        future = batches.submit(f"u{n}", 20)
        future.add_done_callback(
            lambda _f, t=submitted: latencies.append(time.perf_counter() - t))
        futures.append(future)
    for future in futures:
        future.result(timeout=600)
    return {"p50_ms": round(1000 * float(np.percentile(latencies, 50)), 1),
            "p99_ms": round(1000 * float(np.percentile(latencies, 99)), 1),
            "flushes_per_list": round(flushes[0] / len(futures), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=500.0, help="requests/s")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--ack-ms", default="2,10,20", help="flush latencies to try")
    args = parser.parse_args()
    result: dict = {"rate": args.rate}
    for ack_ms in (float(a) for a in args.ack_ms.split(",")):
        for name, kind in (("one_flush_per_pass", OneFlushPerPass),
                           ("shared_flushes", OnDemandBatches)):
            figures = run(kind, args.rate, args.seconds, ack_ms)
            result.update({f"ack_{ack_ms:g}ms_{name}_{key}": value
                           for key, value in figures.items()})
    print_result(result)


if __name__ == "__main__":
    main()
