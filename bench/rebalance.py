"""Rebalances under load: what a worker joining and leaving a group costs ingest.

Starts an embedded broker and redis-server (or ``--redis-cluster N`` primaries), two
``streamrec worker`` processes in one group, and a steady ``--rate`` of simulated events for
``--seconds``. A third worker joins a third of the way in and leaves at two thirds, cleanly
(SIGTERM) or, with ``--leave kill``, killed -9 (its partitions wait for the group's session
timeout, and on a Redis Cluster their claims were not given up): two or more rebalances,
each revoking every member's partitions. Figures:

- *revocation wait*: per rebalance and worker, how long the worker waited for its computed
  writes (chunks, and in the owned layout its owners' commit) to be in Redis before giving its
  partitions up (``streamrec_revocation_writes_seconds``, scraped from each worker): the part
  of a rebalance spent so that no write lands after the partitions' next writer's;
- *longest stall*: the longest time no event was applied while events waited, sampled every
  50 ms (a rebalance's whole pause, the group's join included);
- *exactly once*: events applied (or dropped as producer duplicates) against events sent,
  once every worker drained;
- *claim window waits* (owned layout on a Redis Cluster): claims of partitions their last
  writer had not given up that waited, until ``STREAMREC_CLUSTER_CLAIM_WINDOW_S`` had passed
  since that writer last checked its claim (0 where every rebalance was clean).

The last line is JSON. Usage: ``python bench/rebalance.py [--state-writer owned]
[--redis-cluster 3] [--rate 10000] [--seconds 45] [--leave term|kill]``.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.report import (bench_worker_env, events_handled, print_result,  # noqa: E402
                          spawn_worker)
from infra.embedded import (EmbeddedKafka, EmbeddedRedis, EmbeddedRedisCluster,  # noqa: E402
                            ensure_topics, free_port, terminate)
from infra.redis_client import sync_redis  # noqa: E402
from schemas.keys import RedisKeys  # noqa: E402
from state.owner_commits import hop_settled  # noqa: E402
from stream.producer import InteractionProducer  # noqa: E402
from stream.simulator import UserSimulator  # noqa: E402

HISTOGRAM = "streamrec_revocation_writes_seconds"


def revocation_waits(port: int) -> tuple[int, float, int]:
    """(rebalances that revoked this worker's partitions, seconds waited in all, waits over
    0.1 s)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
    samples = {(sample.name, sample.labels.get("le")): sample.value
               for family in text_string_to_metric_families(text.decode())
               for sample in family.samples if sample.name.startswith(HISTOGRAM)}
    count = int(samples.get((f"{HISTOGRAM}_count", None), 0))
    return (count, samples.get((f"{HISTOGRAM}_sum", None), 0.0),
            count - int(samples.get((f"{HISTOGRAM}_bucket", "0.1"), 0)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=10_000.0, help="events/s offered")
    parser.add_argument("--seconds", type=float, default=45.0)
    parser.add_argument("--partitions", type=int, default=6)
    parser.add_argument("--state-writer", choices=("shared", "owned"), default="owned")
    parser.add_argument("--redis-cluster", type=int, default=0, metavar="N")
    parser.add_argument("--models", default="session,mf")
    parser.add_argument("--leave", choices=("term", "kill"), default="term",
                        help="how the third worker leaves: SIGTERM, or kill -9")
    args = parser.parse_args()
    if args.redis_cluster and args.state_writer != "owned":
        sys.exit("--redis-cluster needs --state-writer owned (a group on a cluster)")
    run_id = uuid.uuid4().hex[:8]
    redis_service = (EmbeddedRedisCluster(args.redis_cluster) if args.redis_cluster
                     else EmbeddedRedis())
    with redis_service as redis_srv, EmbeddedKafka() as kafka, \
            tempfile.TemporaryDirectory() as tmp:
        topic = f"bench-{run_id}"
        ensure_topics(kafka.bootstrap, {topic: args.partitions, f"bench-dlq-{run_id}": 1})
        env = bench_worker_env(kafka.bootstrap, redis_srv.url, run_id,
                               live_models=args.models, state_writer=args.state_writer,
                               topic_partitions=args.partitions)
        log = open(Path(tmp) / "worker.log", "wb")  # noqa: SIM115
        ports: list[int] = []

        def start_worker() -> subprocess.Popen:
            ports.append(free_port())
            return spawn_worker(env, Path(tmp) / f"worker-{len(ports)}", log,
                                STREAMREC_WORKER_METRICS_PORT=str(ports[-1]))

        workers = [start_worker(), start_worker()]
        client, keys = sync_redis(redis_srv.url), RedisKeys("sr")
        applied = partial(events_handled, client, keys)

        sim = UserSimulator(20_000, 50_000, seed=5)
        events = list(sim.events(int(args.rate * args.seconds), time.time(), args.rate))
        per_tick = max(int(args.rate * 0.05), 1)  # sent every 50 ms
        sent, joined, left = 0, None, None
        progress = {"applied": 0, "since": time.monotonic(), "longest_stall": 0.0}

        def note_progress(behind: bool) -> None:
            """Track the longest time nothing was applied while ``behind`` (events wait)."""
            done, now = applied(), time.monotonic()
            if done != progress["applied"]:
                progress.update(applied=done, since=now)
            elif behind:
                progress["longest_stall"] = max(progress["longest_stall"],
                                                now - progress["since"])

        try:
            with InteractionProducer(kafka.bootstrap, topic, max_batch_events=500) as producer:
                producer.send_many(events[:per_tick])  # the group forms on the first events
                producer.flush()
                sent = per_tick
                deadline = time.monotonic() + 120
                while applied() < sent and time.monotonic() < deadline:
                    time.sleep(0.05)
                started = time.monotonic()
                while sent < len(events):
                    now = time.monotonic() - started
                    if joined is None and now >= args.seconds / 3:
                        joined, third = now, start_worker()
                        workers.append(third)
                    if left is None and now >= 2 * args.seconds / 3:
                        left = now
                        third.send_signal(signal.SIGTERM if args.leave == "term"
                                          else signal.SIGKILL)
                    batch = events[sent:sent + per_tick]
                    producer.send_many(batch)
                    sent += len(batch)
                    note_progress(progress["applied"] < sent - per_tick)
                    time.sleep(max(0.0, started + sent / args.rate - time.monotonic()))
                producer.flush()
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline and not (
                    applied() >= len(events) and (args.state_writer != "owned" or hop_settled(
                        client, keys, topic, args.partitions))):
                note_progress(True)
                time.sleep(0.05)
            exits = [worker.poll() for worker in workers[:2]]
            waits = [revocation_waits(port) for port, code in zip(ports, exits) if code is None]
            total = applied()
        finally:
            for worker in workers:
                terminate(worker)
            log.close()
            claim_waits = sum("another process had not given up" in line and "waiting" in line
                              for line in (Path(tmp) / "worker.log").read_text(
                                  errors="replace").splitlines())
    revocations = sum(count for count, _, _ in waits)
    print_result({
        "state_writer": args.state_writer, "redis_cluster_primaries": args.redis_cluster,
        "rate_events_per_s": args.rate, "seconds": args.seconds, "partitions": args.partitions,
        "leave": args.leave,
        "events_sent": len(events), "events_handled": total,
        "exactly_once": total == len(events),
        "joined_at_s": round(joined or 0, 1), "left_at_s": round(left or 0, 1),
        "first_two_workers_exited": [code for code in exits if code is not None],
        "revocations_of_the_first_two": revocations,
        "revocation_wait_mean_ms": round(1000 * sum(s for _, s, _ in waits) / revocations, 2)
        if revocations else None,
        "revocation_waits_over_100ms": sum(over for _, _, over in waits),
        "longest_stall_s": round(progress["longest_stall"], 2),
        "claim_window_waits": claim_waits,
    })


if __name__ == "__main__":
    main()
