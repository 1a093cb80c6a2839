"""Approximate nearest neighbours over item vectors that keep changing (hnswlib, inner product).

Churn is handled in three layers:

1. **In-place updates** — a moved vector is re-inserted under its label (hnswlib replaces it);
   new items are added, retired items are marked deleted.
2. **Exact re-scoring** — a query asks the graph for ``oversample × k`` candidates and
   re-scores them against the *current* vectors (a dense copy kept beside the graph), so a stale
   graph position costs recall only if an item falls out of the candidate set entirely.
3. **Rebuild and swap** — once the vectors moved since the last build exceed
   ``rebuild_after`` (a fraction of the index), a fresh graph is built from the current
   vectors on a background thread and swapped in atomically; updates that arrive meanwhile are
   replayed onto the new graph before the swap.

Snapshots (``save`` / ``load``) hold the graph, the vectors and the label map, so a restarted
server answers at once and then tails the item-vector topic from where the snapshot ended.

Example
-------
>>> import numpy as np
>>> index = AnnIndex(dim=4, capacity=10)
>>> index.upsert(["a", "b"], np.array([[1, 0, 0, 0], [0, 1, 0, 0]], np.float32))
>>> index.search(np.array([1, 0, 0, 0], np.float32), k=1)[0]
['a']
"""

from __future__ import annotations

import atexit
import os
import threading
import weakref
from collections import OrderedDict
from pathlib import Path

import hnswlib
import numpy as np


