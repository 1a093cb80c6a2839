"""Replay protocols: the live model code, fed from a log, scored test-then-train.

* ``session``: learn the training events; then, for every test session and every event in it
  but the last, rank items for the next one given the session so far (the session-based
  recommendation literature's protocol: all items ranked, items already in the session not
  excluded). With ``learn_during_test`` the test events are also learned, chunk by chunk,
  after they have been predicted.
* ``prequential``: one stream in time order, processed in chunks; each positive event of a
  session that already has an earlier event is predicted (query = the session so far) with the
  state learned before its chunk, then the chunk is learned (test-then-train).
* ``user`` (returning users, e.g. MovieLens): one stream in time order (stable on ties); every
  positive (:data:`USER_POSITIVES`: a rating ≥ 4 is a ``like``; in a log without such events,
  every engagement) is predicted before it is learned: the user's items are ranked with the
  state learned before its chunk, the query holding the user's last ``history`` positives and
  excluding every item the user touched earlier (any event). The first ``warmup`` share of
  positives is replayed, not scored. ``cold`` metrics score the targets whose item had fewer
  than :data:`COLD_BELOW` earlier interactions.

Item descriptions (``items``: e.g. MovieLens genres, titles and tags) reach a model in time
order, each before the first chunk predicted at or after its timestamp and never earlier.

All are deterministic for a seed. Chunked test-then-train is what a live worker does with
batches; ``chunk`` sets the batch size.
"""

from __future__ import annotations

import bisect
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
from schemas.items import ItemRecord


#: Event types that count as positives in the user protocol (a rating ≥ 4 loads as ``like``).
USER_POSITIVES = frozenset({"like", "add_to_cart", "purchase"})
#: Targets whose item had fewer earlier interactions than this are "cold".
COLD_BELOW = 5


@dataclass
class Prediction:
    query: Query
    target: str
    position: int  # index in the replayed stream (for metrics over time)
    cold: bool = False  # the user protocol's cold subset


def user_queries(events: Sequence[Interaction], history: int = 20, warmup: float = 0.1
                 ) -> list[Prediction]:
    """The user protocol's predictions over ``events`` (time order), warm-up excluded."""
    positive_types = USER_POSITIVES & {e.type for e in events}
    if not positive_types:  # a click log: every engagement is a positive
        from schemas.events import ENGAGEMENT_TYPES
        positive_types = ENGAGEMENT_TYPES
    touched: dict[str, set[str]] = defaultdict(set)
    liked: dict[str, list[str]] = defaultdict(list)
    item_count: dict[str, int] = defaultdict(int)
    out = []
    for n, e in enumerate(events):
        if e.type in positive_types and e.item_id not in touched[e.user_id]:
            out.append(Prediction(Query(e.user_id, tuple(liked[e.user_id][-history:]),
                                        frozenset(touched[e.user_id])),
                                  e.item_id, n, item_count[e.item_id] < COLD_BELOW))
        if e.type in positive_types:
            liked[e.user_id].append(e.item_id)
        touched[e.user_id].add(e.item_id)
        item_count[e.item_id] += 1
    return out[int(len(out) * warmup):]


@dataclass
class ModelResult:
    name: str
    metrics: dict[str, float] = field(default_factory=dict)
    over_time: list[dict[str, float]] = field(default_factory=list)
    popularity_deciles: list[float] = field(default_factory=list)
    #: each ranking metric per scored query, in query order (the same for every model of a
    #: run, so models can be compared query by query); and which queries were cold
    per_query: dict[str, np.ndarray] = field(default_factory=dict)
    cold: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))


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
        self.cold: list[bool] = []

    def predict(self, batch: list[Prediction]) -> None:
        if not batch:
            return
        start = time.perf_counter()
        recs = self.model.recommend([p.query for p in batch], max(self.ks))
        self.predict_s += time.perf_counter() - start
        self.rows += _score(batch, recs, self.ks)
        self.lists += [r.items for r in recs]
        self.positions += [p.position for p in batch]
        self.cold += [p.cold for p in batch]

    def learn_items(self, records: list[ItemRecord]) -> None:
        if records:
            start = time.perf_counter()
            self.model.learn_items(records)
            self.learn_s += time.perf_counter() - start

    def learn(self, events: Sequence[Interaction]) -> None:
        start = time.perf_counter()
        for offset in range(0, len(events), self.chunk):
            self.model.learn(self.mapper.map(list(events[offset:offset + self.chunk])))
        self.learn_s += time.perf_counter() - start
        self.learned += len(events)


