"""One documented mapping from raw events to implicit feedback (a :class:`SignalBatch`).

=================  ============================================================
event              signal weight (``SignalConfig`` defaults)
=================  ============================================================
click / view        ``click`` (1.0) / ``view`` (0.5), times the dwell confidence
dwell               like a click: confidence from ``dwell_ms``
skip                ``-skip`` (-1.0): explicit skip, or any dwell < ``skip_below_ms``
like                ``like`` (2.0)
add_to_cart         ``cart`` (3.0)
purchase            ``purchase`` (4.0)
dislike             ``-dislike`` (-2.0)
impression          ``-impression`` (-0.05): shown, not (yet) clicked: weak negative
=================  ============================================================

Dwell confidence is ``1 + dwell_alpha · log1p(d)`` where ``d`` is the dwell normalised by the
item's duration when known, else by the item's running mean dwell (an exponential moving
average kept here, bounded to ``max_tracked_items``). Positive weights are capped at
``max_weight``. The mapper is the only stateful piece; models consume the batch.

Example
-------
>>> from schemas.events import Interaction
>>> ev = [Interaction(event_id="1", user_id="u", item_id="i", type="click", timestamp=1e9,
...                   dwell_ms=2000)]
>>> SignalMapper().map(ev).weights.tolist()    # 2 s dwell is under the skip threshold
[-1.0]
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from schemas.events import Interaction


@dataclass(frozen=True)
class SignalConfig:
    click: float = 1.0
    view: float = 0.5
    like: float = 2.0
    cart: float = 3.0
    purchase: float = 4.0
    skip: float = 1.0
    dislike: float = 2.0
    impression: float = 0.05
    skip_below_ms: int = 5000
    dwell_alpha: float = 0.5
    max_weight: float = 8.0
    max_tracked_items: int = 100_000


@dataclass
class SignalBatch:
    """Column arrays for one batch of events, in stream order."""

    users: np.ndarray       # object array of str
    items: np.ndarray       # object array of str
    sessions: np.ndarray    # object array of str (user id when the event has no session)
    timestamps: np.ndarray  # float64, unix seconds
    weights: np.ndarray     # float64; < 0 is negative evidence
    types: np.ndarray       # object array of event types
    event_ids: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=object))

    def __len__(self) -> int:
        return len(self.items)

    @property
    def positive(self) -> np.ndarray:
        return self.weights > 0

    def select(self, mask: np.ndarray) -> "SignalBatch":
        return SignalBatch(self.users[mask], self.items[mask], self.sessions[mask],
                           self.timestamps[mask], self.weights[mask], self.types[mask],
                           self.event_ids[mask] if len(self.event_ids) else self.event_ids)


class SignalMapper:
    """Maps events to signal weights; keeps each item's running mean dwell (bounded LRU)."""

    def __init__(self, config: SignalConfig = SignalConfig()) -> None:
        self.config = config
        self.mean_dwell_ms: OrderedDict[str, float] = OrderedDict()

    def weight(self, event: Interaction) -> float:
        c = self.config
        kind = event.type
        if kind in ("click", "view", "dwell"):
            if event.dwell_ms is not None:
                if event.dwell_ms < c.skip_below_ms:
                    return -c.skip
                return min(c.max_weight, (c.view if kind == "view" else c.click)
                           * self._dwell_confidence(event))
            return c.view if kind == "view" else c.click
        return {"skip": -c.skip, "like": c.like, "add_to_cart": c.cart,
                "purchase": c.purchase, "dislike": -c.dislike,
                "impression": -c.impression}[kind]

    def _dwell_confidence(self, event: Interaction) -> float:
        dwell = float(event.dwell_ms)
        if event.item_duration_ms:
            norm = dwell / event.item_duration_ms
        else:
            mean = self.mean_dwell_ms.get(event.item_id, dwell)
            self.mean_dwell_ms[event.item_id] = 0.9 * mean + 0.1 * dwell
            self.mean_dwell_ms.move_to_end(event.item_id)
            if len(self.mean_dwell_ms) > self.config.max_tracked_items:
                self.mean_dwell_ms.popitem(last=False)
            norm = dwell / max(mean, 1.0)
        return 1.0 + self.config.dwell_alpha * float(np.log1p(norm))

    def map(self, events: list[Interaction]) -> SignalBatch:
        n = len(events)
        return SignalBatch(
            users=np.array([e.user_id for e in events], dtype=object),
            items=np.array([e.item_id for e in events], dtype=object),
            sessions=np.array([e.session_id or e.user_id for e in events], dtype=object),
            timestamps=np.fromiter((e.timestamp for e in events), float, n),
            weights=np.fromiter((self.weight(e) for e in events), float, n),
            types=np.array([e.type for e in events], dtype=object),
            event_ids=np.array([e.event_id for e in events], dtype=object))
