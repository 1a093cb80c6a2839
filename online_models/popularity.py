"""Baselines that every replay reports alongside: decayed popularity and seeded random."""

from __future__ import annotations

import numpy as np

from online_models.base import (LearnReport, OnlineModel, Query, Recommendations, row_chunks,
                                top_k_dense)
from online_models.signals import SignalBatch
from online_models.trending import advance_landmark, batch_deltas


class PopularityModel(OnlineModel):
    """Forward-decayed popularity of positive signals (the trending model); same for everyone.

    With ``half_life_s=None`` it is plain popularity (counts of positive events).
    """

    name = "popularity"

    def __init__(self, half_life_s: float | None = None, max_items: int = 10_000) -> None:
        super().__init__()
        self.half_life_s = half_life_s
        self.max_items = max_items

    def _learn(self, batch: SignalBatch) -> LearnReport:
        batch = batch.select(batch.positive)
        if len(batch) == 0:
            return LearnReport()
        if self.half_life_s is None:
            items, deltas = np.unique(batch.items, return_counts=True)
        else:
            items, deltas = self._decayed_deltas(batch)
        self.store.incr_rows("pop", {"all": dict(zip(items.tolist(),
                                                     map(float, deltas.tolist())))},
                             keep_top=self.max_items)
        return LearnReport(events=len(batch))

    def _decayed_deltas(self, batch: SignalBatch) -> tuple[np.ndarray, np.ndarray]:
        """The batch's forward-decayed deltas against the stored landmark, rebasing the stored
        scores first where the landmark grew old (the step the live trending script takes)."""
        reference = float(batch.timestamps.max())
        stored = self.store.get_rows("meta", ["landmark"])[0].get("t")
        landmark, rescale, factor = advance_landmark(stored, reference, self.half_life_s)
        if rescale != 1.0:
            row = self.store.get_rows("pop", ["all"])[0]
            self.store.set_rows("pop", {"all": {item: score * rescale
                                                for item, score in row.items()}})
        if landmark != stored:
            self.store.set_rows("meta", {"landmark": {"t": landmark}})
        items, deltas = batch_deltas(batch.items, batch.timestamps, np.ones(len(batch)),
                                     reference, self.half_life_s)
        return items, deltas * factor

    def _recommend(self, queries: list[Query], k: int) -> list[Recommendations]:
        row = self.store.get_rows("pop", ["all"])[0]
        if not row:
            return [Recommendations([], np.empty(0)) for _ in queries]
        ids = np.array(list(row), dtype=object)
        scores = np.fromiter(row.values(), float, len(row))
        return [rec for a, b in row_chunks(len(queries), len(ids))
                for rec in top_k_dense(ids, np.tile(scores, (b - a, 1)), k, queries[a:b])]


class RandomModel(OnlineModel):
    """Uniformly random items among those seen so far (seeded)."""

    name = "random"

    def __init__(self, seed: int = 0, max_items: int = 100_000) -> None:
        super().__init__()
        self.seed = seed
        self.max_items = max_items
        self._rng = np.random.default_rng(seed)

    def _learn(self, batch: SignalBatch) -> LearnReport:
        self.store.set_rows("catalog", {"all": {i: 1.0 for i in batch.items.tolist()}},
                            keep_top=self.max_items)
        return LearnReport(events=len(batch))

    def _recommend(self, queries: list[Query], k: int) -> list[Recommendations]:
        row = self.store.get_rows("catalog", ["all"])[0]
        ids = np.array(sorted(row), dtype=object)
        if len(ids) == 0:
            return [Recommendations([], np.empty(0)) for _ in queries]
        return [rec for a, b in row_chunks(len(queries), len(ids))
                for rec in top_k_dense(ids, self._rng.random((b - a, len(ids))) + 1e-9, k,
                                       queries[a:b])]
