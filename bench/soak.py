"""Soak: a steady event rate for ``--minutes`` with a fault every ``--fault-every-s`` seconds,
then the books are balanced: nothing lost, nothing applied twice, memory bounded.

Embedded broker and redis-server (AOF on, the production config), one ``streamrec worker``
with the live models, and a producer thread sending simulated events at ``--rate`` events/s
through the SDK (on a failed send it sends the same events again: same ids, so the worker's
dedup must drop the copies). Faults cycle through: ``kill -9`` of the worker (restarted at
once), ``kill -9`` of redis-server (restarted from its AOF), and the broker paused (SIGSTOP)
for ``--pause-s`` seconds. Every second: events produced, applied, Redis memory and the
worker's RSS. Per fault: *recovery* = seconds from the fault's end (a pause's resume) until
the worker has caught up with what was produced by then plus one second of traffic. A worker
that exits on its own (the stall watch's exit 75) is restarted, as compose would, and counted.
``--redis-cluster N``: a Redis Cluster of N primaries with a replica each instead of one
server; ``kill -9 redis`` then kills a primary (its replica takes its slots over) and starts it
again (it rejoins as a replica).

Pass: lost = 0, doubled = 0, unsent = 0 (``--state-writer owned``: and no item-delta record left
unapplied by its owner at the end), each recovery ≤ 30 s, Redis memory and worker RSS at the
end within 1.5× of their values half-way (model state lives ``--state-ttl-s``, so memory
must stop growing once it expires). Exit 0 only on pass.
Usage: ``python bench/soak.py [--minutes 10] [--rate 10000] [--faults "pause broker"]``
(``make soak``). Last line: JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.report import print_result  # noqa: E402
from infra.embedded import (EmbeddedKafka, EmbeddedRedis, EmbeddedRedisCluster,  # noqa: E402
                            ensure_streamrec_topics, free_port, terminate)
from infra.redis_client import memory_by_node, sync_redis  # noqa: E402
from infra.settings import Settings  # noqa: E402
from schemas.keys import RedisKeys  # noqa: E402
from state.owner_commits import item_deltas_pending  # noqa: E402
from stream.producer import InteractionProducer  # noqa: E402
from stream.simulator import UserSimulator  # noqa: E402

FAULTS = ("kill -9 worker", "kill -9 redis", "pause broker")


class Worker:
    """``streamrec worker`` as a child process that can be killed and started again."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.env, self.log_path, self.proc = env, log_path, None
        self.exits: list[int] = []  # statuses of exits the supervisor restarted

    def supervise(self) -> None:
        """Restart the worker if it exited on its own (compose: ``restart: unless-stopped``):
        exit 75 is the stall watch's or an operator's reset asking for it."""
        if self.proc is not None and self.proc.poll() is not None:
            self.exits.append(self.proc.returncode)
            self.start()

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "infra.cli", "worker",
                                          "--loglevel", "warn"], env=self.env, stdout=log,
                                         stderr=subprocess.STDOUT, cwd=ROOT,
                                         start_new_session=True)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)

    def rss_mb(self) -> float:
        try:
            pages = int(Path(f"/proc/{self.proc.pid}/statm").read_text().split()[1])
        except (OSError, IndexError):
            return 0.0
        return pages * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


