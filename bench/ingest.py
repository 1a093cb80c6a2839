"""End-to-end ingest: events/s of one worker with the live models on, and freshness.

Starts an embedded broker and redis-server, pre-loads ``--events`` simulated events in
envelopes, then:

1. baseline — a raw aiokafka consumer (manual assignment, no group) reads and validates every
   message (``schemas.events.split_message``), nothing else: the ceiling for this machine;
2. worker — ``streamrec worker`` (one process) consumes the same messages and applies them
   exactly once with ``STREAMREC_LIVE_MODELS``; events/s is measured from its first applied
   event to its last (the consumer-group join is excluded);
3. freshness — at a steady ``--rate`` events/s, a probe (a new user clicking a new item) is
   sent every ``1/--probes-per-s`` seconds; freshness = time from send to the probe's history
   key existing; with ``--vector-freshness``, also the time from send to the new item's MF
   vector being in an ANN index that tails the item-vector topic (the serving side's view; the
   index then shares this machine's two cores with the worker).

The last line is JSON with ``events_per_s``, ``baseline_events_per_s``, ``freshness_p50_ms``
and ``freshness_p99_ms``, and the CPU that the worker, redis-server and the broker each spent
per event while the worker drained the backlog (the load generator is idle then), and the
cores each process (and the load generator) kept busy during the steady-rate phase.
Usage: ``python bench/ingest.py [--events 100000] [--rate 10000]``; ``--state-writer single
--redis-cluster 3`` (or ``--state-writer owned``) runs the same on a local Redis Cluster of
3 primaries.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import threading
import time
import uuid
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from bench.report import (add_live_options, bench_worker_env, cpu_seconds,  # noqa: E402
                          events_handled, print_result, spawn_worker)
from infra.embedded import (EmbeddedKafka, EmbeddedRedis, EmbeddedRedisCluster,  # noqa: E402
                            ensure_topics, terminate)
from infra.redis_client import sync_redis  # noqa: E402
from schemas.events import Interaction, split_message  # noqa: E402
from schemas.keys import RedisKeys  # noqa: E402
from state.owner_commits import hop_settled  # noqa: E402
from state.redis_store import RedisStore  # noqa: E402
from online_models.mf import OnlineMF  # noqa: E402
from serving.ann import AnnIndex  # noqa: E402
from serving.vector_tail import VectorTail  # noqa: E402
from stream.producer import InteractionProducer  # noqa: E402
from stream.simulator import UserSimulator  # noqa: E402


def cpu_of(processes: dict[str, int | list[int]]) -> dict[str, float]:
    """CPU seconds so far of each named process (or group of processes: a cluster's nodes)."""
    return {name: sum(cpu_seconds(p) for p in (pids if isinstance(pids, list) else [pids]))
            for name, pids in processes.items()}


async def raw_consume(bootstrap: str, topic: str, messages: int) -> tuple[int, float]:
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                max_partition_fetch_bytes=4_000_000)
    await consumer.start()
    try:
        parts = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or []]
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        seen = events = 0
        start = time.perf_counter()
        while seen < messages:
            batches = await consumer.getmany(timeout_ms=1000, max_records=5000)
            for records in batches.values():
                for record in records:
                    events += len(split_message(record.value)[0])
                    seen += 1
        return events, time.perf_counter() - start
    finally:
        await consumer.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--rate", type=float, default=10_000.0)
    parser.add_argument("--freshness-s", type=float, default=20.0)
    parser.add_argument("--probes-per-s", type=float, default=10.0)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--event-time", choices=("sent", "simulator"), default="sent",
                        help="events' timestamps advance at --rate a second (sent), or at the "
                        "simulator's 100 a second (what runs before session 34 used: item "
                        "times then change ~100× as often as live, per event)")
    parser.add_argument("--state-writer", choices=("shared", "single", "owned"),
                        default="shared",
                        help="STREAMREC_STATE_WRITER of the worker (single: model state in "
                             "its memory, rows written whole; one worker only. owned: item-side "
                             "state applied by its owner partitions through the item-deltas "
                             "topic; the drain ends once the owners caught up, and a probe is "
                             "fresh once its item's state is in Redis too)")
    add_live_options(parser)
    parser.add_argument("--vector-freshness", action="store_true",
                        help="also tail the item-vector topic into an ANN index in this process "
                             "and time the probes' new items (costs CPU the worker shares)")
    parser.add_argument("--workers", type=int, default=1,
                        help="worker processes in one group (shared layout); CPU is their sum, "
                             "measured from the moment every one holds partitions")
    parser.add_argument("--redis-cluster", type=int, default=0, metavar="N",
                        help="run on a Redis Cluster of N primaries (needs --state-writer "
                             "single or owned); redis CPU is the nodes' sum")
    parser.add_argument("--redis-replicas", type=int, default=0, metavar="N",
                        help="with --redis-cluster: N replicas per primary (their CPU counts "
                             "as Redis's)")
    parser.add_argument("--wait-replicas", type=int, default=0, metavar="N",
                        help="STREAMREC_REDIS_WAIT_REPLICAS of the worker: commits done once "
                             "N replicas acknowledged them")
    args = parser.parse_args()
    if args.redis_replicas and not args.redis_cluster:
        sys.exit("--redis-replicas needs --redis-cluster")
    if args.redis_cluster and args.state_writer not in ("single", "owned"):
        sys.exit("--redis-cluster needs --state-writer single or owned")
    if args.workers > 1 and args.state_writer == "single":
        sys.exit("--workers > 1 needs --state-writer shared or owned (one single writer "
                 "holds the lease)")
    run_id = uuid.uuid4().hex[:8]
    redis_service = (EmbeddedRedisCluster(args.redis_cluster, appendonly=args.redis_aof,
                                          replicas=args.redis_replicas)
                     if args.redis_cluster else EmbeddedRedis(appendonly=args.redis_aof))
    with redis_service as redis_srv, EmbeddedKafka() as kafka, \
            tempfile.TemporaryDirectory() as tmp:
        topic, dlq = f"bench-{run_id}", f"bench-dlq-{run_id}"
        vectors_topic = f"bench-vectors-{run_id}"
        ensure_topics(kafka.bootstrap, {topic: args.partitions, dlq: 1,
                                        vectors_topic: args.partitions},
                      compacted=(vectors_topic,))
        sim = UserSimulator(20_000, 50_000, seed=1)
        # event time as producers would stamp it: --rate events a second (the backlog ends
        # now), or the simulator's own 100 a second (--event-time simulator, before session 34)
        per_s = args.rate if args.event_time == "sent" else 100.0
        events = list(sim.events(args.events, time.time() - args.events / per_s, per_s))
        with InteractionProducer(kafka.bootstrap, topic, max_batch_events=500) as producer:
            producer.send_many(events)
            producer.flush()
            messages = producer.stats.messages_sent
        baseline_events, baseline_s = asyncio.run(raw_consume(kafka.bootstrap, topic, messages))

        env = bench_worker_env(kafka.bootstrap, redis_srv.url, run_id,
                               live_models=args.models, state_writer=args.state_writer,
                               topic_partitions=args.partitions, worker_report_interval_s=0.5,
                               redis_wait_replicas=args.wait_replicas)
        log = open(Path(tmp) / "worker.log", "wb")  # noqa: SIM115
        workers = [spawn_worker(env, Path(tmp) / f"worker-{n}", log)
                   for n in range(args.workers)]
        client, keys = sync_redis(redis_srv.url), RedisKeys("sr")
        applied = partial(events_handled, client, keys)

        def drained_all() -> bool:  # owned: the owners caught up as well
            return applied() >= len(events) and (args.state_writer != "owned" or hop_settled(
                client, keys, topic, args.partitions))

        try:
            deadline = time.monotonic() + 120
            while applied() == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
            while args.workers > 1 and not all_assigned(client, keys, args.workers) \
                    and time.monotonic() < deadline:
                time.sleep(0.01)  # the group settles: measured from here
            first = time.perf_counter()
            start_count = applied()
            redis_pids = ([n.proc.pid for n in redis_srv.nodes] if args.redis_cluster
                          else redis_srv.proc.pid)
            processes = {"worker": [w.pid for w in workers], "redis": redis_pids,
                         "broker": kafka.proc.pid}
            cpu_start = cpu_of(processes)
            while not drained_all() and time.monotonic() < deadline + 600:
                if any(w.poll() is not None for w in workers):
                    sys.exit(f"worker exited: {(Path(tmp) / 'worker.log').read_text()[-2000:]}")
                time.sleep(0.01)
            worker_s = time.perf_counter() - first
            drained = applied() - start_count
            worker_rate = drained / worker_s if worker_s else 0.0
            cpu_us = {name: 1e6 * (cpu - cpu_start[name]) / drained if drained else None
                      for name, cpu in cpu_of(processes).items()}
            # generated up front (~18 µs per event on a good day): simulating users during the
            # measurement would bill their cost to the machine the worker shares
            load = list(sim.events(int(args.rate * args.freshness_s), time.time(), per_s))
            processes["load_generator"] = os.getpid()  # this process: producer + probes
            cpu_start = cpu_of(processes)
            steady_start = time.perf_counter()
            latencies, vector_latencies, vectors_received = freshness(
                kafka.bootstrap, topic, client, keys, load, args, vectors_topic)
            steady_s = time.perf_counter() - steady_start
            steady_cores = {name: (cpu - cpu_start[name]) / steady_s
                            for name, cpu in cpu_of(processes).items()}
            time.sleep(0.6)  # one more report interval
            redone = sum(json.loads(raw).get("chunks_redone", 0)
                         for raw in client.hvals(keys.worker_reports))
        finally:
            for worker in workers:
                terminate(worker)
            log.close()
            client.close()
    result = {
        "events": len(events), "messages": messages, "partitions": args.partitions,
        "workers": args.workers, "events_measured": drained,
        "models": args.models, "state_writer": args.state_writer, "redis_aof": args.redis_aof,
        "redis_cluster_primaries": args.redis_cluster, "redis_replicas": args.redis_replicas,
        "wait_replicas": args.wait_replicas,
        "events_per_s": round(worker_rate),
        "chunks_redone": redone,  # commits voided or failed (each re-prepares its chunk)
        "baseline_events_per_s": round(baseline_events / baseline_s),
        "ratio_to_baseline": round(worker_rate / (baseline_events / baseline_s), 3),
        # CPU per applied event while the worker drains the backlog: what 2 cores allow
        # (None if the first applied batch held every event: nothing was timed)
        **{f"cpu_us_per_event_{name}": us and round(us, 1) for name, us in cpu_us.items()},
        "cores_needed_at_50k": round(sum(cpu_us.values()) * 50_000 / 1e6, 2)
        if drained else None,
        "freshness_rate_events_per_s": args.rate, "freshness_probes": len(latencies),
        # cores each process kept busy during the steady-rate phase (2 on this machine)
        **{f"steady_cores_{name}": round(c, 2) for name, c in steady_cores.items()},
        "freshness_p50_ms": round(float(np.percentile(latencies, 50)), 1) if latencies else None,
        "freshness_p99_ms": round(float(np.percentile(latencies, 99)), 1) if latencies else None,
        "vector_probes": len(vector_latencies),
        "vectors_received_per_s": round(vectors_received / args.freshness_s),
        "vector_freshness_p50_ms": round(float(np.percentile(vector_latencies, 50)), 1)
        if vector_latencies else None,
        "vector_freshness_p99_ms": round(float(np.percentile(vector_latencies, 99)), 1)
        if vector_latencies else None,
    }
    print_result(result)


