"""Time-decayed popularity ("trending") with forward decay.

Forward decay (Cormode et al., ICDE 2009) keeps each item's score as
``S = Σ w_i · 2^((t_i − L)/h)`` for a fixed landmark ``L`` and half-life ``h``. Adding an
event touches one item only — no global decay pass — and the decayed value at time ``now`` is
``S · 2^(−(now − L)/h)``, the same factor for every item, so the ranking is the order of ``S``.
When ``(t − L)/h`` grows large the store rescales every score by ``2^(−(t − L)/h)`` and moves
``L`` to ``t`` (:func:`advance_landmark`, :data:`REBASE_AFTER_HALF_LIVES`) to stay far from
float overflow, so logs spanning decades with a half-life of an hour stay finite.

Example
-------
>>> import numpy as np
>>> items, deltas = batch_deltas(np.array(["a", "b", "a"]), np.array([0.0, 0.0, 3600.0]),
...                              np.ones(3), reference_ts=0.0, half_life_s=3600.0)
>>> dict(zip(items.tolist(), deltas.tolist()))
{'a': 3.0, 'b': 1.0}
"""

from __future__ import annotations

from types import MappingProxyType

import numpy as np

#: How much each event type adds to an item's trending score.
TRENDING_WEIGHTS = MappingProxyType({
    "impression": 0.0, "click": 1.0, "view": 0.5, "dwell": 1.0, "skip": 0.0, "like": 2.0,
    "dislike": 0.0, "add_to_cart": 3.0, "purchase": 5.0,
})

#: Rescale scores and move the landmark once the newest event is this many half-lives past it.
REBASE_AFTER_HALF_LIVES = 64.0


def batch_deltas(items: np.ndarray, timestamps: np.ndarray, weights: np.ndarray,
                 reference_ts: float, half_life_s: float) -> tuple[np.ndarray, np.ndarray]:
    """Aggregate a batch into one delta per distinct item, relative to ``reference_ts``.

    The store multiplies each delta by ``2^((reference_ts − L)/h)`` for its landmark ``L``.
    Events of weight 0 are dropped.
    """
    keep = weights != 0
    if not keep.any():
        return np.empty(0, dtype=items.dtype), np.empty(0)
    uniq, inverse = np.unique(items[keep], return_inverse=True)
    contributions = weights[keep] * np.exp2((timestamps[keep] - reference_ts) / half_life_s)
    return uniq, np.bincount(inverse, weights=contributions, minlength=len(uniq))


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
    >>> advance_landmark(0.0, 10_000.0, 10.0)[:2]
    (10000.0, 0.0)
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
