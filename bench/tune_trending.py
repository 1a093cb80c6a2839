"""Choose trending's half-life on a validation split (never the test split).

Validation = the last ``--test-days`` of the training log (``load_split`` on the train file
alone). Each half-life is replayed as ``TrendingModel`` (the model the live worker writes)
with the session protocol and the prequential one, ranked by HR@20.
Usage: ``python bench/tune_trending.py --data ../shared/data/yoochoose-rsc15-100k/yoochoose-clicks-100k_train_full.txt``
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from online_models.registry import MODELS  # noqa: E402
from online_models.trending import TrendingModel  # noqa: E402
from bench.report import add_validation_options, validation_split  # noqa: E402
from replay.protocols import run  # noqa: E402

HALF_LIVES_S = (600.0, 3600.0, 6 * 3600.0, 86400.0, 3 * 86400.0, 7 * 86400.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_validation_options(parser)
    args = parser.parse_args()
    train, valid = validation_split(args)
    names = []
    for half_life in HALF_LIVES_S:
        MODELS[name := f"trending_{half_life:g}s"] = lambda h=half_life: TrendingModel(h)
        names.append(name)
    print(f"validation: {len(train)} train events, {len(valid)} validation events")
    for protocol in ("session", "prequential"):
        results = run(protocol, train, valid, names, progress=False)
        print(f"{protocol}: HR@20 by half-life")
        for hr, name in sorted(((r.metrics.get("HR@20", 0.0), r.name) for r in results
                                if r.name in names), reverse=True):
            print(f"  {hr:.4f}  {name}")


if __name__ == "__main__":
    main()
