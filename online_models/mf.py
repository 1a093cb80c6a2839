"""Online implicit matrix factorisation: incremental SGD (ISGD family) with negatives.

Each positive signal ``(u, i, w)`` pulls ``p_u · q_i`` towards 1 with weight ``w`` (clicks
weighted by dwell confidence, carts and purchases more); each negative signal — an explicit skip,
a dwell under the skip threshold, a dislike, an impression without click — pushes its score
towards 0 with weight ``|w|``; and ``negatives`` items sampled from the batch's own positive
events (so in proportion to current popularity, which counters popularity bias) push towards 0
with weight ``negative_weight`` (implicit data has no observed zeros).

Item vectors are shared by all workers, so a batch writes its *change* to each (added
atomically by the store: concurrent workers' steps add up, asynchronous-SGD style); user
vectors are partition-local and overwritten.

Updates are computed for the whole batch from the vectors as read at its start and averaged
per row, repeated ``epochs`` times, each event's weighted error clipped to
``±max_step_error`` (heavy signals cannot blow the step up): one store read and one write per batch
(ISGD, Vinagre et al. 2014, made batch-first; eALS was slower per event in our measurements
and needs per-item caches we could not bound as simply). New users and items start from a
vector seeded by a hash of their id, so every worker and every store initialises them alike.
Users without a vector (anonymous sessions) are folded in from their session's items.

``learn`` reports the items whose vectors changed: the ANN index consumes them.
"""

from __future__ import annotations

import hashlib
from functools import partial
from typing import Callable

import numpy as np

from online_models.base import (LearnReport, OnlineModel, Query, Recommendations, factorize,
                                row_chunks, top_k_dense)
from online_models.kernels import mf_epochs
from online_models.signals import SignalBatch
from online_models.store import _trim_order

#: items → (their vectors, found mask), as :meth:`StateStore.get_vectors` returns them
ItemVectors = Callable[[list[str]], tuple[np.ndarray, np.ndarray]]


def seeded_vectors(ids: list[str], dim: int, scale: float, salt: str) -> np.ndarray:
    """Deterministic initial vectors, uniform with standard deviation ``scale``, drawn from
    SHAKE-256 of ``salt:id`` (the same on every worker and store, ~1 µs per id)."""
    raw = b"".join(hashlib.shake_256(f"{salt}:{key}".encode()).digest(4 * dim) for key in ids)
    uniform = np.frombuffer(raw, dtype=np.uint32).reshape(len(ids), dim) / 2.0 ** 32
    return ((uniform - 0.5) * (scale * np.sqrt(12.0))).astype(np.float32)


#: The catalogue keeps each item's last positive time to this step (seconds): a popular
#: item's entry is rewritten once a step, not at every batch (stores write a member only when
#: its score changes); the newest ``max_items`` are kept, ties by name.
CATALOGUE_TIME_STEP_S = 60.0


