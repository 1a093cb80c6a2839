"""The worker's Redis apply path alone: its :class:`ApplyPipeline` without Kafka or Faust.

Applies ``--events`` simulated events (20k users / 50k items) in chunks of ``--chunk`` events
(4 partitions, envelopes of 500) to a private redis-server, exactly once as the worker does
(pipelined: chunk N commits while N+1 is computed; ``--sequential``: one at a time), and
prints events/s with redis-server's own CPU seconds and the busiest Redis commands (calls and
microseconds) — where the end-to-end time goes. Last line: JSON.
``--state write-back`` holds model state in the worker's memory with Redis as its read model
(:mod:`state.write_back`: one writer, changes coalesced per chunk and written as overwrites in
the chunk's transaction; ``write-back-strings``: each changed row as one msgpack string) instead of applying every increment in Redis. ``--reader`` also times a front end's GET meanwhile; ``--data yoochoose`` applies the shared
YooChoose sample's events instead of simulated ones. ``--erasures N`` also applies N
erasure requests per 10,000 events (users already seen, on their partitions, each starting a
chunk where the chunk holds their events, as in the worker) between two baselines of the
same events without them, on the same server: the cost of an erasure. Usage: ``python bench/apply.py [--events 40000] [--chunk 4000]
[--models session,cooc,mf] [--state write-back] [--reader] [--data yoochoose]
[--erasures 10]``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import add_live_options, cpu_seconds, print_result, yoochoose_split  # noqa: E402,E501
from infra.embedded import EmbeddedRedis  # noqa: E402
from infra.redis_client import sync_redis  # noqa: E402
from infra.settings import Settings  # noqa: E402
from online_models import kernels  # noqa: E402
from online_models.registry import build  # noqa: E402
from state.redis_store import RedisStore, build_on_redis  # noqa: E402
from state.write_back import WriteBackStore  # noqa: E402
from schemas.events import Erasure  # noqa: E402
from stream.pipeline import ApplyPipeline, event_chunks  # noqa: E402
from stream.producer import partition_for  # noqa: E402
from stream.simulator import UserSimulator  # noqa: E402
from stream.state import LiveState, SourceMessage  # noqa: E402

class FeedReader:
    """A front end reading one feed key every 2 ms on its own connection; latencies in ms."""

    def __init__(self, url: str) -> None:
        self.client = sync_redis(url)
        self.client.set("bench:feed", b"x" * 2000)
        self.latencies: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            start = time.perf_counter()
            self.client.get("bench:feed")
            self.latencies.append((time.perf_counter() - start) * 1000)
            time.sleep(0.002)

    def stop(self) -> list[float]:
        self._stop.set()
        self._thread.join()
        self.client.close()
        return self.latencies


def with_erasures(messages: list[SourceMessage], per_10k: float, seed: int = 0
                  ) -> tuple[list[SourceMessage], int]:
    """``messages`` (envelopes, consumer order) with erasure requests of users already seen
    on each partition placed after envelopes (``per_10k`` per 10,000 events on average),
    offsets renumbered per partition; and how many were placed."""
    rng = np.random.default_rng(seed)
    seen: dict[int, list] = {}
    out: list[SourceMessage] = []
    placed = 0
    for message in messages:
        out.append(replace(message))  # renumbered below: the originals stay as they are
        mine = seen.setdefault(message.partition, [])
        mine += [(e.user_id, e.session_id) for e in message.events]
        for _ in range(rng.poisson(per_10k * len(message.events) / 10_000)):
            user, session = mine[rng.integers(len(mine))]
            out.append(SourceMessage(message.topic, message.partition, 0, erasure=Erasure(
                request_id=f"bench-{placed}", user_id=user, timestamp=time.time(),
                session_ids=[session] if session else [])))
            placed += 1
    offsets: dict[int, int] = {}
    for message in out:
        message.offset = offsets.get(message.partition, 0)
        offsets[message.partition] = message.offset + 1
    return out, placed


async def apply_pipelined(state: LiveState, chunks) -> None:
    pipeline = ApplyPipeline(state, on_applied=lambda result, seconds: None)
    for chunk in chunks:
        await pipeline.apply(chunk)
    await pipeline.flush()


def apply_run(args, server, client, chunks, reader: bool = False) -> dict:
    """Apply ``chunks`` to the (empty) server as the worker does; the figures."""
    settings = Settings()
    ttls = (0, 0) if args.no_ttl else (settings.user_state_ttl_s, settings.item_state_ttl_s)
    names = [n for n in args.models.split(",") if n]
    if args.state == "write-back-strings":  # what STREAMREC_STATE_WRITER=single runs
        settings = settings.model_copy(update={"state_writer": "single"})
        models = list(build_on_redis(names, client, settings.key_prefix, 0, *ttls,
                                     layout="single", writer=True).values())
    elif args.state == "write-back":
        models = [build(n).bind(WriteBackStore(
            RedisStore(client, settings.key_prefix, n, 0, *ttls)))
            for n in names]
    else:
        models = list(build_on_redis(names, client, settings.key_prefix,
                                     settings.worker_cached_local_rows, *ttls).values())
    state = LiveState(settings, client, models)
    kernels.warm_up()  # as the worker does at start
    client.config_resetstat()
    feed_reader = FeedReader(server.url) if reader else None
    cpu0, started = cpu_seconds(server.proc.pid), time.perf_counter()
    process0 = time.process_time()
    if args.sequential:
        for chunk in chunks:
            state.apply_messages(chunk)
    else:
        asyncio.run(apply_pipelined(state, chunks))
    wall = time.perf_counter() - started
    python_cpu = time.process_time() - process0
    reads = feed_reader.stop() if feed_reader else None
    stats = client.info("commandstats")
    applied = sum(len(m.events) for chunk in chunks for m in chunk)
    result = {"models": args.models, "chunk_events": args.chunk, "state": args.state,
              "redis_aof": args.redis_aof, "pipelined": not args.sequential,
              "events_per_s": round(applied / wall), "wall_s": round(wall, 2),
              "redis_cpu_s": round(cpu_seconds(server.proc.pid) - cpu0, 2),
              "python_cpu_s": round(python_cpu, 2),
              "redis_calls": {k.removeprefix("cmdstat_"): v["calls"]
                              for k, v in sorted(stats.items(), key=lambda kv: -kv[1]["usec"])
                              [:5]},
              "redis_usec": {k.removeprefix("cmdstat_"): v["usec"]
                             for k, v in sorted(stats.items(), key=lambda kv: -kv[1]["usec"])
                             [:8]}}
    if reads is not None:
        result.update({"read_p50_ms": round(float(np.percentile(reads, 50)), 2),
                       "read_p99_ms": round(float(np.percentile(reads, 99)), 2),
                       "read_max_ms": round(float(np.max(reads)), 2)})
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=40_000)
    parser.add_argument("--chunk", type=int, default=4000)
    add_live_options(parser)
    parser.add_argument("--no-ttl", action="store_true",
                        help="model state without TTLs (the worker sets them)")
    parser.add_argument("--sequential", action="store_true",
                        help="prepare and commit one chunk at a time (no overlap)")
    parser.add_argument("--reader", action="store_true",
                        help="time a front end's GET every 2 ms meanwhile (what a feed read "
                             "waits behind the transactions; its CPU counts as the worker's)")
    parser.add_argument("--state", choices=("redis", "write-back", "write-back-strings"),
                        default="redis",
                        help="models apply their increments in Redis (the worker today), or "
                             "hold state in memory and write changed keys per chunk")
    parser.add_argument("--erasures", type=float, default=0.0, metavar="PER_10K",
                        help="erasure requests per 10,000 events, applied between two "
                             "baseline runs of the same events without them")
    parser.add_argument("--data", choices=("simulated", "yoochoose"), default="simulated",
                        help="simulated users, or the shared YooChoose sample's clicks and "
                             "buys in time order (its first --events)")
    args = parser.parse_args()
    if args.data == "yoochoose":
        train, test = yoochoose_split()
        events = sorted(train + test, key=lambda e: e.timestamp)[:args.events]
    else:
        events = list(UserSimulator(20_000, 50_000, seed=1).events(args.events,
                                                                   time.time() - args.events))
    by_partition: dict[int, list] = {}
    for e in events:
        by_partition.setdefault(partition_for(e.user_id, 4), []).append(e)
    messages = [SourceMessage("bench", p, n, evs[start:start + 500])
                for p, evs in by_partition.items()
                for n, start in enumerate(range(0, len(evs), 500))]
    messages.sort(key=lambda m: (m.offset, m.partition))  # interleaved, as a consumer sees them
    per_chunk = max(1, args.chunk // 500)
    with EmbeddedRedis(appendonly=args.redis_aof) as server:
        client = sync_redis(server.url)
        chunks = [messages[start:start + per_chunk]
                  for start in range(0, len(messages), per_chunk)]
        if not args.erasures:
            result = apply_run(args, server, client, chunks, reader=args.reader)
        else:  # the baseline before and after the same events with erasures (the first
            erasing, placed = with_erasures(messages, args.erasures)  # run pays warm-ups),
            runs = []  # each from an empty server
            for chunked in (messages, erasing, messages):
                client.flushall()
                runs.append(apply_run(args, server, client, event_chunks(chunked, args.chunk)))
            before, result, after = runs
            baseline = {key: (before[key] + after[key]) / 2
                        for key in ("events_per_s", "redis_cpu_s", "python_cpu_s")}
            extra = {key: result[key] - baseline[key] for key in ("redis_cpu_s", "python_cpu_s")}
            result.update({
                "erasures": placed, "erasures_per_10k_events": args.erasures,
                "chunks": len(event_chunks(erasing, args.chunk)),
                "baseline_chunks": len(event_chunks(messages, args.chunk)),
                "baseline_events_per_s": [before["events_per_s"], after["events_per_s"]],
                "baseline_redis_cpu_s": [before["redis_cpu_s"], after["redis_cpu_s"]],
                "baseline_python_cpu_s": [before["python_cpu_s"], after["python_cpu_s"]],
                "cpu_ms_per_erasure": round(1000 * sum(extra.values()) / max(placed, 1), 3)})
        result.update({"events": len(events), "data": args.data})
        client.close()
    print_result(result)


if __name__ == "__main__":
    main()
