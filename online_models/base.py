"""The model interface: learn from a batch, recommend top-k for a batch of queries.

A :class:`Query` is what a live request or a replay step knows: the user and the current
session's items (oldest first). Models take hyperparameters in the constructor and their state
store in :meth:`OnlineModel.bind` (memory for replay, Redis live); randomness only via ``seed``.
"""

from __future__ import annotations

import hashlib
import os
import threading
from itertools import chain
from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple, Sequence

import numpy as np
import scipy.sparse as sp

from online_models.kernels import codes_of_hashes, top_k_rows
from online_models.signals import SignalBatch
from online_models.store import MemoryStore, StateStore, grown

if TYPE_CHECKING:
    from schemas.items import ItemRecord


@dataclass(frozen=True)
class Query:
    user_id: str
    session_items: tuple[str, ...] = ()
    exclude: frozenset[str] = field(default_factory=frozenset)


@dataclass
class Recommendations:
    items: list[str]
    scores: np.ndarray
    #: per item, the query item that contributed most, where the model explains (else None)
    sources: list[str] | None = None


@dataclass
class LearnReport:
    """What a learn step changed (the ANN index consumes ``changed_item_vectors``)."""

    events: int = 0
    changed_item_vectors: list[str] = field(default_factory=list)


@dataclass
class RetrainSchedule:
    """When a nearline model trains its next version, counted in event time (what a trainer
    process does live, so replay scores the same schedule): every ``every`` examples, and
    the first version as soon as ``min_examples`` are held. Where ``tune_every`` is set, a
    version is also fine-tuned from the last one every ``tune_every`` examples in between."""

    every: int
    min_examples: int
    tune_every: int = 0
    since: int = 0
    since_tune: int = 0
    version: int = 0
    #: no version while set (a trainer rebuilding its window, or learning a backlog first)
    paused: bool = False

    def add(self, examples: int) -> None:
        self.since += examples
        self.since_tune += examples

    def due(self, held: int) -> bool:
        return (not self.paused and held >= self.min_examples
                and (self.since >= self.every or self.version == 0))

    def tune_due(self) -> bool:
        return (not self.paused and self.version > 0 and self.tune_every > 0
                and self.since_tune >= self.tune_every)

    def resume(self, after_version: int) -> None:
        """Number the next version ``after_version + 1`` and make it due at once (a trainer
        that restarted: its window is rebuilt, its kept versions are older)."""
        self.version, self.since, self.paused = after_version, self.every, False

    def published(self) -> None:
        self.version += 1
        self.since = self.since_tune = 0

    def tuned(self) -> None:
        self.version += 1
        self.since_tune = 0


