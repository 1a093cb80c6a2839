"""Choose the sequential model's settings (``gru4rec``) and its weight beside ``session`` on a
validation split (never the test split): the last ``--test-days`` of the training log.

``session`` learns the validation split's training part once. Each setting of ``--grid``
(``"hidden=100,200;epochs=10,20"``: every combination; ``|`` between alternatives; empty:
the model's defaults) builds a
fresh sequential model on ``--device``, learns the same part and recommends for every
validation query; settings run in ``--processes`` processes at once. Every weighting then mixes
the same per-part candidate lists (``online_models.mixture.mix``, scores divided by each
part's best), so trying a weight costs no retraining. Prints HR@20 and MRR@20 per setting:
alone, and at each weight beside session 1.0.
Usage: ``python bench/tune_session_seq.py --data
../shared/data/yoochoose-rsc15-100k/yoochoose-clicks-100k_train_full.txt``
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import (add_validation_options, parse_grid, parse_options,  # noqa: E402
                          validation_split)
from online_models.mixture import mix, normalised  # noqa: E402
from online_models.registry import build  # noqa: E402
from online_models.signals import SignalMapper  # noqa: E402
from replay.metrics import ranking_metrics  # noqa: E402
from replay.protocols import session_queries  # noqa: E402

WEIGHTS = (0.1, 0.25, 0.5, 1.0, 2.0)


def candidate_lists(name: str, options: dict, train, queries, train_at_end: bool,
                    threads: int) -> tuple[list[dict], float]:
    """(normalised top-100 per query, seconds) of model ``name`` built with ``options`` after
    learning ``train`` in chunks of 1,000 events (one more version at the end if asked)."""
    import torch

    torch.set_num_threads(threads)
    model, mapper = build(name, **options), SignalMapper()
    started = time.perf_counter()
    for start in range(0, len(train), 1000):
        model.learn(mapper.map(train[start:start + 1000]))
    if train_at_end and hasattr(model, "train"):
        model.train()
    lists = [normalised(r) for r in model.recommend(queries, 100)]
    return lists, time.perf_counter() - started


def scores(predictions, candidates: dict[str, list[dict]], weights: dict[str, float]
           ) -> tuple[float, float]:
    hr = mrr = 0.0
    for n, prediction in enumerate(predictions):
        ranked = [i for i, _ in mix({k: v[n] for k, v in candidates.items()}, weights, 20)]
        metrics = ranking_metrics(ranked, {prediction.target}, 20)
        hr, mrr = hr + metrics["HR"], mrr + metrics["MRR"]
    return hr / len(predictions), mrr / len(predictions)


_split: tuple = ()  # a settings process's (args, train events, queries), loaded once


def _load_split(args) -> None:
    global _split
    train, valid = validation_split(args)
    _split = (args, train, [p.query for p in session_queries(valid)])


def _run_setting(options: dict):
    args, train, queries = _split
    return candidate_lists(args.sequential, {**options, "device": args.device}, train, queries,
                           args.train_at_end, args.threads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_validation_options(parser)
    parser.add_argument("--sequential", default="gru4rec")
    parser.add_argument("--grid", default="", help='e.g. "hidden=100,200;epochs=10,20"')
    parser.add_argument("--fixed", default="", help='options every setting shares, e.g. '
                        '"retrain_every=1000000" (with --train-at-end: one version, at the end)')
    parser.add_argument("--device", default="cpu", help="where each setting trains (cpu, cuda)")
    parser.add_argument("--processes", type=int, default=1, help="settings run at once")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per process")
    parser.add_argument("--train-at-end", action="store_true",
                        help="train one more version on the whole training part first (a "
                             "trainer that caught up before the validation day)")
    args = parser.parse_args()
    fixed = parse_options(args.fixed, "--fixed")
    grid = [{**fixed, **options} for options in parse_grid(args.grid)]
    train, valid = validation_split(args)
    predictions = session_queries(valid)
    queries = [p.query for p in predictions]
    print(f"validation: {len(train)} train events, {len(predictions)} validation queries; "
          f"{len(grid)} settings on {args.device}", flush=True)
    session, seconds = candidate_lists("session", {}, train, queries, False, args.threads)
    hr, mrr = scores(predictions, {"session": session}, {"session": 1.0})
    print(f"session alone: HR@20 {hr:.4f} MRR@20 {mrr:.4f} ({seconds:.0f} s)", flush=True)
    context = multiprocessing.get_context("spawn")  # CUDA cannot follow a fork
    with context.Pool(min(args.processes, len(grid)), _load_split, (args,)) as pool:
        for options, (lists, seconds) in zip(grid, pool.imap(_run_setting, grid)):
            row = {"setting": options, "seconds": round(seconds)}
            candidates = {"session": session, args.sequential: lists}
            hr, mrr = scores(predictions, candidates, {args.sequential: 1.0})
            row["alone"] = [round(hr, 4), round(mrr, 4)]
            for weight in WEIGHTS:
                hr, mrr = scores(predictions, candidates,
                                 {"session": 1.0, args.sequential: weight})
                row[f"w{weight:g}"] = [round(hr, 4), round(mrr, 4)]
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
