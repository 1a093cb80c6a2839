"""Which changed item vectors are worth publishing.

Online MF nudges every item a batch touches, so at 10,000 events/s thousands of vectors "change"
each second by tiny steps — more than an HNSW index can re-insert (~0.5 ms each). A vector is
published when it is new or has moved by more than ``min_change`` (relative L2 distance)
since the version last published; the index's exact re-scoring then works on vectors at most
that far from the live ones. The memory of published versions is bounded (least recently
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


class MovedVectors:
    def __init__(self, min_change: float = 0.05, max_items: int = 200_000) -> None:
        self.min_change, self.max_items = min_change, max_items
        self._published: OrderedDict[str, np.ndarray] = OrderedDict()

    def select(self, items: list[str], vectors: np.ndarray) -> list[int]:
        """Indices of the vectors to publish now (and remember as published)."""
        chosen = []
        for n, (item, vector) in enumerate(zip(items, vectors)):
            last = self._published.get(item)
            if last is not None:
                moved = float(np.linalg.norm(vector - last))
                if moved <= self.min_change * max(float(np.linalg.norm(last)), 1e-12):
                    continue
            chosen.append(n)
            self._published[item] = vector.copy()
            self._published.move_to_end(item)
        while len(self._published) > self.max_items:
            self._published.popitem(last=False)
        return chosen