class OnlineModel(ABC):
    """Base class: subclasses implement ``_learn`` and ``_recommend``."""

    name = "model"
    #: tables of partition-local rows (``StateStore.get_local_rows``): one writer each
    local_tables: tuple[str, ...] = ()
    #: tables of a few very long rows (a catalogue: up to ``max_items`` members): kept as
    #: sorted sets and written member by member even by a single writer, which writes other
    #: rows whole (a catalogue rewritten per commit would be megabytes)
    sorted_set_tables: tuple[str, ...] = ()
    #: partition-local row tables keyed by user or by session key (its id, or the user's where
    #: events carry none), and vector tables keyed by user: what :meth:`forget` deletes
    user_tables: tuple[str, ...] = ()
    user_vector_tables: tuple[str, ...] = ()
    #: whether learning claims shared rows (``StateStore.claim``: first writer wins, at once),
    #: which item-side owners cannot take as delta records (docs/item-ownership.md)
    claims_shared_rows = False

    def __init__(self) -> None:
        self.store: StateStore = MemoryStore()

    def bind(self, store: StateStore) -> "OnlineModel":
        """Keep learned state in ``store`` (returns self)."""
        self.store = store
        return self

    def prefetch(self, batch: SignalBatch) -> None:
        """Read now what learning ``batch`` will read (optional; the store decides what it
        keeps: a worker prefetches before the previous batch's commit starts)."""

    def learn(self, batch: SignalBatch) -> LearnReport:
        if len(batch) == 0:
            return LearnReport()
        return self._learn(batch)

    def forget(self, keys: Sequence[str]) -> None:
        """Delete what this model holds of these users and sessions (an erasure request:
        :attr:`schemas.events.Erasure.keys`). Item-side state learned from their events
        stays: aggregates over many users (docs/events.md#erasure)."""
        for table in self.user_tables:
            self.store.delete_local_rows(table, keys)
        for table in self.user_vector_tables:
            self.store.delete_local_vectors(table, keys)

    def remove_from_item_rows(self, keys: Sequence[str], local_table: str,
                              item_table: str) -> None:
        """Take ``keys`` (users, sessions) out of the ``item_table`` rows of the items their
        ``local_table`` rows hold (before :meth:`forget` deletes those rows)."""
        gone: dict[str, list[str]] = {}
        for key, row in zip(keys, self.store.get_local_rows(local_table, keys)):
            for item in row:
                gone.setdefault(item, []).append(key)
        if gone:
            self.store.remove_members(item_table, gone)

    def learn_items(self, records: Sequence["ItemRecord"]) -> int:
        """Learn item descriptions (the ``items`` topic); returns how many items changed.
        Only content-aware models override it."""
        return 0

    def recommend(self, queries: Sequence[Query], k: int) -> list[Recommendations]:
        """Top-``k`` items per query, best first, never an item in ``query.exclude``."""
        if not queries:
            return []
        return self._recommend(list(queries), k)

    def close(self) -> None:
        """Stop background work (threads, native indexes) before the process exits; the
        model is not used afterwards. Models with nothing running need not override it."""

    @abstractmethod
    def _learn(self, batch: SignalBatch) -> LearnReport: ...

    @abstractmethod
    def _recommend(self, queries: list[Query], k: int) -> list[Recommendations]: ...


def vocabulary(*row_groups) -> dict[str, int]:
    """A column per distinct member of the rows (``{member: column}``, first seen first)."""
    members = dict.fromkeys(chain.from_iterable(chain.from_iterable(row_groups)))
    return dict(zip(members, range(len(members))))


def factorize(values: np.ndarray) -> tuple[list, np.ndarray]:
    """(distinct values in first-seen order, code of each value): np.unique without sorting
    (about half its time on arrays of str)."""
    values = values.tolist()
    code = vocabulary([values])
    return list(code), np.fromiter(map(code.__getitem__, values), np.int64, len(values))


class ItemCodes:
    """Item names as dense integer codes, fixed for this object's life: rows kept between
    queries carry codes, and a query joins them with numpy instead of hashing every member
    again (:func:`joined_columns`). Thread-safe."""

    def __init__(self) -> None:
        self._code: dict[str, int] = {}
        self._names = np.empty(1024, dtype=object)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._code)

    def codes(self, names: Sequence[str]) -> np.ndarray:
        code = self._code
        new = [name for name in names if name not in code]
        if new:
            with self._lock:
                for name in new:
                    if name not in code:
                        n = len(code)
                        self._names = grown(self._names, n + 1, None)
                        self._names[n] = name
                        code[name] = n
        return np.fromiter(map(code.__getitem__, names), np.int64, len(names))

    def names(self, codes: np.ndarray) -> np.ndarray:
        """The names of ``codes`` (an object array)."""
        return self._names[codes]

    def known(self, names: Sequence[str]) -> np.ndarray:
        """The codes of ``names``; -1 for a name never coded (none is added)."""
        get = self._code.get
        return np.fromiter((get(name, -1) for name in names), np.int64, len(names))


