"""Replay protocols: the live model code, fed from a log, scored test-then-train.

* ``session``: learn the training events; then, for every test session and every event in it
  but the last, rank items for the next one given the session so far (the session-based
  recommendation literature's protocol: all items ranked, items already in the session not
  excluded). With ``learn_during_test`` the test events are also learned, chunk by chunk,
  after they have been predicted.
* ``prequential``: one stream in time order, processed in chunks; each positive event of a
  session that already has an earlier event is predicted (query = the session so far) with the
  state learned before its chunk, then the chunk is learned (test-then-train).

Both are deterministic for a seed. Chunked test-then-train is what a live worker does with
batches; ``chunk`` sets the batch size.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from tqdm import tqdm

from online_models.base import OnlineModel, Query
from online_models.signals import SignalMapper
from replay.metrics import ACCURACY, ListMetrics, ranking_metrics
from schemas.events import Interaction


@dataclass
class Prediction:
    query: Query
    target: str
    position: int  # index in the replayed stream (for metrics over time)


@dataclass
class ModelResult:
    name: str
    metrics: dict[str, float] = field(default_factory=dict)
    over_time: list[dict[str, float]] = field(default_factory=list)
    popularity_deciles: list[float] = field(default_factory=list)


def session_queries(events: Sequence[Interaction], offset: int = 0) -> list[Prediction]:
    """A prediction for every event after the first of its session (events in time order)."""
    prefix: dict[str, list[str]] = defaultdict(list)
    out = []
    for n, e in enumerate(events):
        session = e.session_id or e.user_id
        if prefix[session]:
            out.append(Prediction(Query(e.user_id, tuple(prefix[session])), e.item_id, offset + n))
        prefix[session].append(e.item_id)
    return out


def _learn(model: OnlineModel, mapper: SignalMapper, events: Sequence[Interaction],
           chunk: int) -> None:
    for start in range(0, len(events), chunk):
        model.learn(mapper.map(list(events[start:start + chunk])))


def _score(predictions: list[Prediction], recommended, ks: Sequence[int]):
    rows = []
    for prediction, rec in zip(predictions, recommended):
        row = {}
        for k in ks:
            for metric, value in ranking_metrics(rec.items, {prediction.target}, k).items():
                row[f"{metric}@{k}"] = value
        rows.append(row)
    return rows


def run(protocol: str, train: Sequence[Interaction], test: Sequence[Interaction],
        model_names: Sequence[str], ks: Sequence[int] = (10, 20), chunk: int = 1000,
        predict_chunk: int = 5000, learn_during_test: bool = False, windows: int = 20,
        store_factory=None, progress: bool = True) -> list[ModelResult]:
    """Replay ``train``/``test`` through each named model; returns one result per model."""
    from online_models.registry import build

    k_max = max(ks)
    sessions_train: dict[str, list[str]] = defaultdict(list)
    for e in train:
        sessions_train[e.session_id or e.user_id].append(e.item_id)
    catalogue = {e.item_id for e in train} | {e.item_id for e in test}
    lists = ListMetrics(sessions_train.values(), catalogue)
    results = []
    for name in model_names:
        model = build(name)
        if store_factory is not None:
            model.bind(store_factory(name))
        mapper = SignalMapper()
        bar = tqdm(total=len(train) + len(test), desc=name, unit="ev", disable=not progress,
                   leave=False)
        started = time.perf_counter()
        learn_s = predict_s = 0.0
        learned = 0
        rows: list[dict[str, float]] = []
        recommended_lists: list[list[str]] = []
        positions: list[int] = []
        if protocol == "session":
            t0 = time.perf_counter()
            _learn(model, mapper, train, chunk)
            learn_s += time.perf_counter() - t0
            learned += len(train)
            bar.update(len(train))
            predictions = session_queries(test)
            step = chunk if learn_during_test else predict_chunk
            for start in range(0, len(test), step):
                stop = start + step
                batch = [p for p in predictions if start <= p.position < stop]
                t0 = time.perf_counter()
                recs = model.recommend([p.query for p in batch], k_max)
                predict_s += time.perf_counter() - t0
                rows += _score(batch, recs, ks)
                recommended_lists += [r.items for r in recs]
                positions += [p.position for p in batch]
                if learn_during_test:
                    t0 = time.perf_counter()
                    _learn(model, mapper, test[start:stop], chunk)
                    learn_s += time.perf_counter() - t0
                    learned += len(test[start:stop])
                bar.update(len(test[start:stop]))
        elif protocol == "prequential":
            stream = list(train) + list(test)
            predictions = session_queries(stream)
            by_chunk: dict[int, list[Prediction]] = defaultdict(list)
            for p in predictions:
                by_chunk[p.position // chunk].append(p)
            for n, start in enumerate(range(0, len(stream), chunk)):
                part = stream[start:start + chunk]
                batch = by_chunk.get(n, [])
                if batch:
                    t0 = time.perf_counter()
                    recs = model.recommend([p.query for p in batch], k_max)
                    predict_s += time.perf_counter() - t0
                    rows += _score(batch, recs, ks)
                    recommended_lists += [r.items for r in recs]
                    positions += [p.position for p in batch]
                t0 = time.perf_counter()
                model.learn(mapper.map(part))
                learn_s += time.perf_counter() - t0
                learned += len(part)
                bar.update(len(part))
        else:
            raise ValueError(f"protocol must be 'session' or 'prequential', not {protocol!r}")
        bar.close()
        result = ModelResult(name)
        if rows:
            for key in rows[0]:
                result.metrics[key] = float(np.mean([r[key] for r in rows]))
        result.metrics.update(lists.summarise(recommended_lists))
        result.metrics["predictions"] = len(rows)
        result.metrics["events_per_s"] = learned / learn_s if learn_s else 0.0
        result.metrics["predictions_per_s"] = len(rows) / predict_s if predict_s else 0.0
        result.metrics["seconds"] = time.perf_counter() - started
        result.over_time = _over_time(rows, positions, windows, k_max)
        result.popularity_deciles = lists.popularity_deciles(recommended_lists)
        results.append(result)
    return results


def _over_time(rows, positions, windows: int, k: int) -> list[dict[str, float]]:
    if not rows:
        return []
    order = np.argsort(positions, kind="stable")
    out = []
    for part in np.array_split(order, min(windows, len(order))):
        out.append({"position": int(positions[part[-1]]),
                    **{f"{m}@{k}": float(np.mean([rows[i][f"{m}@{k}"] for i in part]))
                       for m in ("HR", "MRR")}})
    return out


__all__ = ["ACCURACY", "ModelResult", "run", "session_queries"]