class Producer(threading.Thread):
    """Sends ``rate`` events/s until stopped; a failed flush sends the same events again.
    ``produced`` counts events once Kafka acknowledged them. Events whose sends still fail
    ``give_up_s`` after the stop (a broker paused at the end) are ``unsent``: they may or
    may not be in the log, so the books cannot balance and the run fails."""

    def __init__(self, settings: Settings, rate: float, give_up_s: float = 50.0) -> None:
        super().__init__(daemon=True)
        self.settings, self.rate, self.give_up_s = settings, rate, give_up_s
        self.produced, self.resent, self.unsent = 0, 0, 0
        self.stop = threading.Event()
        self.simulator = UserSimulator(20_000, 50_000, seed=7)

    def run(self) -> None:
        with InteractionProducer(self.settings.kafka_bootstrap,
                                 self.settings.topic_interactions) as sdk:
            started, tick = time.monotonic(), 0.1
            while not self.stop.is_set():
                due = int((time.monotonic() - started) * self.rate) - self.produced
                if due > 0:
                    self._send(sdk, list(self.simulator.events(due, time.time(), self.rate)))
                time.sleep(tick)

    def _send(self, sdk: InteractionProducer, events: list) -> None:
        """Send ``events`` until Kafka acknowledges them all (the same ids each time)."""
        give_up_at = None
        while True:
            try:
                sdk.send_many(events)
                sdk.flush(timeout_s=10)
                self.produced += len(events)
                return
            except Exception:  # noqa: BLE001 - broker paused: same ids again
                if self.stop.is_set():
                    give_up_at = give_up_at or time.monotonic() + self.give_up_s
                    if time.monotonic() >= give_up_at:
                        self.unsent += len(events)
                        return
                self.resent += len(events)
                time.sleep(1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=10000.0, help="events/s offered")
    parser.add_argument("--fault-every-s", type=float, default=60.0)
    parser.add_argument("--pause-s", type=float, default=20.0, help="broker pause length")
    parser.add_argument("--faults", default=",".join(FAULTS),
                        help="the faults to cycle through, comma-separated, of: "
                             + ", ".join(FAULTS))
    parser.add_argument("--stall-timeout-s", type=float, default=20.0,
                        help="the worker's stall watch (STREAMREC_WORKER_STALL_TIMEOUT_S): "
                             "short here, so a stalled fetcher is restarted within a fault's "
                             "recovery budget")
    parser.add_argument("--state-ttl-s", type=int, default=120,
                        help="TTL of model state (user and item side) and of the dedup "
                             "sets: short, so that memory reaches its steady state within "
                             "the run")
    parser.add_argument("--static-membership", action="store_true",
                        help="the worker joins its group as a static member "
                             "(STREAMREC_KAFKA_GROUP_INSTANCE_ID): restarted after a kill -9, "
                             "it gets its partitions back without waiting out the session")
    parser.add_argument("--state-writer", choices=("shared", "single", "owned"),
                        default="shared",
                        help="STREAMREC_STATE_WRITER of the worker (single: it holds model "
                             "state and expires the keys it writes itself; owned: item-side "
                             "state applied by the item partitions' owners through the "
                             "item-deltas topic, docs/item-ownership.md)")
    parser.add_argument("--redis-cluster", type=int, default=0, metavar="N",
                        help="a Redis Cluster of N primaries with a replica each (needs "
                             "--state-writer single or owned); kill -9 redis kills a primary")
    parser.add_argument("--wait-replicas", type=int, default=0, metavar="N",
                        help="STREAMREC_REDIS_WAIT_REPLICAS of the worker (with "
                             "--redis-cluster: commits done once a primary's replica has them)")
    args = parser.parse_args()
    if args.redis_cluster and args.state_writer == "shared":
        parser.error("--redis-cluster needs --state-writer single or owned")
    faults_cycled = [kind.strip() for kind in args.faults.split(",") if kind.strip()]
    unknown = sorted(set(faults_cycled) - set(FAULTS))
    if unknown or not faults_cycled:
        parser.error(f"--faults: unknown {unknown or 'none given'}; choose among {FAULTS}")
    work = Path(tempfile.mkdtemp(prefix="streamrec-soak-"))
    redis_srv = (EmbeddedRedisCluster(args.redis_cluster, replicas=1) if args.redis_cluster
                 else EmbeddedRedis(workdir=str(work / "redis")))
    (work / "redis").mkdir()
    with EmbeddedKafka() as kafka:
        redis_srv.start()
        settings = Settings(kafka_bootstrap=kafka.bootstrap, redis_url=redis_srv.url,
                            redis_retry_max_s=1.0)
        ensure_streamrec_topics(settings)
        env = {**os.environ, "STREAMREC_KAFKA_BOOTSTRAP": kafka.bootstrap,
               "STREAMREC_REDIS_URL": redis_srv.url, "STREAMREC_REDIS_RETRY_MAX_S": "1",
               "STREAMREC_USER_STATE_TTL_S": str(args.state_ttl_s),
               "STREAMREC_DEDUP_TTL_S": str(args.state_ttl_s),
               "STREAMREC_ITEM_STATE_TTL_S": str(args.state_ttl_s),
               "STREAMREC_WORKER_STALL_TIMEOUT_S": str(args.stall_timeout_s),
               "STREAMREC_WORKER_WEB_PORT": str(free_port()),
               "STREAMREC_STATE_WRITER": args.state_writer,
               "STREAMREC_REDIS_WAIT_REPLICAS": str(args.wait_replicas),
               "STREAMREC_KAFKA_GROUP_INSTANCE_ID":
                   "soak-worker" if args.static_membership else "",
               "STREAMREC_WORKER_DATA_DIR": str(work / "worker-data")}
        worker = Worker(env, work / "worker.log")
        worker.start()
        books = Books(redis_srv.url, RedisKeys(settings.key_prefix),
                      settings.topic_interactions if args.state_writer == "owned" else None,
                      settings.topic_partitions)
        producer = Producer(settings, args.rate)
        samples, faults = [], []
        try:
            producer.start()
            started = time.monotonic()
            next_fault, fault_n = started + args.fault_every_s, 0
            while time.monotonic() - started < args.minutes * 60:
                now = time.monotonic()
                worker.supervise()
                samples.append(books.sample(now - started, producer, worker))
                if now >= next_fault:
                    kind = faults_cycled[fault_n % len(faults_cycled)]
                    faults.append(inject(kind, now - started,
                                         producer, worker, redis_srv, kafka, args.pause_s))
                    fault_n += 1
                    next_fault = time.monotonic() + args.fault_every_s
                note_recoveries(faults, books.applied(), time.monotonic() - started)
                time.sleep(1)
            producer.stop.set()
            producer.join(producer.give_up_s + 20)
            deadline = time.monotonic() + 180
            while (books.applied() < producer.produced or books.item_deltas_pending() != 0) \
                    and time.monotonic() < deadline:
                worker.supervise()
                note_recoveries(faults, books.applied(), time.monotonic() - started)
                time.sleep(1)
            note_recoveries(faults, books.applied(), time.monotonic() - started)
            time.sleep(3)  # redelivered copies must be skipped, not applied
            final = books.sample(time.monotonic() - started, producer, worker)
        finally:
            producer.stop.set()
            books.client.close()
            terminate(worker.proc, 15)
            redis_srv.close()
    applied_n = final["applied"]
    # memory is steady once state older than the TTL expires: compare the end with half-way
    steady = next((s for s in samples if s["t"] >= args.minutes * 30 and s["redis_mb"] > 0),
                  samples[-1])
    result = {
        "minutes": args.minutes, "rate": args.rate, "state_writer": args.state_writer,
        "static_membership": args.static_membership, "redis_cluster": args.redis_cluster,
        "wait_replicas": args.wait_replicas,
        "produced": producer.produced,
        "resent_after_failed_sends": producer.resent, "unsent": producer.unsent,
        "applied": applied_n,
        "lost": max(producer.produced - applied_n, 0),
        "doubled": max(applied_n - producer.produced, 0),
        "item_deltas_pending": final["item_deltas_pending"],
        "faults": faults,
        "max_recovery_s": max((f["recovered_s"] or float("inf") for f in faults), default=0),
        "redis_mb_steady": steady["redis_mb"], "redis_mb_end": final["redis_mb"],
        "worker_exits_restarted": worker.exits,
        "worker_rss_mb_steady": steady["worker_rss_mb"],
        "worker_rss_mb_end": final["worker_rss_mb"],
    }
    result["passed"] = (result["lost"] == 0 and result["doubled"] == 0 and result["unsent"] == 0
                        and result["item_deltas_pending"] == 0
                        and result["max_recovery_s"] <= 30
                        and result["redis_mb_end"] <= 1.5 * max(result["redis_mb_steady"], 1)
                        and result["worker_rss_mb_end"]
                        <= 1.5 * max(result["worker_rss_mb_steady"], 1))
    (work / "samples.json").write_text(json.dumps(samples))
    print(f"per-second samples: {work / 'samples.json'}; worker log: {work / 'worker.log'}")
    print_result({k: v for k, v in result.items() if k != "faults"})
    for fault in faults:
        print(f"  {fault['at_s']:>6.0f} s  {fault['kind']:<16} recovered in "
              f"{fault['recovered_s']} s")
    print(json.dumps(result))
    return 0 if result["passed"] else 1


