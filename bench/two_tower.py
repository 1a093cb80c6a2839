"""Two-tower speed on this machine: training throughput, time to the first version, and one
request's inference latency on one core, beside ALS's fold-in on the same queries (baseline in
the same run).

The model learns the first ``--share`` of MovieLens latest-small (with the item descriptions
beside it) as the replay does; the training of the last version is timed alone; then
``--requests`` single-user queries are timed one by one with ``torch.set_num_threads(1)``.
Usage: ``python bench/two_tower.py``; the last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from online_models.als import OnlineALS  # noqa: E402
from online_models.base import Query  # noqa: E402
from online_models.signals import SignalMapper  # noqa: E402
from online_models.two_tower import TwoTowerModel  # noqa: E402
from replay.loaders import load_items, load_log  # noqa: E402


def percentiles(seconds: list[float]) -> dict[str, float]:
    ms = np.array(seconds) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 3),
            "p99_ms": round(float(np.percentile(ms, 99)), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/movielens-latest-small")
    parser.add_argument("--share", type=float, default=0.6)
    parser.add_argument("--requests", type=int, default=500)
    args = parser.parse_args()
    if not Path(args.data).exists():
        sys.exit(f"{args.data}: not found (the shared data folder is needed)")
    events = load_log(args.data, "movielens")
    events = events[:int(len(events) * args.share)]
    items = load_items(args.data, "movielens")
    model, als, mapper = TwoTowerModel(), OnlineALS(), SignalMapper()
    model.learn_items(items)
    first_version_s = None
    started = time.perf_counter()
    for start in range(0, len(events), 1000):
        signals = mapper.map(events[start:start + 1000])
        model.learn(signals)
        als.learn(signals)
        if first_version_s is None and model.version:
            first_version_s = time.perf_counter() - started
    examples = len(model._examples)
    train_started = time.perf_counter()
    model.train()
    train_s = time.perf_counter() - train_started
    users = sorted({e.user_id for e in events})
    rng = np.random.default_rng(0)
    queries = [Query(str(u)) for u in rng.choice(users, args.requests)]
    torch.set_num_threads(1)
    timings: dict[str, list[float]] = {"two_tower": [], "als": []}
    for query in queries:
        for name, m in (("two_tower", model), ("als", als)):
            t = time.perf_counter()
            m.recommend([query], 100)
            timings[name].append(time.perf_counter() - t)
    result = {"events": len(events), "window_examples": examples,
              "catalogue_items": len(model._published.item_ids),
              "epochs": model.epochs, "train_seconds": round(train_s, 2),
              "train_examples_per_s": round(examples * model.epochs / train_s),
              "first_version_after_s": round(first_version_s or 0.0, 2),
              "one_request_one_core": {name: percentiles(t) for name, t in timings.items()},
              "cpus": __import__("os").cpu_count()}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
