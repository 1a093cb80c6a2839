"""``river.reco.BiasedMF`` as a peer baseline (learns one event at a time, in memory only).

River's model ranks by calling ``predict_one`` per (user, item), so recommending over a whole
catalogue is slow: ``candidates`` limits ranking to the most popular items seen so far.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
from river import optim, reco

from online_models.base import LearnReport, OnlineModel, Query, Recommendations, top_k_dense
from online_models.signals import SignalBatch


class RiverBiasedMF(OnlineModel):
    name = "river_mf"

    def __init__(self, n_factors: int = 10, learning_rate: float = 0.05,
                 candidates: int = 500, seed: int = 0) -> None:
        super().__init__()
        self.n_factors = n_factors
        self.learning_rate = learning_rate
        self.candidates = candidates
        self.seed = seed
        self.river = reco.BiasedMF(n_factors=n_factors, seed=seed,
                                   bias_optimizer=optim.SGD(learning_rate),
                                   latent_optimizer=optim.SGD(learning_rate),
                                   l2_latent=0.01)
        self.popularity: Counter[str] = Counter()

    def _learn(self, batch: SignalBatch) -> LearnReport:
        for user, item, weight in zip(batch.users.tolist(), batch.items.tolist(),
                                      batch.weights.tolist()):
            self.river.learn_one(user, item, 1.0 if weight > 0 else 0.0)
            if weight > 0:
                self.popularity[item] += 1
        return LearnReport(events=len(batch))

    def _recommend(self, queries: list[Query], k: int) -> list[Recommendations]:
        ids = np.array([i for i, _ in self.popularity.most_common(self.candidates)], dtype=object)
        if len(ids) == 0:
            return [Recommendations([], np.empty(0)) for _ in queries]
        # anonymous sessions: river knows the session as its "user" (sessions learn as users)
        scores = np.array([[self.river.predict_one(q.user_id, i) for i in ids] for q in queries])
        scores = scores - scores.min(axis=1, keepdims=True) + 1e-6
        return top_k_dense(ids, scores, k, queries)