class OnlineMF(OnlineModel):
    name = "mf"
    sorted_set_tables = ("catalog",)
    user_vector_tables = ("user",)

    def __init__(self, factors: int = 32, learning_rate: float = 1.0,
                 regularisation: float = 0.01, negatives: int = 4, negative_weight: float = 1.0,
                 epochs: int = 4, max_step_error: float = 2.0, init_scale: float = 0.1,
                 max_items: int = 100_000, seed: int = 0) -> None:
        super().__init__()
        self.factors = factors
        self.learning_rate = learning_rate
        self.regularisation = regularisation
        self.negatives = negatives
        self.negative_weight = negative_weight
        self.epochs = epochs
        self.max_step_error = max_step_error
        self.init_scale = init_scale
        self.max_items = max_items
        self.seed = seed
        self._rng = np.random.default_rng(seed)

    def _vectors(self, table: str, ids: list[str], local: bool | None = None) -> np.ndarray:
        """Stored factors, seeded where none is stored yet; ``local``: read as the owner of
        the rows (by default users are, items are shared)."""
        local = table == "user" if local is None else local
        read = self.store.get_local_vectors if local else self.store.get_vectors
        vectors, found = read(table, ids, self.factors)
        if not found.all():
            missing = [key for key, ok in zip(ids, found) if not ok]
            vectors[~found] = seeded_vectors(missing, self.factors, self.init_scale, table)
        return vectors

    def catalogue(self) -> list[str]:
        """Recent items (at most ``max_items``) in a store-independent order."""
        row = self.store.get_rows("catalog", ["all"])[0]
        return [item for item, _ in sorted(row.items(), key=_trim_order)]

    @staticmethod
    def _learnt(batch: SignalBatch) -> SignalBatch:
        return batch.select(batch.weights != 0)

    def prefetch(self, batch: SignalBatch) -> None:
        # every vector learn reads: the batch's users and items (negatives are drawn from them)
        batch = self._learnt(batch)
        self.store.prefetch_vectors("item", list(dict.fromkeys(batch.items.tolist())))
        self.store.prefetch_local_vectors("user", list(dict.fromkeys(batch.users.tolist())))
        self.store.prefetch_rows("catalog", ["all"])

    def _learn(self, batch: SignalBatch) -> LearnReport:
        batch = self._learnt(batch)
        if len(batch) == 0:
            return LearnReport()
        positives = batch.items[batch.positive]
        times = batch.timestamps[batch.positive]
        self.store.set_rows("catalog", {"all": dict(zip(positives.tolist(), (
            times - times % CATALOGUE_TIME_STEP_S).tolist()))}, keep_top=self.max_items)
        users, u_idx = factorize(batch.users)
        n_pos = len(positives)
        drawn = (self._rng.integers(n_pos, size=n_pos * self.negatives)
                 if n_pos and self.negatives else np.empty(0, dtype=np.int64))
        items, batch_idx = factorize(batch.items)  # negatives are drawn from these
        i_idx = np.concatenate([batch_idx, batch_idx[batch.positive][drawn]])
        rows_u = np.concatenate([u_idx, np.repeat(u_idx[batch.positive], self.negatives)])
        targets = np.concatenate([(batch.weights > 0).astype(np.float32),
                                  np.zeros(len(drawn), np.float32)])
        weights = np.concatenate([np.abs(batch.weights),
                                  np.full(len(drawn), self.negative_weight)]).astype(np.float32)
        user_vecs = self._vectors("user", users)
        item_vecs = self._vectors("item", items)
        item_start = item_vecs.copy()
        lr, reg = self.learning_rate, self.regularisation
        mf_epochs(user_vecs, item_vecs, rows_u, i_idx, targets, weights, lr, reg,
                  self.max_step_error, self.epochs)
        # users are partition-local: overwrite; items are shared by every worker: add the
        # batch's change, so concurrent workers' updates add up instead of overwriting
        self.store.set_local_vectors("user", users, user_vecs)
        self.store.add_vectors("item", items, item_vecs - item_start, item_start)
        return LearnReport(events=len(batch), changed_item_vectors=items)

    def query_vectors(self, queries: list[Query], item_vectors: ItemVectors | None = None
                      ) -> np.ndarray:
        """One vector per query: the user's factors plus the mean of the session items' factors
        (fold-in: the session says what the user wants now); zero when neither is known.
        ``item_vectors``: where the session items' factors come from (serving passes its
        item-vector index, which holds them already); by default, this store."""
        users = sorted({q.user_id for q in queries})
        session_items = sorted({i for q in queries for i in q.session_items})
        if item_vectors is None:
            self.store.prefetch_vector_tables({"user": users, "item": session_items})
            item_vectors = partial(self.store.get_vectors, "item", dim=self.factors)
        user_vecs, found = self.store.get_vectors("user", users, self.factors)
        user_row = {u: r for r, u in enumerate(users)}
        s_vecs, s_found = item_vectors(session_items)
        s_row = {i: r for r, i in enumerate(session_items)}
        query_vecs = np.zeros((len(queries), self.factors), np.float32)
        for row, q in enumerate(queries):
            known = [s_row[i] for i in q.session_items if s_found[s_row[i]]]
            if known:
                query_vecs[row] = s_vecs[known].mean(axis=0)
            if found[user_row[q.user_id]]:
                query_vecs[row] += user_vecs[user_row[q.user_id]]
        return query_vecs

    def _recommend(self, queries: list[Query], k: int) -> list[Recommendations]:
        catalogue = self.catalogue()
        if not catalogue:
            return [Recommendations([], np.empty(0)) for _ in queries]
        ids = np.array(catalogue, dtype=object)
        item_vecs, _ = self.store.get_vectors("item", catalogue, self.factors)
        query_vecs = self.query_vectors(queries)
        out: list[Recommendations] = []
        for a, b in row_chunks(len(queries), len(ids)):
            scores = query_vecs[a:b] @ item_vecs.T
            # dot products can be negative: shift to positive, keep order
            scores = scores - scores.min(axis=1, keepdims=True) + 1e-6
            scores[~query_vecs[a:b].any(axis=1)] = 0.0
            out += top_k_dense(ids, scores, k, queries[a:b])
        return out
