"""Time-decayed popularity ("trending") with forward decay.

Forward decay (Cormode et al., ICDE 2009) keeps each item's score as
``S = Σ w_i · 2^((t_i − L)/h)`` for a fixed landmark ``L`` and half-life ``h``. Adding an
event touches one item only — no global decay pass — and the decayed value at time ``now`` is
``S · 2^(−(now − L)/h)``, the same factor for every item, so the ranking is the order of ``S``.
When ``(t − L)/h`` grows large the store rescales every score by ``2^(−(t − L)/h)`` and moves
``L`` to ``t`` (:func:`advance_landmark`, :data:`REBASE_AFTER_HALF_LIVES`) to stay far from
float overflow, so logs spanning decades with a half-life of an hour stay finite.

:class:`TrendingModel` is the one implementation of trending and of each item's first-seen time:
replay learns it through a store, and the live worker writes the same model's
:meth:`TrendingModel.step` with a script (``stream/state.py``) that applies it as
:meth:`TrendingModel._learn` does (landmark step, add, trim).

Example
-------
>>> import numpy as np
>>> items, deltas = batch_deltas(np.array(["a", "b", "a"]), np.array([0.0, 0.0, 3600.0]),
...                              np.ones(3), reference_ts=0.0, half_life_s=3600.0)
>>> dict(zip(items.tolist(), deltas.tolist()))
{'a': 3.0, 'b': 1.0}
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping

import numpy as np

from online_models.base import LearnReport, OnlineModel, Query, Recommendations, factorize
from online_models.popularity import recommend_row
from online_models.signals import SignalBatch

#: How much each event type adds to an item's trending score.
TRENDING_WEIGHTS = MappingProxyType({
    "impression": 0.0, "click": 1.0, "view": 0.5, "dwell": 1.0, "skip": 0.0, "like": 2.0,
    "dislike": 0.0, "add_to_cart": 3.0, "purchase": 5.0,
})

#: Defaults of the live settings (``STREAMREC_TRENDING_HALF_LIFE_S``, ``…_MAX_ITEMS``) and replay.
#: 6 h: best of 10 min … 7 days on the YooChoose validation split, session and prequential
#: protocols alike (``bench/tune_trending.py``, docs/benchmarks.md).
DEFAULT_HALF_LIFE_S = 6 * 3600.0
DEFAULT_MAX_ITEMS = 10_000
#: First-seen times are kept for this many times ``max_items`` items (the newest).
FIRST_SEEN_PER_TRENDING_ITEM = 10

#: Rescale scores and move the landmark once the newest event is this many half-lives past it.
REBASE_AFTER_HALF_LIVES = 64.0


def batch_deltas(items: np.ndarray, timestamps: np.ndarray, weights: np.ndarray,
                 reference_ts: float, half_life_s: float) -> tuple[np.ndarray, np.ndarray]:
    """Aggregate a batch into one delta per distinct item (first seen first), relative to
    ``reference_ts``.

    The store multiplies each delta by ``2^((reference_ts − L)/h)`` for its landmark ``L``.
    Events of weight 0 are dropped.
    """
    distinct, codes = factorize(items)
    return _coded_deltas(np.asarray(distinct, dtype=items.dtype), codes, timestamps, weights,
                         reference_ts, half_life_s)


def _coded_deltas(distinct: np.ndarray, codes: np.ndarray, timestamps: np.ndarray,
                  weights: np.ndarray, reference_ts: float, half_life_s: float
                  ) -> tuple[np.ndarray, np.ndarray]:
    """:func:`batch_deltas` of items given as ``distinct[codes]`` (numbered once per batch)."""
    keep = weights != 0
    if not keep.any():
        return distinct[:0], np.empty(0)
    contributions = weights[keep] * np.exp2((timestamps[keep] - reference_ts) / half_life_s)
    present = np.unique(codes[keep])
    return distinct[present], np.bincount(codes[keep], weights=contributions,
                                          minlength=len(distinct))[present]


def advance_landmark(landmark: float | None, reference_ts: float, half_life_s: float
                     ) -> tuple[float, float, float]:
    """The forward-decay step for a batch whose deltas are relative to ``reference_ts``.

    Returns ``(landmark, rescale, factor)``: multiply every stored score by ``rescale``, keep
    scores against the returned landmark, and add each delta times ``factor``. The landmark
    moves to ``reference_ts`` once it is more than :data:`REBASE_AFTER_HALF_LIVES` half-lives
    old; a batch that much older than the landmark adds nothing (``factor`` 0: it weighs
    under 2^-64 of current events). The live trending script (``stream/state.py``) takes the
    same step in Lua, inside the transaction.

    >>> advance_landmark(None, 100.0, 10.0)
    (100.0, 1.0, 1.0)
    >>> advance_landmark(0.0, 100_000.0, 10.0)[:2]
    (100000.0, 0.0)
    """
    if landmark is None:
        return reference_ts, 1.0, 1.0
    age = (reference_ts - landmark) / half_life_s
    if age > REBASE_AFTER_HALF_LIVES:
        return reference_ts, 2.0 ** -min(age, 2000.0), 1.0  # underflows to 0.0, never raises
    if age < -REBASE_AFTER_HALF_LIVES:
        return landmark, 1.0, 0.0
    return landmark, 1.0, 2.0 ** age


def decayed(score: float | np.ndarray, landmark: float, now: float, half_life_s: float):
    """Decayed value at ``now`` of a forward-decayed score kept against ``landmark``."""
    return score * np.exp2(-(now - landmark) / half_life_s)


@dataclass(frozen=True)
class TrendingStep:
    """What one batch adds: forward-decayed deltas relative to ``reference`` (the batch's
    newest event time) and each item's earliest time in the batch."""

    reference: float
    items: np.ndarray
    deltas: np.ndarray
    first_seen: dict[str, float]


