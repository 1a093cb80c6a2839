"""Choose the blend's source weights on a validation split (never the test split).

Validation = the last ``--test-days`` of the training log (``load_split`` on the train file
alone); each candidate weighting is replayed with the session protocol and ranked by HR@20.
Usage: ``python bench/tune_blend.py --data ../shared/data/yoochoose-rsc15-100k/yoochoose-clicks-100k_train_full.txt``
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from online_models.registry import MODELS  # noqa: E402
from bench.report import add_validation_options, validation_split  # noqa: E402
from replay.protocols import run  # noqa: E402
from serving.blended import BlendedModel  # noqa: E402
from serving.rerank import RerankPolicy  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_validation_options(parser)
    args = parser.parse_args()
    train, valid = validation_split(args)
    grid = {}
    for cooc, ann, trend, fresh in itertools.product((0.0, 0.1), (0.0, 0.02), (0.0, 0.01),
                                                     (0.0, 0.05)):
        name = f"w_c{cooc}_a{ann}_t{trend}_f{fresh}"
        weights = {"session": 1.0, "cooc": cooc, "ann": ann, "trending": trend}

        def factory(weights=weights, fresh=fresh):
            model = BlendedModel(rerank=False)
            model.recommender.config.policy = RerankPolicy(source_weights=weights,
                                                           freshness_weight=fresh)
            return model
        MODELS[name] = factory
        grid[name] = {**weights, "freshness": fresh}
    results = run("session", train, valid, list(grid), progress=False)
    rows = sorted(((r.metrics.get("HR@20", 0.0), r.name) for r in results if r.name in grid),
                  reverse=True)
    print(f"validation: {len(train)} train events, {len(valid)} validation events")
    for hr, name in rows:
        print(f"{hr:.4f}  {grid[name]}")


if __name__ == "__main__":
    main()
