"""The serving pipeline: candidates → blend → re-rank → explore, the same code live and in replay.

Candidate sources (each returns ``(item, score, reason)``):

* ``session`` — the session model's next-item scores for the user's recent items;
* ``cooc`` — co-occurrence neighbours of the recent items, recency-weighted
  (``Σ 0.5^(L−p) · sim(a_p, ·)``), explained by the strongest contributing item
  ("because you viewed X");
* ``ann`` — nearest items to the user's MF vector (plus the session fold-in) in the HNSW index;
* ``content`` — items whose description (categories, tags, title: the ``items`` topic) looks
  like what the user liked, explained by the strongest shared feature ("because you like
  Comedy"); it reaches items nobody has touched yet;
* long-term models the worker runs besides these (``als``: "for you"; ``history``: "from
  your favourites"; any other registered model, named after it): their own top lists for
  the user's stored history and recent items;
* ``trending`` — decayed popularity; the cold-start fallback for users nobody knows yet,
  explained "popular in Comedy" where the item shares a category with the user's taste.

New items reach lists through trending and the exploration pool (recent trending beyond the
list) before they have co-occurrences or settled vectors. Ranking and re-ranking are
:mod:`serving.rerank`; exploration and propensities are :mod:`serving.explore`.
"""

from __future__ import annotations

import time
import uuid
from contextlib import ExitStack
from dataclasses import dataclass, field
from itertools import chain, islice
from typing import Callable, Sequence

import numpy as np

from online_models import kernels
from online_models.base import OnlineModel, Query
from online_models.content import feature_label, is_category
from online_models.cooccurrence import recommend_neighbours
from schemas.feeds import Feed, FeedItem
from serving.ann import AnnIndex
from serving.explore import EpsilonGreedy, ExplorationPool, ThompsonSampling
from serving.rerank import (Candidate, RerankPolicy, SourceList, blend, blend_pass, mmr_order,
                            rerank)

TrendingSource = Callable[[int], list[tuple[str, float]]]
#: How a long-term model's candidates are explained (others: "for you").
SOURCE_REASONS = {"als": "for you", "history": "from your favourites",
                  "two_tower": "for you", "ann_two_tower": "for you (two-tower)",
                  "gru4rec": "next in your session (sequential)",
                  "sasrec": "next in your session (sequential)"}
#: The co-occurrence source's weight of the p-th recent item of L: ``COOC_RECENCY^(L − 1 − p)``.
COOC_RECENCY = 0.5
#: items → {item: seconds since first seen, on the stream's clock} (unknown items left out)
ItemAges = Callable[[list[str]], dict[str, float]]


def warm_up() -> None:
    """Load (or compile, where numba's cache is missing or read-only: ~3 s) the compiled
    loops serving runs, so that no list waits for them (the first one took 0.27 s with the
    cache, 3.0 s without)."""
    kernels.warm_up()
    blend({"warm": SourceList(["a"], np.ones(1), "up")}, RerankPolicy())
    mmr_order(np.ones(2), np.zeros(2, np.bool_), np.zeros((2, 2), np.float32), 0.8, 1, 1, 0,
              0, 0)


@dataclass(frozen=True)
class Request:
    user_id: str
    history: tuple[str, ...] = ()  # the user's recent items, oldest first
    k: int = 20
    exclude: frozenset[str] = frozenset()
    pins: tuple[tuple[int, str], ...] = ()  # (position, item)


@dataclass
class PipelineConfig:
    # each source's list before blending: 50 beat 100 on both validation splits (HR) and cut
    # CPU per list, at a little more head exposure (STREAMREC_CANDIDATES_PER_SOURCE)
    candidates_per_source: int = 50
    session_items: int = 10  # recent items that drive session, cooc and fold-in
    head_size: int = 100  # the top-N trending items count as "head" for exposure fairness
    exploration_pool: int = 200
    filter_seen: bool = True
    rerank: bool = True
    policy: RerankPolicy = field(default_factory=RerankPolicy)
    model_version: str = "blend-v1"


