"""Ranking metrics at K (accuracy) and list-level metrics (coverage, novelty, diversity, bias).

Accuracy metrics take one ranked list and the set of relevant items (the session protocol's
target is the single next item; then precision@K = HR@K / K, recall@K = HR@K, MAP@K = MRR@K):

* HR@K: 1 if any relevant item is in the top K.
* MRR@K: 1 / rank of the first relevant item in the top K, else 0.
* NDCG@K: Σ_{relevant at rank r ≤ K} 1/log2(r + 1), divided by the ideal DCG.
* Precision@K: relevant items in the top K / K. Recall@K: … / |relevant|.
* MAP@K: Σ_{relevant at rank r ≤ K} precision@r / min(|relevant|, K).

Example
-------
>>> scores = ranking_metrics(["a", "b", "c"], {"b"}, k=2)
>>> scores["HR"], scores["MRR"], round(scores["NDCG"], 4)
(1.0, 0.5, 0.6309)
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Iterable, Sequence

import numpy as np
import scipy.sparse as sp

ACCURACY = ("HR", "MRR", "NDCG", "Precision", "Recall", "MAP")


def ranking_metrics(ranked: Sequence[str], relevant: set[str], k: int) -> dict[str, float]:
    """Accuracy metrics of one ranked list against the relevant items, cut at ``k``."""
    hits = [r for r, item in enumerate(ranked[:k], start=1) if item in relevant]
    if not hits or not relevant:
        return dict.fromkeys(ACCURACY, 0.0)
    dcg = sum(1.0 / math.log2(r + 1) for r in hits)
    ideal = sum(1.0 / math.log2(r + 1) for r in range(1, min(len(relevant), k) + 1))
    ap = sum((n / r) for n, r in enumerate(hits, start=1)) / min(len(relevant), k)
    return {"HR": 1.0, "MRR": 1.0 / hits[0], "NDCG": dcg / ideal,
            "Precision": len(hits) / k, "Recall": len(hits) / len(relevant), "MAP": ap}


def gini(counts: np.ndarray) -> float:
    """Gini coefficient of non-negative counts (0 = equal exposure, → 1 = one item gets all)."""
    x = np.sort(np.asarray(counts, dtype=float))
    if x.sum() == 0:
        return 0.0
    n = len(x)
    return float((2 * np.arange(1, n + 1) - n - 1) @ x / (n * x.sum()))


class ListMetrics:
    """Beyond-accuracy metrics of many recommendation lists against training popularity.

    * coverage: distinct recommended items / catalogue size;
    * novelty: mean self-information ``−log2(pop(i) / N)`` of recommended items;
    * ARP (average recommendation popularity) and head share (items in the most popular 20 %
      of the catalogue) measure popularity bias;
    * exposure Gini over the whole catalogue (never-recommended items count as 0);
    * intra-list diversity: 1 − mean pairwise cosine similarity of a list's items, the
      similarity taken from co-occurrence in training sessions (lists sampled, seeded).
    """

    def __init__(self, train_sessions: Iterable[Sequence[str]], catalogue: Iterable[str],
                 ild_sample: int = 2000, seed: int = 0) -> None:
        sessions = [list(dict.fromkeys(s)) for s in train_sessions]
        self.catalogue = sorted(set(catalogue) | {i for s in sessions for i in s})
        self.index = {item: n for n, item in enumerate(self.catalogue)}
        self.popularity = Counter(i for s in sessions for i in s)
        self.total = max(sum(self.popularity.values()), 1)
        ranked = sorted(self.catalogue, key=lambda i: -self.popularity[i])
        self.head = set(ranked[: max(1, len(ranked) // 5)])
        rows = [self.index[i] for s in sessions for i in s]
        cols = [n for n, s in enumerate(sessions) for _ in s]
        incidence = sp.csr_matrix((np.ones(len(rows)), (rows, cols)),
                                  shape=(len(self.catalogue), max(len(sessions), 1)))
        norms = np.sqrt(np.asarray(incidence.multiply(incidence).sum(axis=1)).ravel())
        self.unit = sp.diags(1.0 / np.where(norms > 0, norms, 1.0)) @ incidence
        self.ild_sample = ild_sample
        self.seed = seed

    def summarise(self, lists: Sequence[Sequence[str]]) -> dict[str, float]:
        exposure = Counter(i for lst in lists for i in lst)
        recommended = [i for lst in lists for i in lst]
        if not recommended:
            return {"coverage": 0.0, "novelty": 0.0, "ARP": 0.0, "head_share": 0.0,
                    "exposure_gini": 0.0, "ILD": 0.0}
        counts = np.array([exposure.get(i, 0) for i in self.catalogue])
        novelty = np.mean([-math.log2((self.popularity[i] + 1) / (self.total + 1))
                           for i in recommended])
        rng = np.random.default_rng(self.seed)
        sample = [lists[n] for n in rng.permutation(len(lists))[: self.ild_sample]]
        ild = [self._ild(lst) for lst in sample if len(lst) > 1]
        return {"coverage": len(exposure) / max(len(self.catalogue), 1),
                "novelty": float(novelty),
                "ARP": float(np.mean([self.popularity[i] for i in recommended])),
                "head_share": sum(i in self.head for i in recommended) / len(recommended),
                "exposure_gini": gini(counts),
                "ILD": float(np.mean(ild)) if ild else 0.0}

    def _ild(self, items: Sequence[str]) -> float:
        rows = [self.index[i] for i in items if i in self.index]
        if len(rows) < 2:
            return 0.0
        x = self.unit[rows]
        sims = (x @ x.T).toarray()
        n = len(rows)
        return 1.0 - (sims.sum() - np.trace(sims)) / (n * (n - 1))

    def popularity_deciles(self, lists: Sequence[Sequence[str]]) -> list[float]:
        """Share of recommendations falling in each popularity decile (0 = most popular)."""
        ranked = sorted(self.catalogue, key=lambda i: -self.popularity[i])
        decile = {item: min(9, n * 10 // max(len(ranked), 1)) for n, item in enumerate(ranked)}
        counts = Counter(decile.get(i, 9) for lst in lists for i in lst)
        total = max(sum(counts.values()), 1)
        return [counts.get(d, 0) / total for d in range(10)]