class AnnIndex:
    """Inner-product HNSW over ``item id → float32[dim]``; thread-safe (one lock)."""

    def __init__(self, dim: int, capacity: int = 100_000, m: int = 16, ef_construction: int = 200,
                 ef_search: int = 800, oversample: int = 4, rebuild_after: float = 0.05,
                 seed: int = 0, max_items: int | None = None, deterministic: bool = False
                 ) -> None:
        """``deterministic``: rebuilds run inline and inserts on one thread, so the same
        updates always make the same graph and answers (replay); otherwise rebuilds run in the
        background and inserts on every core (serving: queries never wait for a build)."""
        self.dim, self.m, self.ef_construction = dim, m, ef_construction
        self.deterministic = deterministic
        self.ef_search, self.oversample, self.rebuild_after = ef_search, oversample, rebuild_after
        self.seed = seed
        self.capacity = capacity
        self._lock = threading.RLock()
        self.max_items = max_items  # bound: the least recently updated item is evicted
        self._label: dict[str, int] = {}
        self._items: list[str | None] = []  # label → item (None: a free label)
        self._free: list[int] = []  # labels of evicted items, reused first
        self._recency: OrderedDict[str, None] = OrderedDict()  # live items, oldest update first
        self._vectors = np.zeros((capacity, dim), np.float32)
        self._live = np.zeros(capacity, bool)
        self._deleted = np.zeros(capacity, bool)  # marked deleted in the current graph
        self._graph = self._new_graph(capacity)
        self._moved_since_build = 0
        self._rebuilding: threading.Thread | None = None
        self._pending: list[tuple[str, np.ndarray, np.ndarray | None]] = []  # labels, vectors
        self.rebuilds = 0
        self._closed = False
        _OPEN_INDEXES.add(self)

    def __len__(self) -> int:
        return len(self._recency)

    # --- updates ---------------------------------------------------------------------------
    def upsert(self, items: list[str], vectors: np.ndarray) -> None:
        """Insert new items and move existing ones to their new vectors."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32).reshape(len(items), self.dim)
        with self._lock:
            known = sum(1 for item in items if item in self._label)
            labels = np.fromiter((self._assign(item) for item in items), np.int64, len(items))
            self._vectors[labels] = vectors
            self._live[labels] = True
            for item in items:
                self._recency[item] = None
                self._recency.move_to_end(item)
            self._moved_since_build += known  # moves degrade the graph; inserts do not
            if self.deterministic and self._rebuild_due():
                # a fresh graph of the current vectors, without re-inserting the moved first
                # (hnswlib's re-insert of a moved item costs more than its part of a build)
                self.rebuild()
                return
            # also undeletes a retired item's label
            self._graph.add_items(vectors, labels, num_threads=1 if self.deterministic else -1)
            self._deleted[labels] = False
            if self._rebuilding is not None:
                self._pending.append(("upsert", labels, vectors.copy()))
        self._maybe_rebuild()

    def delete(self, items: list[str]) -> None:
        """Retire items (tombstones on the item-vector topic); unknown ids are ignored."""
        with self._lock:
            for item in items:
                self._retire(item)

    def _retire(self, item: str) -> int | None:
        """Mark an item deleted (caller holds the lock); returns its label."""
        label = self._label.get(item)
        if label is not None and self._live[label]:
            self._live[label] = False
            self._graph.mark_deleted(label)
            self._deleted[label] = True
            self._recency.pop(item, None)
            if self._rebuilding is not None:
                self._pending.append(("delete", np.array([label], np.int64), None))
        return label

    def _assign(self, item: str) -> int:
        label = self._label.get(item)
        if label is not None:
            return label
        if self.max_items is not None and len(self._recency) >= self.max_items:
            evicted = next(iter(self._recency))
            self._free.append(self._retire(evicted))
            del self._label[evicted]
            self._items[self._free[-1]] = None
        if self._free:
            label = self._free.pop()
            self._items[label] = item
        else:
            label = len(self._items)
            if label >= self.capacity:
                self._grow(2 * self.capacity)
            self._items.append(item)
        self._label[item] = label
        return label

    def _grow(self, capacity: int) -> None:
        self._vectors = np.vstack([self._vectors,
                                   np.zeros((capacity - self.capacity, self.dim), np.float32)])
        self._live = np.concatenate([self._live, np.zeros(capacity - self.capacity, bool)])
        self._deleted = np.concatenate([self._deleted, np.zeros(capacity - self.capacity, bool)])
        self._graph.resize_index(capacity)
        self.capacity = capacity

    # --- queries ---------------------------------------------------------------------------
    def search(self, query: np.ndarray, k: int, exclude: frozenset[str] = frozenset()
               ) -> tuple[list[str], np.ndarray]:
        """Top-``k`` items by inner product with ``query``, scored on current vectors."""
        with self._lock:
            live = len(self)
            if live == 0:
                return [], np.empty(0, np.float32)
            fetch = min(live, (k + len(exclude)) * self.oversample)
            self._graph.set_ef(max(self.ef_search, fetch))
            try:
                labels, _ = self._graph.knn_query(np.asarray(query, np.float32).reshape(1, -1),
                                                  k=fetch)
                labels = labels[0].astype(np.int64)
            except RuntimeError:
                # hnswlib finds fewer than ``fetch`` neighbours when they are most of the index
                # (a long exclusion list on a small catalogue): score every live item exactly
                labels = np.flatnonzero(self._live)
            labels = labels[self._live[labels]]
            scores = self._vectors[labels] @ np.asarray(query, np.float32)
            names = [self._items[label] for label in labels.tolist()]  # labels get reused
        order = np.argsort(-scores, kind="stable")
        if exclude:
            allowed = np.fromiter((name not in exclude for name in names), bool, len(names))
            order = order[allowed[order]]
        order = order[:k]
        return [names[i] for i in order.tolist()], scores[order].astype(np.float32, copy=False)

    def vectors(self, items: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(current vectors, found mask) of ``items``."""
        with self._lock:
            labels = np.array([self._label.get(i, -1) for i in items], np.int64)
            found = labels >= 0
            found[found] = self._live[labels[found]]
            out = np.zeros((len(items), self.dim), np.float32)
            out[found] = self._vectors[labels[found]]
        return out, found

    # --- rebuild and swap --------------------------------------------------------------------
    def _new_graph(self, capacity: int) -> hnswlib.Index:
        graph = hnswlib.Index(space="ip", dim=self.dim)
        graph.init_index(max_elements=capacity, M=self.m, ef_construction=self.ef_construction,
                         random_seed=self.seed, allow_replace_deleted=False)
        graph.set_ef(self.ef_search)
        return graph

    def _rebuild_due(self) -> bool:
        return not self._closed and (self._moved_since_build
                                     > self.rebuild_after * max(len(self), 1))

    def _maybe_rebuild(self) -> None:
        """Start a background rebuild when one is due (a deterministic index rebuilds inline,
        in :meth:`upsert`)."""
        with self._lock:
            if not self._rebuild_due() or self._rebuilding is not None:
                return
            self._rebuilding = threading.Thread(target=self._background_rebuild,
                                                name="ann-rebuild", daemon=True)
            self._rebuilding.start()

    def _background_rebuild(self) -> None:
        _lower_thread_priority()  # the build yields the CPU to queries and updates
        self.rebuild()

    def rebuild(self) -> None:
        """Build a fresh graph from the current vectors and swap it in (blocking).

        Updates that race the build are replayed onto the new graph in passes outside the lock;
        only the last short pass (and the swap) holds it, so queries never wait for a replay.
        """
        with self._lock:
            labels = np.flatnonzero(self._live)
            vectors = self._vectors[labels].copy()
            self._moved_since_build = 0
            if self._rebuilding is None:  # called directly, not from _maybe_rebuild
                self._rebuilding = threading.current_thread()
            self._pending = []  # the snapshot already holds everything before this point
            capacity = self.capacity
        graph = self._new_graph(capacity)
        if len(labels):
            graph.add_items(vectors, labels, num_threads=1)  # one core stays with the queries
        in_graph = np.zeros(capacity, bool)
        in_graph[labels] = True
        deleted = np.zeros(capacity, bool)
        while True:
            with self._lock:
                batch, self._pending = self._pending, []
                if len(batch) <= 256:
                    graph, in_graph, deleted = self._replay(graph, batch, in_graph, deleted)
                    self._graph, self._deleted = graph, deleted
                    self._rebuilding = None
                    self.rebuilds += 1
                    return
            graph, in_graph, deleted = self._replay(graph, batch, in_graph, deleted)

    def _replay(self, graph, ops, in_graph, deleted):
        """Apply queued (op, items, vectors) to a graph under construction, in order."""
        capacity = self.capacity  # may have grown meanwhile
        if len(in_graph) < capacity:
            graph.resize_index(capacity)
            in_graph = np.concatenate([in_graph, np.zeros(capacity - len(in_graph), bool)])
            deleted = np.concatenate([deleted, np.zeros(capacity - len(deleted), bool)])
        for op, ids, vecs in ops:
            if op == "upsert":
                graph.add_items(vecs, ids)  # also undeletes
                in_graph[ids] = True
                deleted[ids] = False
            else:
                for label in ids.tolist():
                    if in_graph[label] and not deleted[label]:
                        graph.mark_deleted(label)
                        deleted[label] = True
        return graph, in_graph, deleted

    def wait_for_rebuild(self, timeout_s: float = 60.0) -> None:
        thread = self._rebuilding
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout_s)

    def close(self) -> None:
        """Start no more background rebuilds and wait for the one running, if any.

        A rebuild thread still inside hnswlib when the interpreter exits is torn down in native
        code, which aborts the process ("terminate called without an active exception", exit
        134); every open index is therefore also closed at interpreter exit."""
        with self._lock:
            self._closed = True
        self.wait_for_rebuild(timeout_s=600.0)
        _OPEN_INDEXES.discard(self)

    # --- snapshots -------------------------------------------------------------------------
    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with self._lock:
            self._graph.save_index(str(directory / "graph.bin"))
            np.savez(directory / "state.npz", vectors=self._vectors[:len(self._items)],
                     recency=np.array(list(self._recency), dtype=object),
                     live=self._live[:len(self._items)],
                     deleted=self._deleted[:len(self._items)],
                     items=np.array(self._items, dtype=object), dim=self.dim)

    @classmethod
    def load(cls, directory: str | Path, **options) -> "AnnIndex":
        directory = Path(directory)
        state = np.load(directory / "state.npz", allow_pickle=True)
        items = state["items"].tolist()
        index = cls(dim=int(state["dim"]), capacity=max(len(items), 1) * 2, **options)
        index._items = items
        index._label = {item: n for n, item in enumerate(items) if item is not None}
        index._free = [n for n, item in enumerate(items) if item is None]
        index._recency = OrderedDict.fromkeys(state["recency"].tolist())
        index._vectors[:len(items)] = state["vectors"]
        index._live[:len(items)] = state["live"]
        index._deleted[:len(items)] = state["deleted"]
        graph = hnswlib.Index(space="ip", dim=index.dim)
        graph.load_index(str(directory / "graph.bin"), max_elements=index.capacity)
        graph.set_ef(index.ef_search)
        index._graph = graph
        return index


_OPEN_INDEXES: "weakref.WeakSet[AnnIndex]" = weakref.WeakSet()


@atexit.register
def _close_open_indexes() -> None:
    for index in list(_OPEN_INDEXES):
        index.close()


def _lower_thread_priority(niceness: int = 10) -> None:
    """Raise this thread's nice value (Linux schedules threads as tasks); no-op elsewhere."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), niceness)
    except (AttributeError, OSError):
        pass