class ItemTimeline:
    """Item descriptions in time order, handed out up to a moment, each once."""

    def __init__(self, records: Sequence[ItemRecord]) -> None:
        self.records = sorted(records, key=lambda r: r.timestamp)
        self.times = [r.timestamp for r in self.records]
        self.handed = 0

    def until(self, moment: float) -> list[ItemRecord]:
        """The descriptions set at or before ``moment`` not handed out yet."""
        end = bisect.bisect_right(self.times, moment)
        out, self.handed = self.records[self.handed:end], max(self.handed, end)
        return out


def by_chunk(predictions: list[Prediction], size: int) -> dict[int, list[Prediction]]:
    buckets: dict[int, list[Prediction]] = defaultdict(list)
    for p in predictions:
        buckets[p.position // size].append(p)
    return buckets


PROTOCOLS = ("session", "prequential", "user")


def run(protocol: str, train: Sequence[Interaction], test: Sequence[Interaction],
        model_names: Sequence[str], ks: Sequence[int] = (10, 20), chunk: int = 1000,
        predict_chunk: int = 20_000, learn_during_test: bool = False, windows: int = 20,
        store_factory=None, progress: bool = True, warmup: float = 0.1,
        items: Sequence[ItemRecord] = ()) -> list[ModelResult]:
    """Replay ``train``/``test`` through each named model (with item descriptions ``items``);
    returns one result per model."""
    from online_models.registry import build

    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}, not {protocol!r}")
    sessions_train: dict[str, list[str]] = defaultdict(list)
    for e in train:
        sessions_train[e.session_id or e.user_id].append(e.item_id)
    catalogue = {e.item_id for e in train} | {e.item_id for e in test}
    lists = ListMetrics(sessions_train.values(), catalogue)
    if protocol == "session":
        stream, step = test, chunk if learn_during_test else predict_chunk
    else:  # prequential and user: one stream, every chunk predicted, then learned
        stream, step, learn_during_test = list(train) + list(test), chunk, True
    predictions = (user_queries(stream, warmup=warmup) if protocol == "user"
                   else session_queries(stream))
    buckets = by_chunk(predictions, step)  # the same for every model
    results = []
    for name in model_names:
        model = build(name)
        if store_factory is not None:
            model.bind(store_factory(name))
        replay = _Replay(model, ks, chunk)
        timeline = ItemTimeline(items)
        bar = progress_bar(len(train) + len(test), name, disable=not progress, leave=False)
        started = time.perf_counter()
        try:
            if protocol == "session":
                if train:
                    replay.learn_items(timeline.until(train[-1].timestamp))
                replay.learn(train)
                bar.update(len(train))
            for n, start in enumerate(range(0, len(stream), step)):
                replay.learn_items(timeline.until(stream[start].timestamp))
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
    result.metrics.update(_means(rows))
    cold = [row for row, is_cold in zip(rows, replay.cold) if is_cold]
    if cold:
        result.metrics.update(_means(cold, suffix="_cold"))
        result.metrics["predictions_cold"] = len(cold)
    result.metrics.update(lists.summarise(replay.lists))
    result.metrics["predictions"] = len(rows)
    result.metrics["events_per_s"] = replay.learned / replay.learn_s if replay.learn_s else 0.0
    result.metrics["predictions_per_s"] = len(rows) / replay.predict_s if replay.predict_s else 0.0
    result.metrics["seconds"] = time.perf_counter() - started
    result.per_query = {key: np.fromiter((row[key] for row in rows), float, len(rows))
                        for key in (rows[0] if rows else ())}
    result.cold = np.array(replay.cold, bool)
    result.over_time = _over_time(result.per_query, replay.positions, windows, max(replay.ks))
    result.popularity_deciles = lists.popularity_deciles(replay.lists)
    return result


def _means(rows: list[dict[str, float]], suffix: str = "") -> dict[str, float]:
    """Each metric's mean over ``rows`` (keyed ``metric + suffix``)."""
    return {f"{key}{suffix}": float(np.mean([r[key] for r in rows])) for key in rows[0]} \
        if rows else {}


def _over_time(per_query: dict[str, np.ndarray], positions, windows: int,
               k: int) -> list[dict[str, float]]:
    """HR@k and MRR@k per window of queries in log order, each with the half-width of its
    95 % normal interval (``HR@k_ci``)."""
    if not per_query:
        return []
    order = np.argsort(positions, kind="stable")
    out = []
    for part in np.array_split(order, min(windows, len(order))):
        window = {"position": int(positions[part[-1]]), "queries": len(part)}
        for metric in (f"HR@{k}", f"MRR@{k}"):
            values = per_query[metric][part]
            window[metric] = float(values.mean())
            window[f"{metric}_ci"] = float(1.96 * values.std() / np.sqrt(len(values)))
        out.append(window)
    return out


__all__ = ["ACCURACY", "PROTOCOLS", "ModelResult", "run", "session_queries", "user_queries"]
