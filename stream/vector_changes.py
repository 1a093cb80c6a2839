"""Which changed item vectors are worth publishing.

Online MF nudges every item a batch touches, so at 10,000 events/s thousands of vectors "change"
each second by tiny steps — more than an HNSW index can re-insert (~0.5 ms each). A vector is
published when it is new or has moved by more than ``min_change`` (relative L2 distance)
since the version last published; the index's exact re-scoring then works on vectors about
that far from the live ones. The worker publishes at most ``vector_publish_max`` per interval
(new items first, then the largest moves; the rest wait for the next interval), which bounds
what publishing costs it. The memory of published versions is bounded (least recently
published forgotten first: such an item is simply published again).

Example
-------
>>> import numpy as np
>>> moved = MovedVectors(min_change=0.1)
>>> moved.select(["a"], np.array([[1.0, 0.0]], np.float32))
[0]
>>> moved.select(["a"], np.array([[1.05, 0.0]], np.float32))  # 5 % off: not yet
[]
>>> moved.select(["a"], np.array([[1.2, 0.0]], np.float32))
[0]
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np


class PendingVectors:
    """Items whose vectors changed and wait to be published: never-published items first,
    then the rest, each oldest change first. Adding and taking cost O(items), not O(queue):
    at 10,000 events/s the queue can hold the whole catalogue."""

    def __init__(self, moved: "MovedVectors") -> None:
        self._moved = moved
        # OrderedDict: popping a plain dict from the front leaves dummies that every later
        # pop scans past (quadratic over a large backlog)
        self._new: OrderedDict[str, None] = OrderedDict()
        self._known: OrderedDict[str, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._new) + len(self._known)

    def add(self, items) -> None:
        for item in items:
            if item not in self._new and item not in self._known:
                queue = self._known if self._moved.is_published(item) else self._new
                queue[item] = None

    def take(self, n: int) -> list[str]:
        """Remove and return up to ``n`` items, in publishing order."""
        taken: list[str] = []
        for queue in (self._new, self._known):
            while queue and len(taken) < n:
                taken.append(queue.popitem(last=False)[0])
        return taken

    def clear(self) -> None:
        self._new.clear()
        self._known.clear()


class MovedVectors:
    def __init__(self, min_change: float = 0.05, max_items: int = 200_000) -> None:
        self.min_change, self.max_items = min_change, max_items
        self._published: OrderedDict[str, np.ndarray] = OrderedDict()

    def is_published(self, item: str) -> bool:
        return item in self._published

    def select(self, items: list[str], vectors: np.ndarray) -> list[int]:
        """Indices of the vectors to publish now (and remember as published)."""
        return self.select_limited(items, vectors, None)[0]

    def select_limited(self, items: list[str], vectors: np.ndarray, limit: int | None
                       ) -> tuple[list[int], list[int]]:
        """(indices to publish now, at most ``limit``; indices that qualify but must wait).
        New items go first, then the vectors that moved most; an item listed twice counts
        once (its first row)."""
        first_row: dict[str, int] = {}
        for n, item in enumerate(items):
            first_row.setdefault(item, n)
        first = list(first_row.values())
        last = [self._published.get(items[n]) for n in first]
        moves = np.full(len(first), np.inf)
        known = [k for k, vector in enumerate(last) if vector is not None]
        if known:
            before = np.stack([last[k] for k in known])
            now = np.asarray(vectors, np.float32)[[first[k] for k in known]]
            moves[known] = (np.linalg.norm(now - before, axis=1)
                            / np.maximum(np.linalg.norm(before, axis=1), 1e-12))
        qualifying = np.flatnonzero(moves > self.min_change)
        ranked = qualifying[np.argsort(-moves[qualifying], kind="stable")].tolist()
        cut = len(ranked) if limit is None else limit
        chosen = [first[k] for k in ranked[:cut]]
        for n in chosen:
            self._published[items[n]] = np.array(vectors[n], np.float32)
            self._published.move_to_end(items[n])
        while len(self._published) > self.max_items:
            self._published.popitem(last=False)
        return chosen, [first[k] for k in ranked[cut:]]