def note_recoveries(faults: list[dict], applied_now: int, now_s: float) -> None:
    """Stamp the faults whose catch-up target is now applied."""
    for fault in faults:
        if fault["recovered_s"] is None and applied_now >= fault["target"]:
            fault["recovered_s"] = round(now_s - fault["at_s"], 1)


class Books:
    """What Redis says: events applied, memory used, and in the owned layout (``topic`` set)
    the item-delta records the owners have not applied yet. One client; after a Redis
    restart its next call reconnects (a call during the outage answers -1)."""

    def __init__(self, redis_url: str, keys: RedisKeys, topic: str | None = None,
                 partitions: int = 0) -> None:
        self.client, self.keys = sync_redis(redis_url), keys
        self.topic, self.partitions = topic, partitions

    def item_deltas_pending(self) -> int:
        """Outbox entries (item-delta records) of the source partitions not yet applied by
        their owners (owners delete those they apply); 0 outside the owned layout."""
        if self.topic is None:
            return 0
        try:
            return item_deltas_pending(self.client, self.keys, self.topic, self.partitions)
        except Exception:  # noqa: BLE001 - Redis restarting: not known this second
            return -1

    def applied(self) -> int:
        try:
            return int(self.client.hget(self.keys.stats, "events_applied") or 0)
        except Exception:  # noqa: BLE001 - Redis restarting: not known this second
            return -1

    def sample(self, t: float, producer: Producer, worker: Worker) -> dict:
        try:  # every primary's, on a cluster
            memory = sum(used for used, _, _ in memory_by_node(self.client).values()) / 2 ** 20
        except Exception:  # noqa: BLE001
            memory = -1.0
        return {"t": round(t, 1), "produced": producer.produced, "applied": self.applied(),
                "item_deltas_pending": self.item_deltas_pending(),
                "redis_mb": round(memory, 1), "worker_rss_mb": round(worker.rss_mb(), 1)}


def inject(kind: str, at: float, producer: Producer, worker: Worker,
           redis_srv: EmbeddedRedis | EmbeddedRedisCluster, kafka: EmbeddedKafka,
           pause_s: float) -> dict:
    """One fault; recovery counts from its end (a pause's resume) until the worker applied
    what was produced by then plus one second of traffic."""
    print(f"{at:7.1f} s  fault: {kind}", flush=True)
    if kind == "kill -9 worker":
        worker.kill()
        worker.start()
    elif kind == "kill -9 redis" and isinstance(redis_srv, EmbeddedRedisCluster):
        redis_srv.kill_primary().start()  # it rejoins as its successor's replica
    elif kind == "kill -9 redis":
        redis_srv.kill()
        redis_srv.start()
    else:
        os.kill(kafka.proc.pid, signal.SIGSTOP)
        time.sleep(pause_s)
        os.kill(kafka.proc.pid, signal.SIGCONT)
    ended = at + (pause_s if kind == "pause broker" else 0.0)
    return {"kind": kind, "at_s": round(ended, 1), "target": producer.produced + int(producer.rate),
            "recovered_s": None}


if __name__ == "__main__":
    sys.exit(main())