def item_hash(name: str) -> int:
    """A 64-bit hash of an item name, the same in every process (BLAKE2b): how rows shared
    between processes name their members without strings. Two of a million names collide with
    odds of ~3·10⁻⁸."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little")


class ItemHashes:
    """:func:`item_hash` of the names of an :class:`ItemCodes`, both ways: the hashes of codes
    (each computed once), and the codes of hashes seen before (a sorted array: one vectorised
    lookup for a whole row). Thread-safe."""

    def __init__(self, codes: ItemCodes) -> None:
        self.item_codes = codes
        self._of_code = np.zeros(0, np.uint64)
        self._hashed = np.zeros(0, bool)
        # (hashes of the codes hashed, sorted; their codes): replaced whole, never changed
        self._index = (np.zeros(0, np.uint64), np.zeros(0, np.int64))
        self._lock = threading.Lock()

    def of_codes(self, codes: np.ndarray) -> np.ndarray:
        """The hashes of ``codes`` (uint64)."""
        with self._lock:
            size = int(codes.max(initial=-1)) + 1
            self._of_code, self._hashed = grown(self._of_code, size, 0), grown(
                self._hashed, size, False)
            new = np.unique(codes[~self._hashed[codes]])
            if len(new):
                hashes = np.fromiter(map(item_hash, self.item_codes.names(new)), np.uint64,
                                     len(new))
                self._of_code[new], self._hashed[new] = hashes, True
                known, known_codes = self._index
                known = np.concatenate((known, hashes))
                order = np.argsort(known, kind="stable")
                self._index = known[order], np.concatenate((known_codes, new))[order]
            return self._of_code[codes]

    def codes_of(self, hashes: np.ndarray) -> np.ndarray:
        """The codes of ``hashes``; -1 for a hash of no name seen here yet."""
        known, codes = self._index
        return codes_of_hashes(known, codes, hashes)


class CodedRow(NamedTuple):
    """A row with its members as :class:`ItemCodes` codes."""

    codes: np.ndarray
    values: np.ndarray


class Columns:
    """A dense block's columns: their item names, and the column of any name. Where the
    columns came from :class:`ItemCodes` codes, names are found through the codes (a pass's
    blocks have thousands of columns: a dict of them all cost more than scoring them)."""

    __slots__ = ("names", "_codes", "_item_codes", "_index")

    def __init__(self, names: np.ndarray, codes: np.ndarray | None = None,
                 item_codes: ItemCodes | None = None, index: dict[str, int] | None = None
                 ) -> None:
        self.names, self._codes, self._item_codes, self._index = names, codes, item_codes, index

    def __len__(self) -> int:
        return len(self.names)

    def find(self, names: Sequence[str]) -> np.ndarray:
        """Each name's column; -1 for a name that is not one."""
        if self._codes is None:
            if self._index is None:
                self._index = dict(zip(self.names.tolist(), range(len(self.names))))
            get = self._index.get
            return np.fromiter((get(name, -1) for name in names), np.int64, len(names))
        wanted = self._item_codes.known(names)
        scratch = _scratch_by_code(int(max(self._codes.max(initial=-1),
                                           wanted.max(initial=-1))) + 1)
        scratch[self._codes] = np.arange(len(self._codes))
        found = scratch[np.maximum(wanted, 0)]
        scratch[self._codes] = _UNSET  # left as found (see joined_columns)
        return np.where((wanted >= 0) & (found != _UNSET), found, -1)


def named_rows(rows: list[dict[str, float]]) -> tuple[Columns, "RowArrays"]:
    """(the rows' members, first seen first; the rows over them as :class:`RowArrays`)."""
    vocab = vocabulary(rows)
    return Columns(np.array(list(vocab), dtype=object), index=vocab), RowArrays.of(rows, vocab)


