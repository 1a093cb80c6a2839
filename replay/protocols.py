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

from infra.progress import progress as progress_bar
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


def _score(predictions: list[Prediction], recommended, ks: Sequence[int]):
    rows = []
    for prediction, rec in zip(predictions, recommended):
        row = {}
        for k in ks:
            for metric, value in ranking_metrics(rec.items, {prediction.target}, k).items():
                row[f"{metric}@{k}"] = value
        rows.append(row)
    return rows


class _Replay:
    """One model's run: test-then-train steps, with timings and everything metrics need."""

    def __init__(self, model: OnlineModel, ks: Sequence[int], chunk: int) -> None:
        self.model, self.ks, self.chunk = model, ks, chunk
        self.mapper = SignalMapper()
        self.learn_s = self.predict_s = 0.0
        self.learned = 0
        self.rows: list[dict[str, float]] = []
        self.lists: list[list[str]] = []
        self.positions: list[int] = []

    def predict(self, batch: list[Prediction]) -> None:
        if not batch:
            return
        start = time.perf_counter()
        recs = self.model.recommend([p.query for p in batch], max(self.ks))
        self.predict_s += time.perf_counter() - start
        self.rows += _score(batch, recs, self.ks)
        self.lists += [r.items for r in recs]
        self.positions += [p.position for p in batch]

    def learn(self, events: Sequence[Interaction]) -> None:
        start = time.perf_counter()
        for offset in range(0, len(events), self.chunk):
            self.model.learn(self.mapper.map(list(events[offset:offset + self.chunk])))
        self.learn_s += time.perf_counter() - start
        self.learned += len(events)


def _by_chunk(predictions: list[Prediction], size: int) -> dict[int, list[Prediction]]:
    buckets: dict[int, list[Prediction]] = defaultdict(list)
    for p in predictions:
        buckets[p.position // size].append(p)
    return buckets


def run(protocol: str, train: Sequence[Interaction], test: Sequence[Interaction],
        model_names: Sequence[str], ks: Sequence[int] = (10, 20), chunk: int = 1000,
        predict_chunk: int = 20_000, learn_during_test: bool = False, windows: int = 20,
        store_factory=None, progress: bool = True) -> list[ModelResult]:
    """Replay ``train``/``test`` through each named model; returns one result per model."""
    from online_models.registry import build

    if protocol not in ("session", "prequential"):
        raise ValueError(f"protocol must be 'session' or 'prequential', not {protocol!r}")
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
        replay = _Replay(model, ks, chunk)
        bar = progress_bar(len(train) + len(test), name, disable=not progress, leave=False)
        started = time.perf_counter()
        try:
            if protocol == "session":
                replay.learn(train)
                bar.update(len(train))
                stream, step = test, chunk if learn_during_test else predict_chunk
            else:  # prequential: one stream, every chunk predicted, then learned
                stream, step, learn_during_test = list(train) + list(test), chunk, True
            buckets = _by_chunk(session_queries(stream), step)
            for n, start in enumerate(range(0, len(stream), step)):
                replay.predict(buckets.get(n, []))
                if learn_during_test:
                    replay.learn(stream[start:start + step])
                bar.update(len(stream[start:start + step]))
        finally:
            bar.close()
            model.close()
        results.append(_result(name, replay, lists, windows, started))
    return results


def _result(name: str, replay: _Replay, lists: ListMetrics, windows: int,
            started: float) -> ModelResult:
    result = ModelResult(name)
    rows = replay.rows
    if rows:
        for key in rows[0]:
            result.metrics[key] = float(np.mean([r[key] for r in rows]))
    result.metrics.update(lists.summarise(replay.lists))
    result.metrics["predictions"] = len(rows)
    result.metrics["events_per_s"] = replay.learned / replay.learn_s if replay.learn_s else 0.0
    result.metrics["predictions_per_s"] = len(rows) / replay.predict_s if replay.predict_s else 0.0
    result.metrics["seconds"] = time.perf_counter() - started
    result.over_time = _over_time(rows, replay.positions, windows, max(replay.ks))
    result.popularity_deciles = lists.popularity_deciles(replay.lists)
    return result


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
