"""Co-occurrence counted per event or scored at read time: quality on a validation split.

The state-redesign issue asks to measure GraphJet's approach — drop write-time pair counting
and score co-occurrence at read time from the session ↔ item adjacency — against counting
pairs as events arrive. Replays, with the session protocol on the last ``--test-days`` of a
training log (never the test split): ``cooc`` (pairs counted per event) and ``cooc_read``
(:meth:`online_models.session.SessionModel.similar`: neighbours from each item's recent
sessions), alone and as the blend's co-occurrence source (``blend_raw``, before re-ranking),
beside the blend without that source. Then what each costs a request: both models learn the
training log into a private redis-server, and the serving pipeline's candidates (session +
co-occurrence) are computed for ``--requests`` validation sessions one request at a time, with
the co-occurrence source counted or read (p50/p99 ms). What each costs the worker is
``bench/ingest.py --models session,cooc,mf`` against ``--models session,mf``
(docs/benchmarks.md).
Usage: ``python bench/read_time_cooc.py --data ../shared/data/yoochoose-rsc15-100k/yoochoose-clicks-100k_train_full.txt``
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import add_validation_options, print_result, validation_split  # noqa: E402
from online_models.registry import MODELS  # noqa: E402
from infra.embedded import EmbeddedRedis  # noqa: E402
from infra.redis_client import sync_redis  # noqa: E402
from online_models.registry import build  # noqa: E402
from online_models.signals import SignalMapper  # noqa: E402
from replay.protocols import run, session_queries  # noqa: E402
from serving.blended import BlendedModel  # noqa: E402
from serving.recommender import Recommender, Request  # noqa: E402
from state.redis_store import RedisStore  # noqa: E402

BLENDS = {f"blend_raw_cooc_{how}": how for how in ("written", "read", "none")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_validation_options(parser)
    parser.add_argument("--requests", type=int, default=1000)
    args = parser.parse_args()
    train, valid = validation_split(args)
    for name, how in BLENDS.items():
        MODELS[name] = lambda how=how: BlendedModel(rerank=False, cooc=how)
    names = ["cooc", "cooc_read", *BLENDS]
    results = run("session", train, valid, names, progress=False)
    result = {"train_events": len(train), "validation_events": len(valid)}
    for r in results:
        if r.name in names:
            result[f"{r.name}_hr20"] = round(r.metrics.get("HR@20", 0.0), 4)
            result[f"{r.name}_mrr20"] = round(r.metrics.get("MRR@20", 0.0), 4)
    result.update(request_costs(train, valid, args.requests))
    print_result(result)


def request_costs(train, valid, requests: int) -> dict[str, float]:
    """p50/p99 ms of one request's session + co-occurrence candidates, from Redis."""
    histories = [p.query.session_items for p in session_queries(valid)][:requests]
    with EmbeddedRedis() as server:
        client = sync_redis(server.url)
        models = {name: build(name).bind(RedisStore(client, "bench", name))
                  for name in ("session", "cooc")}
        for start in range(0, len(train), 1000):
            batch = train[start:start + 1000]
            for model in models.values():
                model.learn(SignalMapper().map(batch))
        out = {}
        for how, cooc in (("written", models["cooc"]), ("read", models["session"])):
            recommender = Recommender(trending=lambda n: [], session=models["session"],
                                      cooc=cooc)
            for history in histories[:20]:  # warm-up: thread pool, imports
                recommender.candidates([Request("u", history)])
            times = []
            for history in histories:
                start = time.perf_counter()
                recommender.candidates([Request("u", history)])
                times.append((time.perf_counter() - start) * 1000)
            out[f"request_cooc_{how}_p50_ms"] = round(float(np.percentile(times, 50)), 2)
            out[f"request_cooc_{how}_p99_ms"] = round(float(np.percentile(times, 99)), 2)
        client.close()
    return out


if __name__ == "__main__":
    main()
