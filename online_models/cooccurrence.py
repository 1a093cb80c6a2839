"""Item-item co-occurrence: time-decayed, cosine-normalised, top-N neighbours per item.

Each positive event of item ``b`` in a session whose recent window holds item ``a`` (at most
``window`` items, within ``max_gap_s``) adds ``f(t) · w_a · w_b`` to both ``C[a][b]`` and
``C[b][a]``, where ``w`` are signal weights and ``f(t) = 2^((t − L)/half_life)`` is forward
decay against a landmark ``L`` fixed at the first event (so older co-occurrences fade without
touching them). Each item's mass ``n[a] += f(t) · w_a`` gives the cosine normalisation
``sim(a, b) = C[a][b] / sqrt(n[a] · n[b])``; the decay factor cancels in the ratio.
Rows keep their ``neighbours`` largest raw counts (the store trims).

A query scores ``Σ_{a ∈ session} r(a) · sim(a, ·)`` with recency weights ``r = 0.5^(L − p)``.
(Cosine was chosen over Jaccard and lift on the YooChoose replay: see docs/benchmarks.md.)

Limits: the landmark is never moved, so at the default half-life of 7 days scores stay in
float range for ~1,000 days of stream time before a rebuild is needed.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import scipy.sparse as sp

from online_models.base import (LearnReport, OnlineModel, Query, Recommendations, row_chunks,
                                top_k_dense)
from online_models.signals import SignalBatch
from online_models.store import trim_row


class CooccurrenceModel(OnlineModel):
    name = "cooc"
    local_tables = ("win",)

    def __init__(self, window: int = 5, max_gap_s: float = 3600.0, neighbours: int = 200,
                 half_life_s: float = 7 * 86400.0, normalisation: str = "jaccard") -> None:
        super().__init__()
        if normalisation not in ("cosine", "jaccard", "lift", "none"):
            raise ValueError(f"normalisation must be cosine, jaccard, lift or none, not "
                             f"{normalisation!r}")
        self.window = window
        self.max_gap_s = max_gap_s
        self.neighbours = neighbours
        self.half_life_s = half_life_s
        self.normalisation = normalisation

    def _landmark(self, first_ts: float) -> float:
        # claimed atomically: concurrent workers must all scale by the same landmark
        return self.store.claim("meta", "landmark", "t", first_ts)

    @staticmethod
    def _paired(batch: SignalBatch) -> SignalBatch:
        return batch.select(batch.positive)  # only positive events co-occur

    def prefetch(self, batch: SignalBatch) -> None:
        sessions = self._paired(batch).sessions.tolist()
        self.store.prefetch_local_rows("win", list(dict.fromkeys(sessions)))

    def _learn(self, batch: SignalBatch) -> LearnReport:
        batch = self._paired(batch)
        if len(batch) == 0:
            return LearnReport()
        landmark = self._landmark(float(batch.timestamps[0]))
        factors = np.exp2((batch.timestamps - landmark) / self.half_life_s)
        sessions = list(dict.fromkeys(batch.sessions.tolist()))
        windows = {s: dict(row) for s, row in
                   zip(sessions, self.store.get_local_rows("win", sessions))}
        counts: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        mass: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        for session, item, ts, weight, factor in zip(
                batch.sessions.tolist(), batch.items.tolist(), batch.timestamps.tolist(),
                batch.weights.tolist(), factors.tolist()):
            window = windows[session]  # item -> time it was last seen in this session
            for other, seen_ts in window.items():
                if other != item and ts - seen_ts <= self.max_gap_s:
                    contribution = factor * weight
                    counts[item][other] += contribution
                    counts[other][item] += contribution
            mass[item]["n"] += factor * weight
            window[item] = ts
            trim_row(window, self.window)  # per event, so batching is invisible
        self.store.set_local_rows("win", windows)  # sessions are partition-local
        self.store.incr_rows("cooc", counts, keep_top=self.neighbours)
        self.store.incr_rows("mass", mass)
        return LearnReport(events=len(batch))

    def similar(self, items: list[str]) -> list[dict[str, float]]:
        """Normalised neighbour rows of ``items`` (for "similar items" and scoring)."""
        rows = self.store.get_rows("cooc", items)
        others = sorted({j for row in rows for j in row} | set(items))
        mass = dict(zip(others, (r.get("n", 0.0) for r in self.store.get_rows("mass", others))))
        total = sum(mass.values()) or 1.0
        out = []
        for item, row in zip(items, rows):
            n_a = mass.get(item, 0.0)
            sims = {}
            for other, c in row.items():
                n_b = mass.get(other, 0.0)
                if n_a <= 0 or n_b <= 0:
                    continue
                if self.normalisation == "cosine":
                    sims[other] = c / np.sqrt(n_a * n_b)
                elif self.normalisation == "jaccard":
                    sims[other] = c / max(n_a + n_b - c, 1e-12)
                elif self.normalisation == "lift":
                    sims[other] = c * total / (n_a * n_b)
                else:
                    sims[other] = c
            out.append(sims)
        return out

    def _recommend(self, queries: list[Query], k: int) -> list[Recommendations]:
        q_items = sorted({i for q in queries for i in q.session_items})
        if not q_items:
            return [Recommendations([], np.empty(0)) for _ in queries]
        sims = self.similar(q_items)
        vocab: dict[str, int] = {}
        for row in sims:
            for item in row:
                vocab.setdefault(item, len(vocab))
        if not vocab:
            return [Recommendations([], np.empty(0)) for _ in queries]
        row_of = {item: r for r, item in enumerate(q_items)}
        lengths = [len(row) for row in sims]
        neighbours = sp.csr_matrix(
            (np.fromiter((v for row in sims for v in row.values()), np.float32, sum(lengths)),
             np.fromiter((vocab[i] for row in sims for i in row), np.int64, sum(lengths)),
             np.concatenate(([0], np.cumsum(lengths)))), shape=(len(q_items), len(vocab)))
        qr, qc, qv = [], [], []
        for row_no, q in enumerate(queries):
            length = len(q.session_items)
            for p, item in enumerate(q.session_items):
                qr.append(row_no), qc.append(row_of[item]), qv.append(0.5 ** (length - 1 - p))
        weights = sp.csr_matrix((np.asarray(qv, np.float32), (qr, qc)),
                                shape=(len(queries), len(q_items)))
        ids = np.array(list(vocab), dtype=object)
        out: list[Recommendations] = []
        for a, b in row_chunks(len(queries), len(ids)):
            out += top_k_dense(ids, (weights[a:b] @ neighbours).toarray(), k, queries[a:b])
        return out
