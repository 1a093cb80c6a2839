"""Nearline candidate sources: the trainer's CURRENT version of a PyTorch model, served.

* ``ann_two_tower``: the user tower runs per request on CPU (over the user's recent items);
  the version's item-tower vectors sit in an HNSW index (:class:`serving.ann.AnnIndex`) built
  when the version loads, so a described item nobody clicked yet is retrievable as soon as a
  version that knows its description is CURRENT.
* ``gru4rec`` and ``sasrec``: the GRU (or the self-attention blocks) run over the recent
  items (the session prefix) and score every item the version knows (a softmax, no index
  needed).

Each checks ``CURRENT`` at most every ``check_s``; a rollback (``streamrec trainer
--rollback``) is picked up the same way. A changed version loads on a background thread
(weights, then the HNSW index of its items): requests keep the version they have until the
new one is whole, and never wait for a load. No version loaded yet: no candidates.
"""

from __future__ import annotations

import logging
import threading
import time

import numpy as np

from online_models.base import Query, Recommendations
from online_models.registry import NEARLINE_MODELS
from serving.ann import AnnIndex
from stream.trainer import Checkpoints

log = logging.getLogger("streamrec.nearline")
#: serving source name → the trainer's model it serves (two-tower's vectors through an index)
NEARLINE_SOURCES = {"ann_two_tower" if model == "two_tower" else model: model
                    for model in NEARLINE_MODELS}


class NearlineSource:
    def __init__(self, trainer_dir: str, model_name: str = "two_tower",
                 check_s: float = 5.0) -> None:
        self.checkpoints = Checkpoints(trainer_dir, model_name)
        self.model_name, self.check_s = model_name, check_s
        self.version: int | None = None
        self._model = self._index = None
        self._checked = 0.0
        self._lock = threading.Lock()
        self._loader: threading.Thread | None = None
        self._refresh_in_background()  # the version CURRENT names, loading from the start

    def refresh(self) -> None:
        """Load CURRENT now (on the calling thread) if it changed since the last look."""
        from online_models.registry import build

        with self._lock:
            self._checked = time.monotonic()
            current = self.checkpoints.current()
            if current is None or current == self.version:
                return
            try:
                state, meta = self.checkpoints.load(current)
            except (OSError, ValueError, RuntimeError) as exc:  # pruned or half-written
                log.warning("%s version %s not loaded: %r", self.model_name, current, exc)
                return
            model = build(self.model_name)
            model.load_version(state, meta)
            index = None
            if hasattr(model, "query_vectors"):  # a two-tower: retrieval through HNSW
                _, _, items, vectors = model.export_version()
                index = AnnIndex(vectors.shape[1], capacity=max(len(items), 1))
                index.upsert(items, vectors.astype(np.float32))
            old, self._model, self._index, self.version = self._index, model, index, current
            if old is not None:
                old.close()
            log.info("%s version %d loaded (%d items)", self.model_name, current,
                     len(meta["items"]))

    def _refresh_in_background(self) -> None:
        """Start :meth:`refresh` on a thread of its own unless one is running."""
        self._checked = time.monotonic()
        if self._loader is None or not self._loader.is_alive():
            self._loader = threading.Thread(target=self.refresh, daemon=True,
                                            name=f"load-{self.model_name}")
            self._loader.start()

    def wait_loaded(self, timeout_s: float = 60.0) -> None:
        """Wait for a background load in progress (tests, a warm-up at start)."""
        if self._loader is not None:
            self._loader.join(timeout_s)

    def recommend(self, queries: list[Query], k: int) -> list[Recommendations]:
        if time.monotonic() - self._checked >= self.check_s:
            self._refresh_in_background()
        model, index = self._model, self._index
        if model is None:
            return [Recommendations([], np.empty(0)) for _ in queries]
        if index is None:
            return model.recommend(list(queries), k)
        out = []
        for query, vector in zip(queries, model.query_vectors(list(queries))):
            if not vector.any():
                out.append(Recommendations([], np.empty(0)))
                continue
            items, scores = index.search(vector, k, exclude=query.exclude)
            out.append(Recommendations(items, scores + 1.0))  # cosine, shifted positive
        return out

    def close(self) -> None:
        if self._index is not None:
            self._index.close()
