"""Baselines that every replay reports alongside: popularity and seeded random."""

from __future__ import annotations

import numpy as np

from online_models.base import (LearnReport, OnlineModel, Query, Recommendations, row_chunks,
                                top_k_dense)
from online_models.signals import SignalBatch


class PopularityModel(OnlineModel):
    """Counts of positive events per item, for all time; the same for everyone. (Trending,
    decayed and weighted by event type, is :class:`online_models.trending.TrendingModel`.)"""

    name = "popularity"
    sorted_set_tables = ("pop",)

    def __init__(self, max_items: int = 10_000) -> None:
        super().__init__()
        self.max_items = max_items

    def _learn(self, batch: SignalBatch) -> LearnReport:
        batch = batch.select(batch.positive)
        if len(batch) == 0:
            return LearnReport()
        items, counts = np.unique(batch.items, return_counts=True)
        self.store.incr_rows("pop", {"all": dict(zip(items.tolist(),
                                                     map(float, counts.tolist())))},
                             keep_top=self.max_items)
        return LearnReport(events=len(batch))

    def _recommend(self, queries: list[Query], k: int) -> list[Recommendations]:
        return recommend_row(self.store.get_rows("pop", ["all"])[0], queries, k)


def recommend_row(row: dict[str, float], queries: list[Query], k: int) -> list[Recommendations]:
    """Every query's top-``k`` of one shared row of scores (popularity, trending)."""
    if not row:
        return [Recommendations([], np.empty(0)) for _ in queries]
    ids = np.array(list(row), dtype=object)
    scores = np.fromiter(row.values(), float, len(row))
    return [rec for a, b in row_chunks(len(queries), len(ids))
            for rec in top_k_dense(ids, np.tile(scores, (b - a, 1)), k, queries[a:b])]


class RandomModel(OnlineModel):
    """Uniformly random items among those seen so far (seeded)."""

    name = "random"
    sorted_set_tables = ("catalog",)

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