class Recommender:
    """Recommends for batches of requests from whichever models it is given (any store)."""

    def __init__(self, trending: TrendingSource, session=None, cooc=None, mf=None,
                 ann: AnnIndex | None = None, content=None,
                 model_sources: dict | None = None,
                 explorer: EpsilonGreedy | ThompsonSampling | None = None,
                 config: PipelineConfig | None = None, item_ages: ItemAges | None = None
                 ) -> None:
        self.trending, self.session, self.cooc, self.mf = trending, session, cooc, mf
        self.content = content
        self.model_sources = model_sources or {}
        self.item_ages = item_ages
        self.ann, self.explorer = ann, explorer
        self.config = config or PipelineConfig()

    # --- candidate sources -----------------------------------------------------------------
    def candidates(self, requests: Sequence[Request],
                   trending: list[tuple[str, float]] | None = None,
                   blocked: list[frozenset[str]] | None = None) -> list[dict[str, SourceList]]:
        """Per request: source name → its list (iterates as ``(item, score, reason)``).
        ``trending``: the trending top, when the caller already read it (it must hold
        ``candidates_per_source`` plus the longest blocked set); ``blocked``: each request's
        blocked items, when the caller already has them. Sources that read the same rows
        (session and read-time co-occurrence: sessions of the recent items) share one read."""
        with ExitStack() as scope:
            for store in {id(m.store): m.store for m in (
                    self.session, self.cooc, self.mf, self.content,
                    *self.model_sources.values()) if isinstance(m, OnlineModel)}.values():
                scope.enter_context(store.shared_reads())
            return self._candidates(requests, trending, blocked or [
                self._blocked(r) for r in requests])

    def _candidates(self, requests: Sequence[Request], trending: list[tuple[str, float]] | None,
                    blocked: list[frozenset[str]]) -> list[dict[str, SourceList]]:
        cfg, n = self.config, self.config.candidates_per_source
        recent = [r.history[-cfg.session_items:] for r in requests]
        queries = [Query(r.user_id, items, exclude=b)
                   for r, items, b in zip(requests, recent, blocked)]
        out: list[dict[str, SourceList]] = [{} for _ in requests]
        if self.session is not None:
            for row, rec in zip(out, self.session.recommend(queries, n)):
                row["session"] = SourceList(rec.items, rec.scores, "next in your session")
        if self.cooc is not None:
            self._cooc_candidates(out, queries, n)
        if self.mf is not None and self.ann is not None:
            # the session items' vectors from the index, which holds them: no read for them
            vectors = self.mf.query_vectors(queries, item_vectors=self.ann.vectors)
            for row, vec, b in zip(out, vectors, blocked):
                if vec.any():
                    items, scores = self.ann.search(vec, n, exclude=b)
                    if items:
                        shifted = scores - scores.min() + 1e-6
                        row["ann"] = SourceList(items, shifted, "for you")
        for name, model in self.model_sources.items():
            reason = SOURCE_REASONS.get(name, "for you")
            for row, rec in zip(out, model.recommend(queries, n)):
                row[name] = SourceList(rec.items, rec.scores, reason)
        top = trending if trending is not None else self.trending(self._trending_depth(blocked))
        top_items, top_scores = [i for i, _ in top], np.array([s for _, s in top], np.float64)
        for row, b in zip(out, blocked):
            if b.isdisjoint(top_items[:n]):  # most requests: the top as it is
                row["trending"] = SourceList(top_items[:n], top_scores[:n], "trending")
            else:
                kept = list(islice((p for p, i in enumerate(top_items) if i not in b), n))
                row["trending"] = SourceList([top_items[p] for p in kept], top_scores[kept],
                                             "trending")
        if self.content is not None:
            self._content_candidates(out, queries, n)
        return out

    def _content_candidates(self, out, queries: list[Query], n: int) -> None:
        """The content source, and "popular in <category>" for trending items that share a
        category with the user's likes: one explanation pass over both lists."""
        recs = self.content.recommend(queries, n)
        features = self.content.explain(queries, [rec.items + row["trending"].items
                                                  for rec, row in zip(recs, out)])
        for row, rec, shared in zip(out, recs, features):
            mine, theirs = shared[:len(rec.items)], shared[len(rec.items):]
            row["content"] = SourceList(rec.items, rec.scores, [
                f"because you like {feature_label(f)}" if f else "like what you liked"
                for f in mine])
            trending = row["trending"]
            trending.reasons = [f"popular in {feature_label(f)}" if is_category(f) else why
                                for why, f in zip(trending.all_reasons(), theirs)]

    def _trending_depth(self, blocked: list[frozenset[str]]) -> int:
        return self.config.candidates_per_source + max((len(b) for b in blocked), default=0)

    def _blocked(self, request: Request) -> frozenset[str]:
        seen = frozenset(request.history) if self.config.filter_seen else frozenset()
        return seen | request.exclude

    def _cooc_candidates(self, out, queries: list[Query], n: int) -> None:
        for row, rec in zip(out, recommend_neighbours(queries, [q.session_items for q in queries],
                                                      self.cooc.similar_rows, COOC_RECENCY, n,
                                                      explain=True)):
            because = {source: f"because you viewed {source}"  # one string per source item
                       for source in dict.fromkeys(rec.sources or ())}
            row["cooc"] = SourceList(rec.items, rec.scores,
                                     list(map(because.__getitem__, rec.sources or ())))

    # --- the pipeline ----------------------------------------------------------------------
    def recommend(self, requests: Sequence[Request], source: str = "pipeline") -> list[Feed]:
        """One feed document per request; ``source`` says who asked (feed builder, API...)."""
        cfg, now = self.config, time.time()
        requests = list(requests)
        if not requests:
            return []
        blocked_of = [self._blocked(r) for r in requests]
        depth = self._trending_depth(blocked_of)
        top = self.trending(max(depth, cfg.exploration_pool, cfg.head_size))  # one read
        sources = self.candidates(requests, top, blocked_of)
        trending_top = [i for i, _ in top[:max(cfg.exploration_pool, cfg.head_size)]]
        head, trending_set = frozenset(trending_top[:cfg.head_size]), frozenset(trending_top)
        served = []
        ages: dict[str, float] = {}
        if self.item_ages is not None and cfg.policy.freshness_weight:
            ages = self.item_ages(list(dict.fromkeys(chain.from_iterable(
                rows.items for per in sources for rows in per.values()))))
        blended = blend_pass(sources, cfg.policy, ages, [
            # only as many as can reach the list: the re-rank pool (or k) past what is blocked
            (cfg.policy.pool_size(request.k) if cfg.rerank else request.k)
            + len(blocked) + len(dict(request.pins))  # one pin per position
            for request, blocked in zip(requests, blocked_of)])
        vectors = self._vectors(list(dict.fromkeys(chain.from_iterable(
            candidates.items for candidates in blended)))) if cfg.rerank else {}
        for request, candidates, blocked in zip(requests, blended, blocked_of):
            pins = {p: Candidate(item, 0.0, "pinned") for p, item in request.pins}
            if cfg.rerank:
                ranked = rerank(candidates, request.k, cfg.policy, seen=blocked, pins=pins,
                                head_items=head, vectors=vectors)
            else:
                ranked = [Candidate(*c) for c in islice(
                    (c for c in candidates if c[0] not in blocked), request.k)]
            items = [FeedItem(c.item_id, round(c.score, 6), c.reason, p)
                     for p, c in enumerate(ranked)]
            policy = "greedy"
            if self.explorer is not None:
                pool = ExplorationPool(trending_top, trending_set, blocked)
                pinned = frozenset(p for p, c in enumerate(ranked) if c.reason == "pinned")
                policy = self.explorer.name
                # only reserved positions are decided: every other item keeps propensity 1
                for slot in self.explorer.choose([c.item_id for c in ranked], pool, pinned):
                    item = items[slot.position]
                    item.propensity = round(slot.propensity, 6)
                    if slot.explored:
                        item.item_id, item.reason, item.score = slot.item_id, "exploring", 0.0
            served.append(Feed(request.user_id, items, uuid.uuid4().hex, now, source,
                               cfg.model_version, policy))
        return served

    def _vectors(self, items: list[str]) -> dict[str, np.ndarray]:
        if self.ann is None or not items:
            return {}
        vectors, found = self.ann.vectors(items)
        return {i: v for i, v, ok in zip(items, vectors, found) if ok}