def joined_columns(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distinct codes, each entry's column): the columns number the distinct codes in order
    of first appearance, as :func:`vocabulary` numbers names (so ties break alike). Codes are
    dense non-negative integers (:class:`ItemCodes`): found in linear time through arrays
    indexed by code, without sorting (a pass's kNN rows join ~200k entries: 1 ms, not 14)."""
    if not len(codes):
        return codes, np.empty(0, np.int64)
    positions = np.arange(len(codes))
    first = _scratch_by_code(int(codes.max()) + 1)
    np.minimum.at(first, codes, positions)  # each code's first position
    distinct = codes[np.flatnonzero(first[codes] == positions)]  # in order of first appearance
    first[distinct] = np.arange(len(distinct))  # reused: a column per distinct code
    columns = first[codes]
    first[distinct] = _UNSET  # left as found: the next call touches only its own codes
    return distinct, columns


_UNSET = np.iinfo(np.int64).max
_SCRATCH = threading.local()


def _scratch_by_code(size: int) -> np.ndarray:
    """This thread's array of at least ``size`` entries, every one :data:`_UNSET`: kept
    between calls (codes reach a million in a long-lived process, and allocating 8 MB a call
    cost more than the join)."""
    _SCRATCH.array = grown(getattr(_SCRATCH, "array", np.empty(0, np.int64)), size, _UNSET)
    return _SCRATCH.array


def joined_rows(item_codes: ItemCodes, *groups: Sequence[CodedRow]
                ) -> tuple[Columns, list["RowArrays"]]:
    """(the members of all the groups' rows, first seen first; each group as
    :class:`RowArrays` over them): :func:`named_rows` for rows kept as codes."""
    distinct, columns = joined_columns(np.concatenate(
        [np.empty(0, np.int64), *(row.codes for group in groups for row in group)]))
    out, entry = [], 0
    for group in groups:
        starts = np.concatenate(([0], np.cumsum([len(row.codes) for row in group]))
                                ).astype(np.int64)
        end = entry + int(starts[-1])
        out.append(RowArrays(starts, columns[entry:end],
                             np.concatenate([np.empty(0), *(row.values for row in group)])))
        entry = end
    return Columns(item_codes.names(distinct), distinct, item_codes), out


class RowArrays(NamedTuple):
    """Rows over a vocabulary as flat arrays (CSR without the matrix: compiled loops and numpy
    read a query's few rows with no sparse-matrix set-up per call)."""

    starts: np.ndarray  # row r's entries: starts[r] .. starts[r + 1]
    cols: np.ndarray
    values: np.ndarray

    @classmethod
    def of(cls, rows: list[dict[str, float]], vocab: dict[str, int],
           binary: bool = False) -> "RowArrays":
        """The rows' members as columns of ``vocab``, with their values (``binary``: 1)."""
        lengths = [len(row) for row in rows]
        nnz = sum(lengths)
        return cls(np.concatenate(([0], np.cumsum(lengths))).astype(np.int64),
                   np.fromiter(map(vocab.__getitem__, chain.from_iterable(rows)), np.int64, nnz),
                   np.ones(nnz) if binary else
                   np.fromiter(chain.from_iterable(row.values() for row in rows), float, nnz))

    def scaled_to_peak(self) -> "RowArrays":
        """Each row divided by its largest value (so its peak is 1)."""
        lengths = np.diff(self.starts)
        peaks = np.zeros(len(lengths))
        full = np.flatnonzero(lengths)
        peaks[full] = np.maximum.reduceat(self.values, self.starts[full])
        return self._replace(values=self.values / np.repeat(np.where(peaks > 0, peaks, 1.0),
                                                            lengths))


def rows_matrix(rows: list[dict[str, float]], vocab: dict[str, int],
                binary: bool = False) -> sp.csr_matrix:
    """CSR matrix with one row per dict (columns from ``vocab``; ``binary``: values 1)."""
    flat = RowArrays.of(rows, vocab, binary)
    return sp.csr_matrix((flat.values, flat.cols, flat.starts), shape=(len(rows), len(vocab)))


def top_k_dense(item_ids: np.ndarray | Columns, block: np.ndarray, k: int,
                queries: Sequence[Query], columns: list | None = None
                ) -> list[Recommendations]:
    """Top-``k`` positive scores of each row of a dense block (one query per row), compiled.

    Ties are broken by column order; a query's ``exclude`` items are never returned. The block
    is modified in place (excluded cells zeroed). ``columns``: a list each row's chosen
    columns are appended to.
    """
    of = item_ids if isinstance(item_ids, Columns) else Columns(item_ids)
    excluded = [(row, item) for row, query in enumerate(queries) for item in query.exclude]
    if excluded:
        rows, names = zip(*excluded)
        cols = of.find(names)
        found = cols >= 0
        block[np.array(rows, np.int64)[found], cols[found]] = 0.0
    kk = min(k, block.shape[1])
    if kk == 0:
        if columns is not None:
            columns += [np.empty(0, np.int64)] * len(queries)
        return [Recommendations([], np.empty(0)) for _ in queries]
    best, scores, counts = top_k_rows(block, kk)
    names = of.names[best]
    counts = counts.tolist()
    if columns is not None:
        columns += [best[r, :n] for r, n in enumerate(counts)]
    return [Recommendations(names[r, :n].tolist(), scores[r, :n]) for r, n in enumerate(counts)]


def row_chunks(n_rows: int, n_cols: int, max_cells: int = 4_000_000):
    """Row ranges whose dense blocks hold at most ``max_cells`` scores."""
    step = max(1, max_cells // max(n_cols, 1))
    return [(start, min(start + step, n_rows)) for start in range(0, n_rows, step)]


_POOL: ThreadPoolExecutor | None = None


def parallel_chunks(work, chunks: list[tuple[int, int]]) -> list[Recommendations]:
    """Run ``work(chunk)`` over row chunks on a small thread pool (numpy and scipy release the
    GIL in the heavy parts), concatenating results in order. One chunk runs inline."""
    global _POOL
    if len(chunks) <= 1:
        return [rec for c in chunks for rec in work(c)]
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1),
                                   thread_name_prefix="recommend")
    return [rec for part in _POOL.map(work, chunks) for rec in part]


def torch_device(name: str):
    """The ``torch.device`` a nearline model trains on: ``cpu``, ``cuda`` (or ``cuda:N``), or
    ``auto`` (CUDA where a GPU is visible, else the CPU). ValueError if CUDA is asked for and
    none is visible: training never falls back silently."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"device {name!r}: {exc}") from None
    if device.type == "cuda":
        visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= visible:
            raise ValueError(f"device {name!r}: torch {torch.__version__} sees "
                             f"{visible} CUDA GPU(s) (use cpu or auto)")
    elif device.type != "cpu":
        raise ValueError(f"device {name!r}: only cpu, cuda[:N] or auto")
    return device


class NearlineModel(OnlineModel):
    """A model trained in versions on a window of its own (:class:`RetrainSchedule`), by the
    trainer process live and in event time by the replay; a version exports as tensors plus
    JSON-able metadata (a checkpoint) and loads back to give the same answers. Training runs
    on ``device`` (:func:`torch_device`); a published version always lives on the CPU, where
    serving runs it."""

    schedule: RetrainSchedule
    device: str = "cpu"

    @property
    def version(self) -> int:
        return self.schedule.version

    @property
    @abstractmethod
    def examples_held(self) -> int:
        """Examples in the training window now (what :meth:`RetrainSchedule.due` weighs)."""

    @abstractmethod
    def train(self) -> None:
        """Train on the window and publish the result as the next version."""

    def finetune(self) -> None:
        """Fine-tune the last version on what arrived since and publish it as the next
        (models whose schedule sets ``tune_every``)."""
        raise NotImplementedError(f"{self.name} has no fine-tuned versions")

    def train_if_due(self) -> bool:
        """Train (or fine-tune) the next version now if the schedule says so; whether it
        did."""
        if self.schedule.due(self.examples_held):
            self.train()
        elif self.schedule.tune_due():
            self.finetune()
        else:
            return False
        return True

    @abstractmethod
    def export_version(self) -> tuple[dict, dict, list[str], np.ndarray] | None:
        """(``state_dict``, metadata, item ids, item vectors); None before the first."""

    @abstractmethod
    def load_version(self, state: dict, meta: dict) -> None: ...
