"""Choose the blend's source weights on a validation split (never the test split).

Session protocol (YooChoose, the default): validation = the last ``--test-days`` of the
training log (``load_split`` on the train file alone); a grid of the short-term sources'
weights, ranked by HR@20. User protocol (``--protocol user``, MovieLens): validation = the
log's first ``--share`` by time, replayed through the pipeline with the returning users'
sources (``blend_user_raw``), ranked by HR@10. ``--grid "ann_two_tower=0,0.5,1;als=1"`` (the
tuning benches' syntax: ``bench.report.parse_grid``) tries those weights, the others as live
(``serving.rerank.SOURCE_WEIGHTS``). Usage::

    python bench/tune_blend.py --data ../shared/data/yoochoose-rsc15-100k/yoochoose-clicks-100k_train_full.txt
    python bench/tune_blend.py --protocol user --data ../shared/data/movielens-latest-small \\
        --format movielens --grid "ann_two_tower=0.5,1;content=0.1,1.5"
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from online_models.registry import MODELS  # noqa: E402
from bench.report import add_protocol_options, parse_grid, protocol_split  # noqa: E402
from replay.protocols import run  # noqa: E402
from serving.blended import BlendedModel  # noqa: E402
from serving.rerank import SOURCE_WEIGHTS, RerankPolicy  # noqa: E402

#: The session protocol's default grid: the short-term sources and the freshness boost.
SESSION_GRID = "cooc=0,0.1;ann=0,0.02;trending=0,0.01;freshness=0,0.05"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_protocol_options(parser)
    parser.add_argument("--grid", default="", help="weights to try (default, session: "
                        f"{SESSION_GRID!r}; user: the live weights alone)")
    args = parser.parse_args()
    user = args.protocol == "user"
    train, valid, items = protocol_split(args)
    base = SOURCE_WEIGHTS if user else {"session": 1.0, "cooc": 0.0, "ann": 0.0, "trending": 0.0}
    grid = {}
    for n, setting in enumerate(parse_grid(args.grid or ("" if user else SESSION_GRID))):
        fresh = setting.pop("freshness", 0.0)
        weights = {**base, **setting}
        name = f"tune_blend_{n}"

        def factory(weights=weights, fresh=fresh):
            return BlendedModel(rerank=False, long_term=user, policy=RerankPolicy(
                source_weights=weights, freshness_weight=fresh))
        MODELS[name] = factory
        grid[name] = {**setting, "freshness": fresh}
    metric = "HR@10" if user else "HR@20"
    results = run(args.protocol, train, valid, list(grid), progress=False, items=items,
                  **({"chunk": 100, "ks": (10,)} if user else {}))
    rows = sorted(((r.metrics.get(metric, 0.0), r.name) for r in results if r.name in grid),
                  reverse=True)
    print(f"validation: {len(train)} train events, {len(valid)} validation events")
    for score, name in rows:
        print(f"{metric} {score:.4f}  {grid[name]}")


if __name__ == "__main__":
    main()
