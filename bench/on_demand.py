"""The serving pipeline's on-demand passes in one process, without HTTP or Kafka: what an API
process's compute thread does (``FeedBuilder.compute``), and the collector's pauses in it.

State as ``bench/api.py`` builds it (the live models learn ``20 × --users`` simulated
events). Passes of ``--pass-size`` lists for random users, paced at ``--rate`` lists/s (so
kept rows expire as they do under that load), for ``--seconds`` a phase. Two phases run in
turn, ``--rounds`` times: the collector as Python leaves it (baseline), then with what was
built before serving frozen out of its passes (``gc.freeze``, as the API does at start).
Per phase: lists/s, CPU per list, pass time p50/p99/max, the full collections that came
(count, longest), and one more timed at its end (``gc.collect()``: the pause any full
collection adds to every list in flight). Item neighbourhoods come from a publisher process,
as the feed builder publishes them deployed (``--neighbourhoods counted``: counted here, as
before). Usage: ``python bench/on_demand.py [--rate 600] [--pass-size 6]``. Last line: JSON.
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from bench.report import cpu_seconds, print_result, simulated_serving_state  # noqa: E402
from infra.embedded import EmbeddedRedis  # noqa: E402
from infra.redis_client import sync_redis  # noqa: E402
from infra.settings import Settings  # noqa: E402


class CollectorPauses:
    """Each full collection's duration (``gc.callbacks``), while installed."""

    def __init__(self) -> None:
        self.full_ms: list[float] = []
        self._started = 0.0

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        elif info["generation"] == 2:
            self.full_ms.append(1000 * (time.perf_counter() - self._started))


def phase(builder, users: list[str], args, rng: random.Random) -> dict:
    pauses = CollectorPauses()
    gc.callbacks.append(pauses)
    passes, lists = [], 0
    started, cpu = time.perf_counter(), time.process_time()
    try:
        while time.perf_counter() - started < args.seconds:
            wait = started + lists / args.rate - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            t = time.perf_counter()
            builder.compute(rng.sample(users, args.pass_size), 20, source="on_demand")
            passes.append(1000 * (time.perf_counter() - t))
            lists += args.pass_size
    finally:
        gc.callbacks.remove(pauses)
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    t = time.perf_counter()
    gc.collect()  # what any full collection costs now (they come every ~20-60 s under load)
    collect_ms = 1000 * (time.perf_counter() - t)
    return {"lists": lists, "lists_per_s": round(lists / wall),
            "cpu_ms_per_list": round(1000 * cpu / lists, 3),
            "pass_p50_ms": round(float(np.percentile(passes, 50)), 1),
            "pass_p99_ms": round(float(np.percentile(passes, 99)), 1),
            "pass_max_ms": round(max(passes), 1), "full_collections": len(pauses.full_ms),
            "full_collection_max_ms": round(max(pauses.full_ms, default=0.0), 1),
            "gc_collect_ms": round(collect_ms, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=2000)
    parser.add_argument("--rate", type=float, default=600.0, help="lists/s offered")
    parser.add_argument("--pass-size", type=int, default=6, help="lists per pass")
    parser.add_argument("--seconds", type=float, default=30.0, help="per phase")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--neighbourhoods", choices=("published", "counted"),
                        default="published", help="published: a publisher process counts the "
                        "item neighbourhoods asked for, as the feed builder does deployed "
                        "(its CPU reported apart); counted: this process counts its own")
    args = parser.parse_args()
    from serving.feeds import FeedBuilder

    with EmbeddedRedis() as redis_srv:
        settings = Settings(redis_url=redis_srv.url)
        if args.neighbourhoods == "counted":  # off: this process counts its own
            settings = settings.model_copy(update={"neighbourhoods_interval_s": 0.0})
        client = sync_redis(redis_srv.url)
        users = simulated_serving_state(settings, client, args.users)
        builder = FeedBuilder(settings, client)  # no impression log: compute only
        rng = random.Random(0)
        result: dict = {"rate": args.rate, "pass_size": args.pass_size,
                        "neighbourhoods": args.neighbourhoods}
        publisher, stop = None, multiprocessing.Event()
        if settings.neighbourhoods_interval_s:
            builder.compute(users, 20, source="on_demand")  # what serving asks for: wanted
            publisher = multiprocessing.Process(target=publish, args=(settings, stop))
            publisher.start()
            time.sleep(3)  # its first rounds
        publisher_cpu = cpu_seconds(publisher.pid) if publisher else 0.0
        lists = 0
        try:
            for n in range(args.rounds):
                gc.unfreeze()
                for name, freeze in (("baseline", False), ("frozen", True)):
                    if freeze:
                        gc.freeze()
                    figures = phase(builder, users, args, rng)
                    lists += figures.pop("lists")
                    result.update({f"{name}_{n + 1}_{key}": value
                                   for key, value in figures.items()})
            gc.unfreeze()
            if publisher:
                result["publisher_cpu_ms_per_list"] = round(
                    1000 * (cpu_seconds(publisher.pid) - publisher_cpu) / lists, 3)
        finally:
            stop.set()
            if publisher:
                publisher.join(10)
    print_result(result)


def publish(settings: Settings, stop) -> None:
    """The feed builder's neighbourhood rounds, in a process of their own, until ``stop``."""
    from serving.neighbour_rows import NeighbourhoodPublisher

    publisher = NeighbourhoodPublisher.for_settings(settings, sync_redis(settings.redis_url))
    while not stop.is_set():
        if not publisher.step():
            stop.wait(publisher.until_due())


if __name__ == "__main__":
    main()
