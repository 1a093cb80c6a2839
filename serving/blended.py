"""The serving pipeline as an :class:`OnlineModel`, so ``streamrec replay`` evaluates exactly the
code that builds live feeds (``--models blend,blend_raw``).

It learns its sources (session, mf, trending; cooc too where its pairs are counted per event,
``cooc="written"``; by default, as live, co-occurrence is read from the session model's state)
from the same batches, keeps an HNSW
index in step with the MF item vectors each batch changed (live, the index tails the
item-vector topic instead), and recommends through :class:`serving.recommender.Recommender`.
``blend`` re-ranks (MMR, exposure fairness); ``blend_raw`` is the blend before re-ranking, so
a report shows what re-ranking costs and buys. Replay does not filter seen items (repeat
clicks are legitimate next events in session logs); live feeds do.
"""

from __future__ import annotations

import numpy as np

from online_models.base import LearnReport, Query, Recommendations
from online_models.cooccurrence import CooccurrenceModel
from online_models.mf import OnlineMF
from online_models.mixture import CompositeModel
from online_models.session import SessionModel
from online_models.signals import SignalBatch
from online_models.trending import TrendingModel
from serving.ann import AnnIndex
from serving.recommender import PipelineConfig, Recommender, Request
from serving.rerank import RerankPolicy
from stream.vector_changes import MovedVectors


#: ``long_term=True``: the sources a deployment for returning users adds — the worker's long-term
#: models (``STREAMREC_LIVE_MODELS=session,mf,history,als,content``) and the trainer's
#: two-tower versions, named as the live pipeline names their sources (so the same weights
#: apply: ``serving.rerank.SOURCE_WEIGHTS``).
LONG_TERM_SOURCES = {"history": "history", "als": "als", "ann_two_tower": "two_tower"}


class BlendedModel(CompositeModel):
    name = "blend"

    def __init__(self, rerank: bool = True, cooc: str = "read", long_term: bool = False,
                 policy: RerankPolicy | None = None) -> None:
        """``cooc``: the co-occurrence source's neighbours — ``"read"`` (scored at read time
        from the session model's state, :meth:`SessionModel.similar`: what the live default
        serves), ``"written"`` (pair counts learnt per event, :class:`CooccurrenceModel`) or
        ``"none"``. ``long_term``: the returning users' sources too (:data:`LONG_TERM_SOURCES`
        and ``content``). ``policy``: the blend's weights and re-ranking (default: live's)."""
        if cooc not in ("written", "read", "none"):
            raise ValueError(f"cooc must be written, read or none, not {cooc!r}")
        parts = {"session": SessionModel(), "mf": OnlineMF(), "trending": TrendingModel()}
        if cooc == "written":
            parts["cooc"] = CooccurrenceModel()
        if long_term:
            from online_models.registry import build

            parts.update({part: build(part) for part in (*LONG_TERM_SOURCES.values(),
                                                         "content")})
        super().__init__(parts)
        # the same log, the same lists: the graph built as the updates come, on one thread
        self.ann = AnnIndex(self.parts["mf"].factors, capacity=10_000, deterministic=True)
        self.recommender = Recommender(
            trending=self.parts["trending"].top, session=self.parts["session"],
            cooc={"written": parts.get("cooc"), "read": parts["session"], "none": None}[cooc],
            mf=self.parts["mf"], ann=self.ann, content=parts.get("content"),
            model_sources={source: parts[part] for source, part in LONG_TERM_SOURCES.items()
                           if part in parts},
            config=PipelineConfig(filter_seen=False, rerank=rerank,
                                  policy=policy or RerankPolicy(),
                                  model_version="blend-v1" if rerank else "blend-raw-v1"),
            item_ages=self._item_ages)
        # the live index's updates: new vectors and those moved past the worker's publishing
        # threshold (STREAMREC_VECTOR_PUBLISH_MIN_CHANGE's default) since last indexed
        self._published = MovedVectors()
        self._clock = 0.0

    def _item_ages(self, items: list[str]) -> dict[str, float]:
        return {i: self._clock - t for i, t in self.parts["trending"].first_seen(items).items()}

    def _learn(self, batch: SignalBatch) -> LearnReport:
        self._clock = max(self._clock, float(batch.timestamps.max()))
        # the index holds MF's item vectors (not ALS's)
        changed = self.learn_parts(batch)["mf"].changed_item_vectors
        if changed:
            mf = self.parts["mf"]
            vectors, found = mf.store.get_vectors("item", changed, mf.factors)
            items, vectors = [i for i, ok in zip(changed, found) if ok], vectors[found]
            chosen = self._published.select(items, vectors)  # what the worker would publish
            if chosen:
                self.ann.upsert([items[n] for n in chosen], vectors[chosen])
        return LearnReport(events=len(batch), changed_item_vectors=changed)

    def close(self) -> None:
        super().close()
        self.ann.close()

    def _recommend(self, queries: list[Query], k: int) -> list[Recommendations]:
        served = self.recommender.recommend(
            [Request(q.user_id, q.session_items, k, q.exclude) for q in queries])
        # re-ranking decides the order, not the blend score: report 1/(1 + position)
        return [Recommendations([i.item_id for i in s.items],
                                1.0 / (1.0 + np.arange(len(s.items), dtype=np.float64)))
                for s in served]
