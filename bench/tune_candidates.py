"""Choose how many candidates each source offers a list (``candidates_per_source``) on a
validation split (never the test split), with the live pipeline (blend and re-rank).

Session protocol (YooChoose, the default): the live ``blend``; validation = the last
``--test-days`` of the training log. User protocol (``--protocol user``, MovieLens): the live
``blend_user``; validation = the log's first ``--share`` by time. Prints each setting's ranking
metrics and its beyond-accuracy ones (head share, exposure Gini, novelty). Usage::

    python bench/tune_candidates.py --counts 100,50,30 \\
        --data ../shared/data/yoochoose-rsc15-100k/yoochoose-clicks-100k_train_full.txt
    python bench/tune_candidates.py --protocol user --data ../shared/data/movielens-latest-small \\
        --format movielens --counts 100,50
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import add_protocol_options, protocol_split  # noqa: E402
from online_models.registry import MODELS  # noqa: E402
from replay.protocols import run  # noqa: E402

SHOWN = ("HR@10", "NDCG@10", "HR@20", "MRR@20", "HR@10_cold", "head_share", "exposure_gini",
         "novelty", "coverage")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_protocol_options(parser)
    parser.add_argument("--counts", default="100,50", help="candidates per source to try")
    args = parser.parse_args()
    user = args.protocol == "user"
    train, valid, items = protocol_split(args)
    live = MODELS["blend_user" if user else "blend"]
    names = {}
    for count in (int(c) for c in args.counts.split(",")):
        def factory(count=count):
            model = live()
            model.recommender.config.candidates_per_source = count
            return model
        MODELS[f"candidates_{count}"] = factory
        names[f"candidates_{count}"] = count
    results = run(args.protocol, train, valid, list(names), progress=False, items=items,
                  **({"chunk": 100, "ks": (10,)} if user else {}))
    print(f"validation: {len(train)} train events, {len(valid)} validation events")
    for r in results:
        if r.name in names:
            print(f"candidates per source {names[r.name]}: " + ", ".join(
                f"{key} {r.metrics[key]:.4f}" for key in SHOWN if key in r.metrics))


if __name__ == "__main__":
    main()
