"""Online implicit ALS (iALS; Hu, Koren & Volinsky 2008) made incremental and batch-first, in
the spirit of eALS's online updates (He et al. 2016): after each batch, exact least-squares
solves for the users and items the batch touched, against every other item / user through
their Gram matrix.

Every item a user touched is *observed* with confidence ``c = unobserved_weight + alpha·|w|``
(target 1 for a positive signal, 0 for a negative one); every other item is *unobserved* with
weight ``unobserved_weight`` and target 0. A user's factors then solve

    (w0·Gᵢ + Σ_{i∈H(u)} (c_ui − w0)·q_i q_iᵀ + λ·I) p_u = Σ_{i∈H(u)} c_ui·t_ui·q_i

where ``Gᵢ = Σ_all q q ᵀ`` (kept up to date by adding each changed vector's ``q'q'ᵀ − qqᵀ``)
and ``H(u)`` is the user's last ``history`` touched items (a partition-local row). Items solve
the same way over their ``raters`` strongest raters (a shared row) and the user Gram matrix.
Bounded state: ``history`` per user, ``raters`` per item, two k×k matrices (stored as k
vectors of k each). Defaults chosen on the MovieLens validation split (``bench/tune_user.py
--als-variants``).

Queries fold in: the user's history *and* the current session solve a fresh vector against
today's item factors (an anonymous session gets the same exact fold-in), so a returning
user's query never uses stale factors; ``recency`` < 1 weighs each step back in the history
by that factor (what the user did last says most about what they want next).
"""

from __future__ import annotations

import numpy as np

from online_models.base import LearnReport, Query, factorize
from online_models.mf import OnlineMF
from online_models.signals import SignalBatch
from online_models.store import trim_row