class TrendingModel(OnlineModel):
    """Trending: forward-decayed popularity weighted by event type (``TRENDING_WEIGHTS``: a
    purchase counts 5, a view 0.5, an impression 0), the same for everyone; and each item's
    first-seen time (serving's freshness). Live and replay run this class; tables: ``pop``
    (row ``all``: item → score against the landmark), ``meta`` (``landmark``), ``first``
    (row ``all``: item → first event time, the newest ``10 · max_items`` kept)."""

    name = "trending"
    sorted_set_tables = ("pop", "first")

    def __init__(self, half_life_s: float = DEFAULT_HALF_LIFE_S,
                 max_items: int = DEFAULT_MAX_ITEMS,
                 weights: Mapping[str, float] = TRENDING_WEIGHTS) -> None:
        super().__init__()
        self.half_life_s = half_life_s
        self.max_items = max_items
        self.weights = dict(weights)

    def step(self, batch: SignalBatch) -> TrendingStep:
        """The batch's update, independent of stored state (the live worker sends it)."""
        weight_of = self.weights.get
        weights = np.fromiter((weight_of(t, 0.0) for t in batch.types.tolist()), float,
                              len(batch))
        reference = float(batch.timestamps.max())
        seen, where = factorize(batch.items)
        items, deltas = _coded_deltas(np.asarray(seen, dtype=batch.items.dtype), where,
                                      batch.timestamps, weights, reference, self.half_life_s)
        earliest = np.full(len(seen), np.inf)
        np.minimum.at(earliest, where, batch.timestamps)
        return TrendingStep(reference, items, deltas, dict(zip(seen, earliest.tolist())))

    @property
    def first_seen_kept(self) -> int:
        """How many items' first-seen times are kept (the newest)."""
        return FIRST_SEEN_PER_TRENDING_ITEM * self.max_items

    def _learn(self, batch: SignalBatch) -> LearnReport:
        step = self.step(batch)
        stored = self.store.get_rows("meta", ["landmark"])[0].get("t")
        landmark, rescale, factor = advance_landmark(stored, step.reference, self.half_life_s)
        if rescale != 1.0:
            row = self.store.get_rows("pop", ["all"])[0]
            self.store.set_rows("pop", {"all": {item: score * rescale
                                                for item, score in row.items()}})
        if landmark != stored:
            self.store.set_rows("meta", {"landmark": {"t": landmark}})
        if factor and len(step.items):
            self.store.incr_rows("pop", {"all": dict(zip(
                step.items.tolist(), (step.deltas * factor).tolist()))},
                keep_top=self.max_items)
        known = self.store.get_rows("first", ["all"])[0]
        new = {item: ts for item, ts in step.first_seen.items() if item not in known}
        if new:
            self.store.set_rows("first", {"all": new}, keep_top=self.first_seen_kept)
        return LearnReport(events=len(batch))

    def top(self, k: int) -> list[tuple[str, float]]:
        """The ``k`` highest stored scores (against the landmark), ties by item."""
        row = self.store.get_rows("pop", ["all"])[0]
        return sorted(row.items(), key=lambda kv: (-kv[1], kv[0]))[:k]

    def first_seen(self, items: list[str]) -> dict[str, float]:
        """First event time of each of ``items`` that is known."""
        row = self.store.get_rows("first", ["all"])[0]
        return {item: row[item] for item in items if item in row}

    def _recommend(self, queries: list[Query], k: int) -> list[Recommendations]:
        return recommend_row(self.store.get_rows("pop", ["all"])[0], queries, k)
