"""A weighted mixture of models: each part proposes candidates, scores are normalised per query
(divided by the part's best) and summed with the part's weight.

For returning users it mixes what the recent session says (``session``) with what the user's
long history says (``history``) and what everyone likes (``popularity``); weights are chosen
on a validation split carved from the log's earlier part (``bench/tune_user.py``), never on
the scored part. Every part learns from the same batches, in its own store namespace.

Example
-------
>>> from online_models.popularity import PopularityModel
>>> model = MixtureModel({"a": (PopularityModel, 1.0), "b": (PopularityModel, 0.5)})
>>> sorted(model.parts)
['a', 'b']
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from online_models.base import LearnReport, OnlineModel, Query, Recommendations
from online_models.signals import SignalBatch
from online_models.store import StateStore


class CompositeModel(OnlineModel):
    """A model made of named parts: each part learns every batch in its own store namespace
    (``<name>-<part>``); subclasses decide how the parts recommend together."""

    def __init__(self, parts: dict[str, OnlineModel]) -> None:
        super().__init__()
        self.parts = parts
        self.local_tables = tuple(t for part in parts.values() for t in part.local_tables)
        self.sorted_set_tables = tuple(dict.fromkeys(
            t for part in parts.values() for t in part.sorted_set_tables))

    def bind(self, store: StateStore) -> "CompositeModel":
        for name, part in self.parts.items():
            part.bind(store.sibling(f"{self.name}-{name}"))
        self.store = store
        return self

    def prefetch(self, batch: SignalBatch) -> None:
        for part in self.parts.values():
            part.prefetch(batch)

    def _learn(self, batch: SignalBatch) -> LearnReport:
        changed = [item for report in self.learn_parts(batch).values()
                   for item in report.changed_item_vectors]
        return LearnReport(events=len(batch), changed_item_vectors=changed)

    def learn_parts(self, batch: SignalBatch) -> dict[str, LearnReport]:
        """Every part learns ``batch``; each part's report, by name."""
        return {name: part.learn(batch) for name, part in self.parts.items()}

    def learn_items(self, records) -> int:
        return sum(part.learn_items(records) for part in self.parts.values())

    def forget(self, keys) -> None:
        for part in self.parts.values():
            part.forget(keys)
        super().forget(keys)

    def close(self) -> None:
        for part in self.parts.values():
            part.close()


def normalised(rec: Recommendations) -> dict[str, float]:
    """A part's candidates with scores divided by its best (each part counts on one scale)."""
    best = float(rec.scores[0]) if len(rec.items) else 1.0
    return {item: score / (best or 1.0) for item, score in zip(rec.items, rec.scores.tolist())}


def mix(candidates: dict[str, dict[str, float]], weights: dict[str, float], k: int
        ) -> list[tuple[str, float]]:
    """The top ``k`` of ``Σ weight · normalised score`` over the parts' candidates; ties by
    item id."""
    total: dict[str, float] = {}
    for name, weight in weights.items():
        if weight and name in candidates:
            for item, score in candidates[name].items():
                total[item] = total.get(item, 0.0) + weight * score
    return sorted(total.items(), key=lambda kv: (-kv[1], kv[0]))[:k]


class MixtureModel(CompositeModel):
    name = "mixture"

    def __init__(self, parts: dict[str, tuple[Callable[[], OnlineModel], float]],
                 candidates: int = 100) -> None:
        super().__init__({name: factory() for name, (factory, _) in parts.items()})
        self.weights = {name: weight for name, (_, weight) in parts.items()}
        self.candidates = candidates

    def query_weights(self, queries: list[Query]) -> list[dict[str, float]]:
        """Each query's part weights (the same for all here)."""
        return [self.weights] * len(queries)

    def _recommend(self, queries: list[Query], k: int) -> list[Recommendations]:
        weights = self.query_weights(queries)
        used = {name for w in weights for name, value in w.items() if value}
        per_part = {name: [normalised(rec) for rec in part.recommend(queries, self.candidates)]
                    for name, part in self.parts.items() if name in used}
        out = []
        for n, query_weights in enumerate(weights):
            ranked = mix({name: lists[n] for name, lists in per_part.items()}, query_weights, k)
            out.append(Recommendations([i for i, _ in ranked],
                                       np.array([s for _, s in ranked], dtype=np.float64)))
        return out


#: Context buckets by the user's events learned so far: < 10, < 50, < 200, more.
CONTEXT_BOUNDS = (10, 50, 200)


def context_bucket(known_events: int) -> int:
    """The context bucket of a user with ``known_events`` learned events (0 = new)."""
    return sum(known_events >= bound for bound in CONTEXT_BOUNDS)


class ContextualMixture(MixtureModel):
    """A mixture whose weights depend on the request's context: how much the user's history
    says (:func:`context_bucket` of the user's learned events). A new user leans on the
    session and popularity, a long history on its long-term parts; the weights of each bucket
    are chosen on the validation split (``bench/tune_user.py --by-context``). The count is a
    partition-local row per user (``ctx``)."""

    name = "contextual_mixture"

    def __init__(self, parts: dict[str, tuple[Callable[[], OnlineModel], float]],
                 weights_by_bucket: dict[int, dict[str, float]], candidates: int = 100) -> None:
        super().__init__(parts, candidates)
        self.weights_by_bucket = weights_by_bucket
        self.local_tables = (*self.local_tables, "ctx")
        self.user_tables = ("ctx",)  # the parts' own are theirs (CompositeModel.forget)

    def prefetch(self, batch: SignalBatch) -> None:
        super().prefetch(batch)
        self.store.prefetch_local_rows("ctx", list(dict.fromkeys(batch.users.tolist())))

    def _learn(self, batch: SignalBatch) -> LearnReport:
        report = super()._learn(batch)
        users, counts = np.unique(batch.users, return_counts=True)
        users = users.tolist()
        rows = self.store.get_local_rows("ctx", users)
        self.store.set_local_rows("ctx", {u: {"n": row.get("n", 0.0) + float(c)}
                                          for u, row, c in zip(users, rows, counts.tolist())})
        return report

    def query_weights(self, queries: list[Query]) -> list[dict[str, float]]:
        users = list(dict.fromkeys(q.user_id for q in queries))
        known = {u: int(row.get("n", 0)) for u, row in
                 zip(users, self.store.get_local_rows("ctx", users))}
        return [self.weights_by_bucket.get(context_bucket(known[q.user_id]), self.weights)
                for q in queries]
