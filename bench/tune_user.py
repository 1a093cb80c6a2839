"""Choose the user-protocol blend's weights on a validation split, never on the scored part.

The validation split is the log's first ``--share`` (by time); the user protocol runs over it
(warm-up excluded), each part of the blend proposing its 100 best candidates per prediction,
and every weight combination of the grid is scored on those same lists (HR@10). The full
protocol (``streamrec replay --protocol user``) then reports every positive after the warm-up;
``--warmup 0.6`` scores only positives after the validation split (the part tuning never saw).
Parts: ``session``, ``history``, ``als``, ``popularity`` and ``content`` (which learns the item
descriptions beside the log, in time order); ``--als-variants`` and
``--history-variants`` also score variants of those parts (each learned afresh).

    python bench/tune_user.py --data ../shared/data/movielens-latest-small
"""

from __future__ import annotations

import argparse
import itertools
import json
import pickle
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from online_models.mixture import context_bucket, mix, normalised  # noqa: E402
from online_models.als import OnlineALS  # noqa: E402
from online_models.registry import build, user_knn  # noqa: E402
from online_models.signals import SignalMapper  # noqa: E402
from bench.report import first_share  # noqa: E402
from replay.protocols import ItemTimeline, by_chunk, user_queries  # noqa: E402

PARTS = ("session", "history", "als", "popularity", "content", "two_tower")
#: measured before (validation HR@10): the best of history (0–1.5) × als (0–2) × popularity
#: (0, 0.05) was history 1, als 0.75, popularity 0.05 (0.1006); with content, history
#: (0.75–1.25) × als (0.5–1) × popularity (0, 0.05) × content (0–0.35): history 0.75, als 0.5,
#: popularity 0.05, content 0.35 (0.1044, the grid's edge); then content up to 1: content 1,
#: als 0.75 (0.1091, the edge again); the grid now refines around it
#: the blend's weights for every context (the registry's ``user_blend``)
GLOBAL = {"session": 1.0, "history": 0.75, "als": 0.5, "popularity": 0.05, "content": 0.35}
#: per context bucket (``--by-context``), around the global weights
CONTEXT_GRID = {"history": (0.25, 0.75, 1.5), "als": (0.25, 0.5, 1.0),
                "popularity": (0.0, 0.05, 0.2), "content": (0.75, 1.5, 2.5)}
GRID = {"history": (0.75, 1.0),
        "als": (0.75, 1.0),
        "popularity": (0.0, 0.05),
        "content": (1.0, 1.5, 2.0),
        "two_tower": (0.0, 0.5, 1.0, 2.0)}
#: variants of the ALS part (``--als-variants``), each learned afresh; measured alone on the
#: validation split (HR@10): λ=1, w0=0.05, α=4, k=64, no recency 0.038; λ=10 0.051; w0=0.2
#: 0.048; recency 0.8 0.058; α=1 0.057; then with α=1, recency 0.8: λ=10 w0=0.2 0.068,
#: λ=3 w0=0.1 0.078, λ=10 w0=0.5 0.078, λ=10 w0=1 0.077, λ=20 w0=0.5 0.062; λ=5 w0=0.2 with
#: recency 0.6 / 0.7 / 0.8: 0.080 / 0.081 / 0.081; k=128 0.083 (the registry's default)
ALS_VARIANTS = [dict(factors=64, regularisation=5.0, unobserved_weight=0.2, recency=0.7),
                dict(factors=128, regularisation=5.0, unobserved_weight=0.2, recency=0.7),
                dict(factors=128, regularisation=3.0, unobserved_weight=0.15, recency=0.7)]
#: variants of the two-tower model (``--two-tower-variants``), alone, each trained afresh
TWO_TOWER_VARIANTS = [dict(), dict(epochs=8), dict(dim=128), dict(temperature=0.05),
                      dict(id_dropout=0.0), dict(retrain_every=5_000), dict(history=50)]
#: variants of the history part (CooccurrenceModel, scope="user"), each learned afresh
HISTORY_VARIANTS = [dict(alpha=0.5, recency=0.9, history=50),
                    dict(alpha=0.5, recency=0.8, history=50),
                    dict(alpha=0.65, recency=0.9, history=50),
                    dict(alpha=0.8, recency=0.9, history=50)]
# measured earlier (validation HR@10 of the best mix): recency 0.9 with history 200: 0.0945


def candidate_lists(events, chunk: int, models: dict, items=()) -> tuple[list, dict[str, list]]:
    """Predictions over ``events`` and, per model, each prediction's normalised candidates
    (item descriptions ``items`` learned in time order, as the replay does)."""
    preds = user_queries(events)
    mapper = SignalMapper()
    lists: dict[str, list[dict[str, float]]] = {name: [] for name in models}
    buckets = by_chunk(preds, chunk)
    timeline = ItemTimeline(items)
    for n, start in enumerate(range(0, len(events), chunk)):
        described = timeline.until(events[start].timestamp)
        for model in models.values():
            model.learn_items(described)
        batch = buckets.get(n, [])
        if batch:
            for name, model in models.items():
                lists[name] += map(normalised, model.recommend([p.query for p in batch], 100))
        signals = mapper.map(list(events[start:start + chunk]))
        for model in models.values():
            model.learn(signals)
    return preds, lists


def hit_rate(preds, lists, weights: dict[str, float], k: int = 10, rows=None) -> float:
    """HR@k of the mixture with ``weights`` (what ``MixtureModel`` would rank) on ``lists``
    (over the predictions ``rows``, default all)."""
    rows = range(len(preds)) if rows is None else rows
    hits = 0
    for n in rows:
        top = mix({name: lists[name][n] for name in weights if weights[name]}, weights, k)
        hits += any(item == preds[n].target for item, _ in top)
    return hits / max(len(rows), 1)


