"""Exploration over reserved slots, with logged propensities.

A served list has ``k`` positions; ``reserved`` of them may be given to exploration. For each
position the policy records the probability with which *that item* would have been placed
there (the propensity off-policy estimators divide by).

* :class:`EpsilonGreedy` — at each reserved position, with probability ``ε`` the ranked item is
  replaced by a uniform draw from the exploration pool (items not already in the list).
  Propensity of the shown item: ``(1 − ε) + ε/|pool|`` if it is the ranked item (and in the
  pool), ``ε/|pool|`` if explored, exact.
* :class:`ThompsonSampling` — Beta-Bernoulli per item (clicks / shows); each reserved position
  takes the pool item with the highest sampled CTR. The propensity (probability that item
  wins the draw) has no closed form: it is estimated from ``propensity_draws`` extra samples.
  (river's ``bandit.ThompsonSampling`` picks one arm per call and exposes no propensities, so
  the maths is here, in numpy.) Counts come from ``counts`` — in memory by default; live, the
  Redis hashes the worker (engagements) and the feed builder (shows) keep.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(slots=True)
class Slot:
    item_id: str
    position: int
    propensity: float
    explored: bool


class ExplorationPool:
    """What exploration may show in one list: ``top`` (the trending top: distinct items, in
    order; ``top_set`` the same as a set, shared by a pass's lists) less ``blocked``. Counted
    and tested from sets, listed in order only when an item must be drawn: most reserved
    positions keep their ranked item. Iterates as the list would."""

    def __init__(self, top: list[str], top_set: frozenset[str],
                 blocked: frozenset[str]) -> None:
        self.top, self.top_set, self.blocked = top, top_set, blocked
        self._items: list[str] | None = None

    def __len__(self) -> int:
        return len(self.top) - len(self.blocked & self.top_set)

    def __contains__(self, item: str) -> bool:
        return item in self.top_set and item not in self.blocked

    def __iter__(self):
        if self._items is None:
            self._items = [i for i in self.top if i not in self.blocked]
        return iter(self._items)


class _ReservedSlots:
    """Walks the reserved positions of a list; subclasses choose what each one shows."""

    reserved: tuple[int, ...]

    def apply(self, ranked: list[str], pool: list[str],
              fixed: frozenset[int] = frozenset()) -> list[Slot]:
        """Slots for ``ranked``; positions in ``fixed`` (pins) are never explored."""
        slots = [Slot(item, p, 1.0, False) for p, item in enumerate(ranked)]
        for slot in self.choose(ranked, pool, fixed):
            slots[slot.position] = slot
        return slots

    def choose(self, ranked: list[str], pool: list[str],
               fixed: frozenset[int] = frozenset()) -> list[Slot]:
        """:meth:`apply`'s slots at the positions it decides (reserved, not fixed, with an
        option to draw from); every other position shows its ranked item, propensity 1."""
        shown, chosen = list(ranked), []
        for position in self.reserved:
            if position < len(shown) and position not in fixed:
                slot = self._choose(position, shown, pool)
                if slot is not None:
                    shown[position] = slot.item_id
                    chosen.append(slot)
        return chosen

    def _choose(self, position: int, shown: list[str], pool: list[str]) -> Slot | None:
        raise NotImplementedError


class EpsilonGreedy(_ReservedSlots):
    name = "epsilon-greedy"

    def __init__(self, epsilon: float = 0.1, reserved: tuple[int, ...] = (3, 7),
                 seed: int | None = None) -> None:
        if not 0.0 <= epsilon <= 1.0:
            raise ValueError("epsilon must be in [0, 1]")
        self.epsilon, self.reserved = epsilon, reserved
        self.rng = np.random.default_rng(seed)

    def _choose(self, position, shown, pool):
        ranked_item = shown[position]
        listed = set(shown)
        # the options: the pool's items not listed, and the ranked item where the pool has it
        n_options = len(pool) - sum(1 for i in listed if i != ranked_item and i in pool)
        if not n_options:
            return None
        share = self.epsilon / n_options
        if self.rng.random() < self.epsilon:
            options = [i for i in pool if i not in listed or i == ranked_item]
            pick = options[self.rng.integers(n_options)]
            p = share + ((1 - self.epsilon) if pick == ranked_item else 0.0)
            return Slot(pick, position, p, pick != ranked_item)
        p = (1 - self.epsilon) + (share if ranked_item in pool else 0.0)
        return Slot(ranked_item, position, p, False)


class ThompsonSampling(_ReservedSlots):
    name = "thompson-sampling"

    def __init__(self, reserved: tuple[int, ...] = (3, 7), prior: tuple[float, float] = (1, 20),
                 propensity_draws: int = 1000, seed: int | None = None, counts=None) -> None:
        self.reserved, self.prior, self.draws = reserved, prior, propensity_draws
        self.clicks: dict[str, float] = {}
        self.shows: dict[str, float] = {}
        self.counts = counts or self._memory_counts  # items → (clicks, shows) arrays
        self.rng = np.random.default_rng(seed)

    def _memory_counts(self, items: list[str]) -> tuple[np.ndarray, np.ndarray]:
        return (np.array([self.clicks.get(i, 0.0) for i in items]),
                np.array([self.shows.get(i, 0.0) for i in items]))

    def update(self, item: str, clicked: bool) -> None:
        self.shows[item] = self.shows.get(item, 0.0) + 1.0
        self.clicks[item] = self.clicks.get(item, 0.0) + float(clicked)

    def _params(self, items: list[str]) -> tuple[np.ndarray, np.ndarray]:
        c, s = self.counts(items)
        c = np.minimum(c, s)  # an engagement logged without its show cannot exceed shows
        return self.prior[0] + c, self.prior[1] + s - c

    def win_probabilities(self, items: list[str]) -> np.ndarray:
        return self._win_probabilities(*self._params(items))

    def _win_probabilities(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        samples = self.rng.beta(a, b, size=(self.draws, len(a)))
        return np.bincount(samples.argmax(axis=1), minlength=len(a)) / self.draws

    def _choose(self, position, shown, pool):
        listed = set(shown)
        options = [i for i in pool if i not in listed]
        if not options:
            return None
        a, b = self._params(options)  # one read of the counts per slot
        pick = int(np.argmax(self.rng.beta(a, b)))
        propensity = float(self._win_probabilities(a, b)[pick])
        return Slot(options[pick], position, max(propensity, 1.0 / self.draws), True)
