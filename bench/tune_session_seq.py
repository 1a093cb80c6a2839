"""Choose the weight of the sequential model (``gru4rec``) beside ``session`` on a validation
split (never the test split): the last ``--test-days`` of the training log.

Both models learn the validation split's training part once; every weighting then mixes the
same per-part candidate lists (``online_models.mixture.mix``, scores divided by each part's
best), so trying a weight costs no retraining. Prints HR@20 and MRR@20 per weight.
Usage: ``python bench/tune_session_seq.py --data ../shared/data/yoochoose-rsc15-100k/yoochoose-clicks-100k_train_full.txt``
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from online_models.mixture import mix, normalised  # noqa: E402
from online_models.registry import build  # noqa: E402
from online_models.signals import SignalMapper  # noqa: E402
from bench.report import add_validation_options, validation_split  # noqa: E402
from replay.metrics import ranking_metrics  # noqa: E402
from replay.protocols import session_queries  # noqa: E402

WEIGHTS = (0.0, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_validation_options(parser)
    parser.add_argument("--sequential", default="gru4rec")
    parser.add_argument("--hidden", type=int, default=None, help="GRU units (default: the "
                        "model's, the authors' 480)")
    parser.add_argument("--train-at-end", action="store_true",
                        help="train one more version on the whole training part first (a "
                             "trainer that caught up before the validation day)")
    args = parser.parse_args()
    train, valid = validation_split(args)
    predictions = session_queries(valid)
    queries = [p.query for p in predictions]
    candidates = {}
    for name in ("session", args.sequential):
        model, mapper = build(name), SignalMapper()
        if name != "session" and args.hidden:
            model.hidden = args.hidden
        started = time.perf_counter()
        for start in range(0, len(train), 1000):
            model.learn(mapper.map(train[start:start + 1000]))
        if name != "session" and args.train_at_end:
            model.train()
        candidates[name] = [normalised(r) for r in model.recommend(queries, 100)]
        print(f"{name}: learned and recommended in {time.perf_counter() - started:.0f} s",
              flush=True)
    print(f"validation: {len(train)} train events, {len(predictions)} validation queries")
    print("weight of", args.sequential, "beside session 1.0 | HR@20 | MRR@20")
    for weight in (*WEIGHTS, float("inf")):
        weights = ({args.sequential: 1.0} if weight == float("inf")
                   else {"session": 1.0, args.sequential: weight})
        hr = mrr = 0.0
        for n, prediction in enumerate(predictions):
            ranked = [i for i, _ in mix({k: v[n] for k, v in candidates.items()}, weights, 20)]
            metrics = ranking_metrics(ranked, {prediction.target}, 20)
            hr, mrr = hr + metrics["HR"], mrr + metrics["MRR"]
        label = "alone" if weight == float("inf") else f"{weight:g}"
        print(f"{label:>6} | {hr / len(predictions):.4f} | {mrr / len(predictions):.4f}")


if __name__ == "__main__":
    main()
