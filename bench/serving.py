"""Serving benchmarks: ANN recall and freshness under churn, feed reads, on-demand recommend.

1. ANN — ``--items`` random unit-free vectors (``--dim``), HNSW M=16. For ``--churn-s``
   seconds a writer thread moves ``--churn-per-min`` × items vectors per minute (10 % by
   default) in small batches; every ``--probe-every-s`` recall@10 against exact search is
   measured over 50 queries with the vectors of that moment. Freshness: a moved vector is
   planted far from everything and timed until ``search`` returns it.
2. Feeds — JSON feeds written to a private redis-server; p99 of GET + decode.
3. Recommend — on-demand, single-threaded, *while the churn writer keeps moving vectors*: the
   serving pipeline with ANN top-100 on the user's MF vector + trending → blend → MMR and
   fairness re-rank to 20 → ε-greedy exploration; p99 and requests/s.

   The same again once the churn stopped and any rebuild finished (``recommend_quiet_*``).

Last line: JSON with ann_recall_at_10_min, ann_freshness_p99_s, feed_read_p99_ms,
recommend_p99_ms, recommend_rps (under churn) and the quiet figures. Usage: ``python bench/serving.py [--items 100000]``.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import orjson  # noqa: E402

from bench.report import print_result  # noqa: E402
from infra.embedded import EmbeddedRedis  # noqa: E402
from infra.redis_client import sync_redis  # noqa: E402
from schemas.keys import RedisKeys  # noqa: E402
from serving.ann import AnnIndex  # noqa: E402
from online_models.mf import OnlineMF  # noqa: E402
from serving.explore import EpsilonGreedy  # noqa: E402
from serving.recommender import Recommender, Request  # noqa: E402


def recall_at_10(index: AnnIndex, vectors: np.ndarray, queries: np.ndarray) -> float:
    hits = 0
    for q in queries:
        got, _ = index.search(q, 10)
        exact = np.argpartition(-(vectors @ q), 10)[:10]
        hits += len({int(i[1:]) for i in got} & set(exact.tolist()))
    return hits / (10 * len(queries))


def ann_under_churn(args, rng) -> dict:
    n, dim = args.items, args.dim
    vectors = rng.normal(size=(n, dim)).astype(np.float32)
    ids = [f"i{i}" for i in range(n)]
    index = AnnIndex(dim, capacity=n)
    t0 = time.perf_counter()
    index.upsert(ids, vectors)
    build_s = time.perf_counter() - t0
    lock, stop, moved = threading.Lock(), threading.Event(), [0]
    per_s = args.churn_per_min * n / 60.0
    probe_rows = np.arange(n - 1000, n)  # the writer never moves these: probes own them
    movable = n - len(probe_rows)

    def writer() -> None:
        start = time.perf_counter()
        while not stop.is_set():
            due = int((time.perf_counter() - start) * per_s) - moved[0]
            if due > 0:
                rows = rng.choice(movable, min(due, 500), replace=False)
                new = rng.normal(size=(len(rows), dim)).astype(np.float32)
                with lock:
                    vectors[rows] = new
                index.upsert([ids[r] for r in rows], new)
                moved[0] += len(rows)
            time.sleep(0.01)

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    recalls, fresh = [], []
    end = time.perf_counter() + args.churn_s
    while time.perf_counter() < end:
        queries = rng.normal(size=(50, dim)).astype(np.float32)
        with lock:
            snapshot = vectors.copy()
        recalls.append(recall_at_10(index, snapshot, queries))
        target = int(probe_rows[len(fresh) % len(probe_rows)])
        planted = rng.normal(size=dim).astype(np.float32)
        planted *= 100.0 / np.linalg.norm(planted)  # far out along a fresh random direction
        sent = time.perf_counter()
        with lock:
            vectors[target] = planted
        index.upsert([ids[target]], planted[None, :])
        while index.search(planted, 1)[0] != [ids[target]]:
            if time.perf_counter() - sent > 30:
                sys.exit("a planted vector was not retrievable within 30 s")
            time.sleep(0.001)
        fresh.append(time.perf_counter() - sent)
        time.sleep(args.probe_every_s)
    return stop, thread, {"items": n, "dim": dim, "build_s": round(build_s, 1), "moved": moved[0],
            "churn_s": args.churn_s, "rebuilds": index.rebuilds,
            "ann_recall_at_10_min": round(min(recalls), 4),
            "ann_recall_at_10_mean": round(float(np.mean(recalls)), 4),
            "ann_freshness_p99_s": round(float(np.percentile(fresh, 99)), 4)}, index, vectors


def feed_reads(rng, n_users: int = 2000, reads: int = 20000) -> dict:
    keys = RedisKeys("bench")
    with EmbeddedRedis(appendonly=False) as server:
        client = sync_redis(server.url)
        for u in range(n_users):
            feed = {"user_id": f"u{u}", "items": [{"item_id": f"i{j}", "score": 1.0 / (j + 1),
                                                   "reason": "trending"} for j in range(20)],
                    "recommendation_id": f"r{u}", "generated_at": time.time()}
            client.set(keys.feed(f"u{u}"), orjson.dumps(feed))
        latencies = np.empty(reads)
        users = rng.integers(n_users, size=reads)
        for n, u in enumerate(users.tolist()):
            t = time.perf_counter()
            orjson.loads(client.get(keys.feed(f"u{u}")))
            latencies[n] = time.perf_counter() - t
        client.close()
    return {"feed_read_p50_ms": round(float(np.percentile(latencies, 50)) * 1000, 3),
            "feed_read_p99_ms": round(float(np.percentile(latencies, 99)) * 1000, 3)}


def recommend_latency(index: AnnIndex, vectors: np.ndarray, rng, requests: int = 2000) -> dict:
    """The full serving pipeline (serving.recommender) for one user per request: ANN on the
    user's MF vector + trending → blend → MMR/fairness re-rank → ε-greedy exploration."""
    n, dim = vectors.shape
    mf = OnlineMF(factors=dim)
    users = [f"u{u}" for u in range(5000)]
    mf.store.set_vectors("user", users, rng.normal(size=(len(users), dim)).astype(np.float32))
    trending = [(f"i{i}", float(n - i)) for i in range(1000)]
    recommender = Recommender(trending=lambda k: trending[:k], mf=mf, ann=index,
                              explorer=EpsilonGreedy(0.1, seed=0))
    latencies = np.empty(requests)
    started = time.perf_counter()
    for r in range(requests):
        t = time.perf_counter()
        history = tuple(f"i{i}" for i in rng.integers(n, size=10))
        recommender.recommend([Request(users[r % len(users)], history, k=20)])
        latencies[r] = time.perf_counter() - t
    total = time.perf_counter() - started
    return {"recommend_p50_ms": round(float(np.percentile(latencies, 50)) * 1000, 2),
            "recommend_p99_ms": round(float(np.percentile(latencies, 99)) * 1000, 2),
            "recommend_rps": round(requests / total)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--churn-s", type=float, default=60.0)
    parser.add_argument("--churn-per-min", type=float, default=0.10)
    parser.add_argument("--probe-every-s", type=float, default=1.0)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    stop, writer, ann, index, vectors = ann_under_churn(args, rng)
    serving = recommend_latency(index, vectors, rng)  # while the writer keeps moving vectors
    stop.set()
    writer.join()
    index.wait_for_rebuild(300)
    quiet = {k.replace("recommend_", "recommend_quiet_"): v
             for k, v in recommend_latency(index, vectors, rng).items()}
    result = {**ann, "rebuilds": index.rebuilds, **feed_reads(rng), **serving, **quiet}
    print_result(result)


if __name__ == "__main__":
    main()