def all_assigned(client, keys: RedisKeys, workers: int) -> bool:
    """Whether ``workers`` live workers each report partitions of their own."""
    reports = [json.loads(raw) for raw in client.hvals(keys.worker_reports)]
    fresh = [r for r in reports if r.get("assigned") and time.time() - r["updated_at"] < 2]
    return len(fresh) >= workers


def probe_item(user: str) -> str:
    """The new item a probe user clicks."""
    return f"probe-item-{user.removeprefix('probe-')}"


def freshness(bootstrap, topic, client, keys, events, args, vectors_topic: str
              ) -> tuple[list[float], list[float], int]:
    """Steady load at ``args.rate`` with timed probes: a click of a new user on a new item.
    Returns (state latencies: until the user's history exists, and with ``--state-writer
    owned`` the item's MF vector (or session row) as well; vector latencies: until the
    new item's MF vector is in an ANN index tailing the item-vector topic), in ms; and how
    many vector records the tail applied."""
    stop = threading.Event()
    sent: dict[str, float] = {}
    vector_sent: dict[str, float] = {}
    latencies: list[float] = []
    vector_latencies: list[float] = []
    index = AnnIndex(OnlineMF().factors)
    item_state = None  # owned: a probe is fresh once its item's owned state is in Redis too
    if args.state_writer == "owned":
        model, table = ("mf", "item") if "mf" in args.models.split(",") else ("session", "isess")
        item_state = partial(RedisStore(client, "sr", model, rows_as_strings=True).key, table)
    tail = VectorTail(index, bootstrap, vectors_topic).start() if args.vector_freshness else None

    def watch() -> None:
        while not stop.is_set() or sent or vector_sent:
            now = time.perf_counter()
            waiting = list(sent.items())
            if waiting:  # one round trip for all probes: polling must not load the machine
                with client.pipeline(transaction=False) as pipe:
                    for user, _ in waiting:  # key by key: one slot each on a cluster
                        pipe.exists(keys.user_history(user))
                        if item_state:
                            pipe.exists(item_state(probe_item(user)))
                    found = pipe.execute()
                    step = 1 + bool(item_state)
                    arrived = [all(found[n:n + step]) for n in range(0, len(found), step)]
                for (user, t0), found in zip(waiting, arrived):
                    if found:
                        latencies.append((now - t0) * 1000)
                        sent.pop(user)
            for item, t0 in list(vector_sent.items()):
                if index.vectors([item])[1][0]:
                    vector_latencies.append((now - t0) * 1000)
                    vector_sent.pop(item)
            time.sleep(0.002)
            if stop.is_set() and time.perf_counter() - stop_time[0] > 10:
                break

    stop_time = [0.0]
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    load = iter(events)
    with InteractionProducer(bootstrap, topic, max_batch_events=500, linger_s=0.005) as producer:
        start = time.perf_counter()
        tick, probe_every, next_probe, n = 0.01, 1.0 / args.probes_per_s, 0.0, 0
        while (elapsed := time.perf_counter() - start) < args.freshness_s:
            due = int(elapsed * args.rate) - n
            batch = [next(load, None) for _ in range(max(due, 0))]
            batch = [e for e in batch if e is not None]
            if batch:
                producer.send_many(batch)
                n += len(batch)
            if elapsed >= next_probe:
                probe = uuid.uuid4().hex[:10]
                user = f"probe-{probe}"
                item = probe_item(user)
                sent[user] = time.perf_counter()
                if tail is not None:
                    vector_sent[item] = sent[user]
                producer.send(Interaction(event_id=user, user_id=user, item_id=item,
                                          type="click", timestamp=time.time()))
                next_probe += probe_every
            time.sleep(tick)
        producer.flush()
    stop_time[0] = time.perf_counter()
    stop.set()
    watcher.join(15)
    if tail is None:
        return latencies, vector_latencies, 0
    tail.stop()
    return latencies, vector_latencies, tail.applied


if __name__ == "__main__":
    main()