def context_buckets(events, preds, chunk: int) -> list[int]:
    """Each prediction's context bucket (:func:`online_models.mixture.context_bucket`): the
    user's events learned before its chunk, as the model counts them."""
    counts: dict[str, int] = {}
    known_at: list[int] = []
    by_chunk_start: dict[int, dict[str, int]] = {}
    for start in range(0, len(events), chunk):
        by_chunk_start[start] = dict(counts)
        for e in events[start:start + chunk]:
            counts[e.user_id] = counts.get(e.user_id, 0) + 1
    for p in preds:
        known_at.append(by_chunk_start[p.position // chunk * chunk].get(p.query.user_id, 0))
    return [context_bucket(n) for n in known_at]


def tune_by_context(preds, lists, buckets: list[int]) -> dict[int, dict]:
    """Per context bucket, the grid's best weights on that bucket's predictions."""
    best = {}
    for bucket in sorted(set(buckets)):
        rows = [n for n, b in enumerate(buckets) if b == bucket]
        scored = []
        for combo in itertools.product(*(CONTEXT_GRID[part] for part in CONTEXT_GRID)):
            weights = {"session": 1.0, **dict(zip(CONTEXT_GRID, combo))}
            scored.append((hit_rate(preds, lists, weights, rows=rows), weights))
        hr, weights = max(scored, key=lambda s: s[0])
        best[bucket] = {"predictions": len(rows), "HR@10": hr, "weights": weights,
                        "global_weights_HR@10": hit_rate(preds, lists, GLOBAL, rows=rows)}
        print(json.dumps({"bucket": bucket, **best[bucket]}), flush=True)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/movielens-latest-small")
    parser.add_argument("--format", default="movielens")
    parser.add_argument("--share", type=float, default=0.6, help="validation: the first share")
    parser.add_argument("--chunk", type=int, default=100)
    parser.add_argument("--als-variants", action="store_true",
                        help="also try the ALS part's variants alone (ALS_VARIANTS)")
    parser.add_argument("--history-variants", action="store_true",
                        help="also try the history part's variants (HISTORY_VARIANTS)")
    parser.add_argument("--two-tower-variants", action="store_true",
                        help="score variants of the two-tower model alone (TWO_TOWER_VARIANTS) "
                             "and stop")
    parser.add_argument("--by-context", action="store_true",
                        help="also choose weights per context bucket (the user's history "
                             "length: user_blend_ctx)")
    parser.add_argument("--cache", default="",
                        help="pickle the candidate lists here, and read them back if there")
    args = parser.parse_args()
    validation, items = first_share(args.data, args.format, args.share)
    started = time.perf_counter()
    if args.two_tower_variants:
        from online_models.two_tower import TwoTowerModel

        for variant in TWO_TOWER_VARIANTS:
            tt_preds, alt = candidate_lists(validation, args.chunk,
                                            {"tt": TwoTowerModel(**variant)}, items)
            print(json.dumps({"two_tower_variant": variant,
                              "alone": hit_rate(tt_preds, alt, {"tt": 1.0})}), flush=True)
        return
    if args.cache and Path(args.cache).exists():
        preds, lists = pickle.loads(Path(args.cache).read_bytes())
    else:
        preds, lists = candidate_lists(validation, args.chunk,
                                       {name: build(name) for name in PARTS}, items)
        if args.cache:
            Path(args.cache).write_bytes(pickle.dumps((preds, lists)))
    if args.by_context:
        tune_by_context(preds, lists, context_buckets(validation, preds, args.chunk))
    singles = {name: hit_rate(preds, lists, {name: 1.0}) for name in PARTS}
    rows = []
    for wh, wa, wp, wc, wt in itertools.product(GRID["history"], GRID["als"],
                                                GRID["popularity"], GRID["content"],
                                                GRID["two_tower"]):
        weights = {"session": 1.0, "history": wh, "als": wa, "popularity": wp, "content": wc,
                   "two_tower": wt}
        rows.append({"history": "registry", "weights": weights,
                     "HR@10": hit_rate(preds, lists, weights)})
    if args.als_variants:
        for variant in ALS_VARIANTS:
            _, alt = candidate_lists(validation, args.chunk, {"alt": OnlineALS(**variant)},
                                     items)
            print(json.dumps({"als_variant": variant,
                              "alone": hit_rate(preds, {"als": alt["alt"]}, {"als": 1.0})}),
                  flush=True)
    if args.history_variants:
        for variant in HISTORY_VARIANTS:
            _, alt = candidate_lists(validation, args.chunk,
                                     {"alt": user_knn(query="history", **variant)}, items)
            lists["history"] = alt["alt"]
            singles[json.dumps(variant)] = hit_rate(preds, lists, {"history": 1.0})
            rows += [{"history": variant, "weights": {"session": 1.0, "history": wh},
                      "HR@10": hit_rate(preds, lists, {"session": 1.0, "history": wh})}
                     for wh in GRID["history"]]  # without ALS: the history part alone
            print(json.dumps({"variant": variant, "alone": singles[json.dumps(variant)],
                              "best_mix": max(r["HR@10"] for r in rows
                                              if r["history"] == variant)}), flush=True)
    best = max(rows, key=lambda r: r["HR@10"])
    print(json.dumps({"validation_events": len(validation), "predictions": len(preds),
                      "single_parts_HR@10": singles, "best": best,
                      "seconds": round(time.perf_counter() - started, 1)}, indent=1))
    for row in sorted(rows, key=lambda r: -r["HR@10"])[:8]:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