class OnlineALS(OnlineMF):
    name = "als"
    local_tables = user_tables = ("history",)
    user_vector_tables = ("user",)

    def __init__(self, factors: int = 128, regularisation: float = 5.0, alpha: float = 1.0,
                 unobserved_weight: float = 0.2, history: int = 300, raters: int = 500,
                 recency: float = 0.7, init_scale: float = 0.01, max_items: int = 100_000,
                 seed: int = 0) -> None:
        super().__init__(factors=factors, regularisation=regularisation, negatives=0,
                         init_scale=init_scale, max_items=max_items, seed=seed)
        self.alpha = alpha
        self.unobserved_weight = unobserved_weight
        self.history = history
        self.raters = raters
        self.recency = recency

    def forget(self, keys) -> None:
        """Also take the users out of the raters of the items in their histories."""
        self.remove_from_item_rows(keys, "history", "raters")
        super().forget(keys)

    # --- learning ---------------------------------------------------------------------------
    def prefetch(self, batch: SignalBatch) -> None:
        batch = self._learnt(batch)
        users = list(dict.fromkeys(batch.users.tolist()))
        self.store.prefetch_local_rows("history", users)
        self.store.prefetch_local_vectors("user", users)

    def _learn(self, batch: SignalBatch) -> LearnReport:
        batch = self._learnt(batch)
        if len(batch) == 0:
            return LearnReport()
        self.store.set_rows("catalog", {"all": dict(zip(batch.items.tolist(),
                                                        batch.timestamps.tolist()))},
                            keep_top=self.max_items)
        users, _ = factorize(batch.users)
        items, _ = factorize(batch.items)
        # signed evidence: +w for a positive signal, −w for a negative one; the latest decides
        # the target, the magnitudes add up to the confidence
        histories = [dict(row) for row in self.store.get_local_rows("history", users)]
        row_of = {u: r for r, u in enumerate(users)}
        raters: dict[str, dict[str, float]] = {}  # signed: a trimmed row drops dislikes first
        for user, item, weight in zip(batch.users.tolist(), batch.items.tolist(),
                                      batch.weights.tolist()):
            row = histories[row_of[user]]
            previous = row.pop(item, 0.0)  # re-inserted last: the row keeps recency order
            row[item] = np.copysign(abs(previous) + abs(weight), weight)
            raters.setdefault(item, {})[user] = row[item]
        for row in histories:
            while len(row) > self.history:
                del row[next(iter(row))]
        self.store.set_local_rows("history", dict(zip(users, histories)))
        self.store.set_rows("raters", raters, keep_top=self.raters)

        # users against the items they touched, then the touched items against their raters
        old_users, _ = self.store.get_local_vectors("user", users, self.factors)
        new_users = self._solve(histories, "item")
        self.store.set_local_vectors("user", users, new_users)
        self._update_gram("user", old_users, new_users)

        # a deferred store (the worker's) cannot read this batch's writes back yet: merge and
        # trim as the store does, so every store solves over the same raters
        rater_rows = [trim_row({**stored, **raters[item]}, self.raters)
                      for item, stored in zip(items, self.store.get_rows("raters", items))]
        old_items, _ = self.store.get_vectors("item", items, self.factors)
        new_items = self._solve(rater_rows, "user", dict(zip(users, new_users)))
        self.store.add_vectors("item", items, new_items - old_items, old_items)
        self._update_gram("item", old_items, new_items)
        return LearnReport(events=len(batch), changed_item_vectors=items)

    def _gram_rows(self, table: str) -> list[str]:
        return [f"{table}:{row}" for row in range(self.factors)]  # one k-vector per row

    def _gram(self, table: str) -> np.ndarray:
        rows, _ = self.store.get_vectors("gram", self._gram_rows(table), self.factors)
        return rows.astype(np.float64)

    def _update_gram(self, table: str, old: np.ndarray, new: np.ndarray) -> None:
        old, new = old.astype(np.float64), new.astype(np.float64)
        delta = (new.T @ new - old.T @ old).astype(np.float32)
        self.store.add_vectors("gram", self._gram_rows(table), delta, np.zeros_like(delta))

    def _other_vectors(self, table: str, ids: list[str],
                       fresh: dict[str, np.ndarray]) -> np.ndarray:
        """Stored factors (seeded where none is stored yet, read as shared rows: raters belong
        to other partitions too), ``fresh`` ones taking precedence."""
        vectors = self._vectors(table, ids, local=False)
        for r, key in enumerate(ids):
            if key in fresh:
                vectors[r] = fresh[key]
        return vectors

    def _solve(self, rows: list[dict[str, float]], other: str,
               fresh: dict[str, np.ndarray] | None = None) -> np.ndarray:
        """One exact least-squares solve per row of signed evidence ``{id: ±w}`` against the
        ``other`` side's factors (stacked: one batched ``np.linalg.solve``)."""
        k, w0 = self.factors, self.unobserved_weight
        width = max((len(row) for row in rows), default=0)
        if width == 0:
            return np.zeros((len(rows), k), np.float32)
        ids = list(dict.fromkeys(i for row in rows for i in row))
        col = {i: c for c, i in enumerate(ids)}
        vectors = self._other_vectors(other, ids, fresh or {}).astype(np.float64)
        index = np.zeros((len(rows), width), np.int64)
        evidence = np.zeros((len(rows), width))
        for r, row in enumerate(rows):
            index[r, :len(row)] = [col[i] for i in row]
            evidence[r, :len(row)] = list(row.values())
        observed = evidence != 0
        confidence = np.where(observed, w0 + self.alpha * np.abs(evidence), 0.0)
        target = (evidence > 0).astype(np.float64)
        factors = vectors[index]  # rows × width × k
        weighted = factors * np.where(observed, confidence - w0, 0.0)[..., None]
        lhs = w0 * self._gram(other)[None] + weighted.transpose(0, 2, 1) @ factors
        lhs[:, np.arange(k), np.arange(k)] += self.regularisation
        rhs = np.einsum("rwk,rw->rk", factors, confidence * target)
        return np.linalg.solve(lhs, rhs[..., None])[..., 0].astype(np.float32)

    # --- serving ----------------------------------------------------------------------------
    def query_vectors(self, queries: list[Query]) -> np.ndarray:
        """Each query's user history plus session items, folded in against today's item
        factors (zero when the query knows no item)."""
        users = list(dict.fromkeys(q.user_id for q in queries))
        stored = dict(zip(users, self.store.get_local_rows("history", users)))
        rows = []
        for q in queries:
            row = dict(stored[q.user_id])
            for item in q.session_items:  # the session: positive evidence, newest last
                row[item] = max(row.pop(item, 1.0), 1.0)
            recent = list(row.items())[-self.history:]
            # the query leans to what the user did last: evidence × recency^(steps back)
            rows.append({item: weight * self.recency ** (len(recent) - 1 - n)
                         for n, (item, weight) in enumerate(recent)})
        return self._solve(rows, "item")
