"""Item pairs counted per event or scored at read time: quality on a validation split, and
what a request costs.

The state-redesign issue asks to measure GraphJet's approach — drop write-time pair counting
and score pairs at read time from the session ↔ item adjacency — against counting pairs as
events arrive. Two kinds of pairs are counted per event today: co-occurrences
(:class:`CooccurrenceModel`) and the session model's sequential rules (``sr``). Replays, with
the session protocol on the last ``--test-days`` of a training log (never the test split):

- ``cooc`` against ``cooc_read`` (:meth:`SessionModel.similar`: neighbours from each item's
  recent sessions), and the blend before re-ranking with co-occurrence counted, read, or left
  out;
- ``session`` with rules counted against ``session_rules_read`` (rules from each last item's
  recent sessions, :func:`online_models.session.read_time_rules`).

Then what a request costs: session + co-occurrence learn the training log into a private
redis-server, and the serving pipeline's candidates are computed for ``--requests`` validation
sessions one request at a time, with both kinds of pairs counted or both read (p50/p99 ms).
What each costs the worker: ``bench/ingest.py --models session,cooc,mf`` against ``--models
session,mf`` (docs/benchmarks.md).
Usage: ``python bench/read_time_pairs.py --data ../shared/data/yoochoose-rsc15-100k/yoochoose-clicks-100k_train_full.txt``
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import (add_validation_options, learn_events, print_result,  # noqa: E402
                          validation_split)
from infra.embedded import EmbeddedRedis  # noqa: E402
from infra.redis_client import sync_redis  # noqa: E402
from online_models.registry import MODELS, build  # noqa: E402
from online_models.session import SessionModel  # noqa: E402
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
    MODELS["session_rules_read"] = lambda: SessionModel(rules="read")
    names = ["cooc", "cooc_read", *BLENDS, "session", "session_rules_read"]
    results = run("session", train, valid, names, progress=False)
    result = {"train_events": len(train), "validation_events": len(valid)}
    for r in results:
        if r.name in names:
            result[f"{r.name}_hr20"] = round(r.metrics.get("HR@20", 0.0), 4)
            result[f"{r.name}_mrr20"] = round(r.metrics.get("MRR@20", 0.0), 4)
    result.update(request_costs(train, valid, args.requests))
    print_result(result)


def request_costs(train, valid, requests: int) -> dict[str, float]:
    """p50/p99 ms of one request's session + co-occurrence candidates from Redis, with pairs
    counted per event (rules in ``sr``, the cooc model) or both read from the adjacency."""
    histories = [p.query.session_items for p in session_queries(valid)][:requests]
    with EmbeddedRedis() as server:
        client = sync_redis(server.url)
        models = {name: model.bind(RedisStore(client, "bench", name)) for name, model in (
            ("session", SessionModel()), ("cooc", build("cooc")),
            ("session_read", SessionModel(rules="read")))}
        learn_events(models.values(), train, 1000)
        out = {}
        for how, session, cooc in (("counted", models["session"], models["cooc"]),
                                   ("read", models["session_read"], models["session_read"])):
            recommender = Recommender(trending=lambda n: [], session=session, cooc=cooc)
            for history in histories[:20]:  # warm-up: thread pool, imports
                recommender.candidates([Request("u", history)])
            times = []
            for history in histories:
                start = time.perf_counter()
                recommender.candidates([Request("u", history)])
                times.append((time.perf_counter() - start) * 1000)
            out[f"request_pairs_{how}_p50_ms"] = round(float(np.percentile(times, 50)), 2)
            out[f"request_pairs_{how}_p99_ms"] = round(float(np.percentile(times, 99)), 2)
        client.close()
    return out


if __name__ == "__main__":
    main()
