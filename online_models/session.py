"""Session-based next-item scores: session-kNN + sequential rules + repeat-consumption.

Three signals over the current session ``q = (i_1 … i_L)`` are normalised per query and blended:

1. **Session-kNN** (V-SKNN family, Ludewig & Jannach 2018): past sessions that share items with
   ``q`` are neighbours, similarity ``Σ_{i∈s∩q} w_pos(i)`` with linear recency weights
   ``w_pos(i_p) = p / L``; the ``sessions_per_item`` most recent sessions of each item of
   ``q`` vote for their items, weighted by similarity and ``idf = log(N / df)``. The vote
   factors per item: ``Σ_p w_pos(i_p) · row(i_p)`` with ``row(i)[j] = c(i, j) · idf(j)``, ``c``
   counted over ``i``'s sessions (:meth:`SessionModel.knn_rows`), so serving can reuse a
   popular item's row across requests (:meth:`SessionModel.cache_rows`). (Keeping only the
   top-500 neighbours, as V-SKNN does, changed no metric on YooChoose: sessions are short.
   100 sessions per item on the validation split: HR@20 0.6471, MRR@20 0.3585; 50 gave
   0.6450 / 0.3590 with rows per item.)
2. **Sequential rules** (SR): item ``a`` seen ``g ≤ steps`` positions before ``b`` in a session
   adds ``1/g`` to rule ``a → b``; the last item's rules score the next item. By default
   (``rules="read"``) they are scored at query time from ``a``'s recent sessions
   (:func:`read_time_rules`, with the kNN counts); ``rules="written"`` counts them per event
   in ``sr`` (all-time counts: YooChoose test split HR@20 0.6948 against 0.6914, for ~6 µs
   more worker CPU per event; docs/benchmarks.md).
3. **Repeat consumption**: items of ``q`` itself, weight ``0.5^(L − p)`` (the last item 1).
   (26 % of next clicks in the YooChoose sample repeat the previous item.)

State (all in the store, all bounded): ``sess`` session → {item: position} (last
``max_session_items``); ``isess`` item → {session: time} (most recent ``sessions_per_item``);
``sr`` item → {next item: weight} (top ``rules_per_item``; only with ``rules="written"``);
``df`` item → {"n": sessions}.

Example
-------
>>> from online_models.signals import SignalMapper
>>> from schemas.events import Interaction
>>> def click(s, i, t):
...     return Interaction(event_id=f"{s}{i}{t}", user_id=s, item_id=i, type="click",
...                        timestamp=1e9 + t, session_id=s)
>>> model = SessionModel()
>>> _ = model.learn(SignalMapper().map([click("s1", "a", 0), click("s1", "b", 1),
...                                     click("s2", "a", 2), click("s2", "b", 3)]))
>>> model.recommend([Query("u", ("a",), exclude=frozenset({"a"}))], k=1)[0].items
['b']
"""

from __future__ import annotations

import logging
from typing import Callable, Mapping, NamedTuple, Sequence

import msgspec
import numpy as np
import scipy.sparse as sp

from online_models.base import (CodedRow, Columns, ItemCodes, ItemHashes, LearnReport, OnlineModel,
                                Query, Recommendations, RowArrays, joined_rows,
                                parallel_chunks, row_chunks, rows_matrix, top_k_dense,
                                vocabulary)
from online_models.cooccurrence import recommend_neighbours
from online_models.signals import SignalBatch
from online_models.kernels import (code_ids, code_sums, jaccard_members, session_knn_scores,
                                   session_steps, sum_pairs, window_arrays, window_rows)
from online_models.store import CodedValueCache, FlatRows, RowCache, slack


class ItemCounts(NamedTuple):
    """How often each of some items' recent sessions holds each other item."""

    ids: np.ndarray  # the vocabulary: every item of the sampled sessions
    codes: np.ndarray  # its ItemCodes codes
    counts: sp.csr_matrix  # items × vocabulary: c(i, j)
    df: np.ndarray  # the vocabulary's session counts
    df_items: list[float]  # the items' session counts
    sampled: list[int]  # how many recent sessions of each item were read
    rules: sp.csr_matrix | None  # items × vocabulary: rules scored at read time (or None)


class SessionSample(NamedTuple):
    """Some items' recent sessions as read: all their neighbourhoods are counted from (with
    the members' session counts and idf's N)."""

    sampled: list[dict[str, float]]  # per item, its recent sessions: {session: time}
    sessions: list[str]  # the sessions they name, sorted
    session_items: list[dict[str, float]]  # per session, its items: {item: position}

    def fingerprints(self) -> list[int]:
        """Per item, a hash of its sample (its sessions and each one's items): an item whose
        hash is unchanged has the neighbourhood it had (but for session counts and N)."""
        of_session = {s: hash(tuple(row.items()))
                      for s, row in zip(self.sessions, self.session_items)}
        return [hash((tuple(row.items()), tuple(of_session[s] for s in row)))
                for row in self.sampled]

    def of_items(self, positions: list[int]) -> "SessionSample":
        """The sample of the items at ``positions`` only."""
        sampled = [self.sampled[p] for p in positions]
        sessions = sorted({s for row in sampled for s in row})
        items_of = dict(zip(self.sessions, self.session_items))
        return SessionSample(sampled, sessions, [items_of[s] for s in sessions])


class KeptRows(NamedTuple):
    """What scoring keeps between queries (:meth:`SessionModel.cache_rows`): the item codes
    (and their hashes, for rows other processes publish), what is kept by code (each item's
    neighbourhood, session count and rules), and the number of sessions (idf's N)."""

    codes: ItemCodes
    hashes: ItemHashes
    neighbourhoods: RowCache
    session_counts: CodedValueCache
    rules: RowCache
    totals: RowCache

    @classmethod
    def new(cls, max_age_s: float, max_rows: int) -> "KeptRows":
        codes = ItemCodes()
        return cls(codes, ItemHashes(codes), RowCache(max_age_s, max_rows),
                   CodedValueCache(max_age_s), RowCache(max_age_s, max_rows),
                   RowCache(max_age_s, 1))


#: Reads neighbourhoods another process published: each item's packed rows
#: (:meth:`SessionModel.published_rows`), None where there are none.
PublishedReader = Callable[[Sequence[str]], Sequence[bytes | None]]
#: The format of published neighbourhoods; rows of another format are counted again, not read.
PUBLISHED_FORMAT = 1

log = logging.getLogger("streamrec.session")


#: Past this many item codes, scoring starts afresh (new codes, nothing kept): codes of items
#: that left the catalogue must not accumulate in a serving process.
MAX_ITEM_CODES = 1_000_000


class SessionModel(OnlineModel):
    name = "session"
    local_tables = user_tables = ("sess",)

    def __init__(self, sessions_per_item: int = 100, steps: int = 5,
                 rules_per_item: int = 200, max_session_items: int = 50,
                 sr_weight: float = 0.25, repeat_weight: float = 3.0,
                 use_idf: bool = True, neighbours: int = 200, rules: str = "read"
                 ) -> None:
        super().__init__()
        if rules not in ("written", "read"):
            raise ValueError(f"rules must be written or read, not {rules!r}")
        self.neighbours = neighbours  # per item, for similar()
        self.rules = rules
        self.sessions_per_item = sessions_per_item
        self.steps = steps
        self.rules_per_item = rules_per_item
        self.max_session_items = max_session_items
        self.sr_weight = sr_weight
        self.repeat_weight = repeat_weight
        self.use_idf = use_idf
        self._kept = KeptRows.new(0.0, 0)
        self._read_published: PublishedReader | None = None

    # --- learning --------------------------------------------------------------------------
    @staticmethod
    def _visits(batch: SignalBatch) -> SignalBatch:
        # The sequence is the signal here: a skip still moves the session forward (the user
        # was there); impressions are not visits.
        return batch.select(batch.types != "impression")

    def forget(self, keys) -> None:
        """Also take the sessions out of their items' recent sessions (``isess``)."""
        self.remove_from_item_rows(keys, "sess", "isess")
        super().forget(keys)

    def prefetch(self, batch: SignalBatch) -> None:
        visits = self._visits(batch)
        sessions = list(dict.fromkeys(visits.sessions.tolist()))
        self.store.prefetch_local_rows("sess", sessions)
        if self.store.writes_read_rows:  # the rows learning writes: items and rules' sources
            items = list(dict.fromkeys(visits.items.tolist()))
            earlier = [i for row in self.store.get_local_rows("sess", sessions) for i in row]
            if self.rules == "written":
                self.store.prefetch_rows("sr", list(dict.fromkeys([*items, *earlier])))
            for table in ("isess", "df"):
                self.store.prefetch_rows(table, items)
            self.store.prefetch_rows("meta", ["sessions"])

    def _learn(self, batch: SignalBatch) -> LearnReport:
        batch = self._visits(batch)
        sessions = list(dict.fromkeys(batch.sessions.tolist()))
        stored = self.store.get_local_rows("sess", sessions)
        new_sessions = sum(1 for row in stored if not row)
        items = batch.items.tolist()
        # the per-event loop runs compiled over integer codes (online_models.kernels)
        ids, code = code_ids([*items, *(i for row in stored for i in row)])
        limit = self.max_session_items + slack(self.max_session_items)
        row_items, row_pos, row_len = window_arrays(
            stored, code, max([limit, *map(len, stored)]) + 1)
        last_pos = np.array([max(row.values(), default=0.0) for row in stored], np.float64)
        session_code = {s: n for n, s in enumerate(sessions)}
        item_codes = np.fromiter((code[i] for i in items), np.int64, len(items))
        a, b, amounts, is_new = session_steps(
            np.fromiter((session_code[s] for s in batch.sessions.tolist()), np.int64,
                        len(items)),
            item_codes, row_items, row_pos, row_len, last_pos, self.steps,
            self.max_session_items, limit)
        rows = dict(zip(sessions, window_rows(ids, row_items, row_pos, row_len)))
        names = np.asarray(ids, dtype=object)
        new_in_session = code_sums(ids, item_codes[is_new])
        # each item's sessions with their latest time: events grouped by item, in stream order
        by_item = np.argsort(item_codes, kind="stable")
        grouped = item_codes[by_item]
        starts = np.flatnonzero(np.diff(grouped, prepend=-1))
        item_sessions = FlatRows(names[grouped[starts]].tolist(), [*starts.tolist(), len(grouped)],
                                 batch.sessions[by_item].tolist(),
                                 batch.timestamps[by_item].tolist())
        self.store.set_local_rows("sess", rows)  # sessions are partition-local
        self.store.set_flat_rows("isess", item_sessions, keep_top=self.sessions_per_item)
        if self.rules == "written":
            self.store.incr_flat_rows("sr", sum_pairs(ids, a, b, amounts),
                                      keep_top=self.rules_per_item)
        self.store.incr_flat_rows("df", new_in_session)
        if new_sessions:
            self.store.incr_rows("meta", {"sessions": {"n": float(new_sessions)}})
        return LearnReport(events=len(batch))

    # --- scoring ---------------------------------------------------------------------------
    def cache_rows(self, max_age_s: float, max_rows: int = 100_000) -> None:
        """Keep each item's neighbourhood (what :meth:`knn_rows` and :meth:`similar` are made
        from), session count and rules up to ``max_age_s`` seconds for later queries (serving:
        popular items' rows are computed once per interval, not per request; a query's own
        items are always its own). 0: off (replay, where state changes between queries)."""
        self._kept = KeptRows.new(max_age_s, max_rows)

    def _kept_rows(self) -> KeptRows:
        """The rows kept now (a query uses one snapshot throughout: a reset does not mix
        codes), started afresh once the codes outgrow :data:`MAX_ITEM_CODES`."""
        kept = self._kept
        if len(kept.codes) > MAX_ITEM_CODES:
            self._kept = kept = KeptRows.new(kept.rules.max_age_s, kept.rules.max_rows)
        return kept

    def read_published_rows(self, read: PublishedReader | None) -> None:
        """Take the neighbourhoods another process published (``read``) before counting
        any: the API's processes read what one nearline process counts for all of them
        (:mod:`serving.neighbour_rows`). Items with none published are counted here."""
        self._read_published = read

    def published_rows(self, items: list[str], counted_from: Mapping[str, int] | None = None
                       ) -> tuple[list[bytes | None], list[int]]:
        """Each item's neighbourhood counted now (never read from another process), packed
        for others to read: members as 64-bit name hashes (:func:`online_models.base.item_hash`)
        with their names, counts, session counts, rules and idf's N (format
        :data:`PUBLISHED_FORMAT`, msgpack); and each one's sample fingerprint
        (:meth:`SessionSample.fingerprints`). An item whose fingerprint is its
        ``counted_from`` one is not counted again: None."""
        sample = self._read_sample(items)
        prints = sample.fingerprints()
        counted_from = counted_from or {}
        due = [p for p, (item, fingerprint) in enumerate(zip(items, prints))
               if counted_from.get(item) != fingerprint]
        packed: list[bytes | None] = [None] * len(items)
        if not due:
            return packed, prints
        kept = self._kept_rows()
        total = self._sessions_total(kept) if self.use_idf else None
        hoods = self._count_neighbourhoods([items[p] for p in due], kept, total,
                                           sample if len(due) == len(items)
                                           else sample.of_items(due))
        for p, hood in zip(due, hoods):
            packed[p] = hood.pack(kept.hashes, total, self._counted_as())
        return packed, prints

    def _counted_as(self) -> str:
        """The options that shape a counted neighbourhood: a published one counted with
        others (a role configured apart) is counted again here, not read."""
        return f"rules={self.rules},steps={self.steps},idf={self.use_idf}"

    def _recommend(self, queries: list[Query], k: int) -> list[Recommendations]:
        q_items = sorted({i for q in queries for i in q.session_items})
        if not q_items:
            return [Recommendations([], np.empty(0)) for _ in queries]
        kept = self._kept_rows()
        hoods = self._neighbourhoods(q_items, kept)
        last_items = sorted({q.session_items[-1] for q in queries if q.session_items})
        if self.rules == "read":  # scored with the neighbourhoods just counted
            hood_of = dict(zip(q_items, hoods))
            rules = [hood_of[item].rules for item in last_items]
        else:
            rules = kept.rules.rows(last_items, lambda items: self._coded_rules(items, kept))
        # one column per distinct item, numbered as a vocabulary of the names would be
        ids, (knn, queried, rule_rows) = joined_rows(
            kept.codes, [CodedRow(hood.codes, hood.knn_values) for hood in hoods],
            [CodedRow(kept.codes.codes(q_items), np.ones(len(q_items)))], rules)
        rule_rows = rule_rows.scaled_to_peak()
        # per query: its items' kNN rows with linear position weights, its last item's rules,
        # and its own items with recency weights (repeat), added into one dense block
        lengths = np.fromiter((len(q.session_items) for q in queries), np.int64, len(queries))
        ends = np.cumsum(lengths)
        n = int(ends[-1])
        length_of = np.repeat(lengths, lengths).astype(np.float64)
        p = np.arange(n) - np.repeat(ends - lengths, lengths)
        row_of = {item: r for r, item in enumerate(q_items)}
        q_rows = np.fromiter((row_of[i] for q in queries for i in q.session_items), np.int64, n)
        q_cols = queried.cols[q_rows]
        position_weight = (p + 1) / length_of
        repeat_weight = np.exp2(p - length_of + 1) * self.repeat_weight
        last_row = {item: r for r, item in enumerate(last_items)}
        last_of = np.array([last_row[q.session_items[-1]] if q.session_items else -1
                            for q in queries], np.int64)
        query_starts = np.concatenate(([0], ends)).astype(np.int64)
        width = len(ids)

        def chunk(bounds: tuple[int, int]) -> list[Recommendations]:
            scores = session_knn_scores(
                knn.starts, knn.cols, knn.values, query_starts, q_rows, position_weight,
                rule_rows.starts, rule_rows.cols, rule_rows.values, float(self.sr_weight),
                last_of, q_cols, repeat_weight, width, *bounds)
            return top_k_dense(ids, scores, k, queries[bounds[0]:bounds[1]])

        return parallel_chunks(chunk, row_chunks(len(queries), width, max_cells=1_000_000))

    def knn_rows(self, items: list[str]) -> list[dict[str, float]]:
        """Each item's session-kNN row, ``c(i, j) · idf(j)``: ``c`` counts ``i``'s recent
        sessions (``isess``) holding ``j`` (``sess``), ``idf = log(N / df)``. A query sums its
        items' rows with position weights: ``q · (Sᵀ S)`` over each item's sessions, the
        session-kNN vote of V-SKNN (``j = i`` included, as a session votes for all its items)."""
        return [hood.knn() for hood in self._neighbourhoods(items)]

    def _neighbourhoods(self, items: list[str], kept: KeptRows | None = None
                        ) -> list["_Neighbourhood"]:
        """Each item's counts over its recent sessions, kept as :meth:`cache_rows` says; the
        kNN and similarity rows are made from them on first use."""
        kept = kept or self._kept_rows()
        return kept.neighbourhoods.rows(
            items, lambda missing: self._published_or_counted(missing, kept))

    def _published_or_counted(self, items: list[str], kept: KeptRows
                              ) -> list["_Neighbourhood"]:
        """The items' published neighbourhoods (:meth:`read_published_rows`), the others
        counted."""
        if self._read_published is None:
            return self._count_neighbourhoods(items, kept)
        counted_as = self._counted_as()
        hoods = [None if packed is None else _Neighbourhood.unpack(item, packed, kept,
                                                                   counted_as)
                 for item, packed in zip(items, self._read_published(items))]
        missing = [item for item, hood in zip(items, hoods) if hood is None]
        if missing:
            counted = iter(self._count_neighbourhoods(missing, kept))
            hoods = [next(counted) if hood is None else hood for hood in hoods]
        return hoods

    def _sessions_total(self, kept: KeptRows) -> float:
        """The number of sessions (idf's N), kept as the rows are."""
        [total] = kept.totals.rows(["sessions"], lambda names: [
            row.get("n", 1.0) for row in self.store.get_rows("meta", names)])
        return total

    def _count_neighbourhoods(self, items: list[str], kept: KeptRows,
                              total: float | None = None, sample: SessionSample | None = None
                              ) -> list["_Neighbourhood"]:
        """Count the items' neighbourhoods now (``total``: idf's N, and ``sample``: their
        recent sessions, read where not given)."""
        found = self._item_counts(items, kept, sample or self._read_sample(items))
        if found is None:
            return [_Neighbourhood(item) for item in items]
        codes, counts = found.codes, found.counts
        if self.use_idf and total is None:
            total = self._sessions_total(kept)
        knn_values = counts.data * _idf(found.df, total)[counts.indices]
        out = []
        rules = found.rules
        for r, (item, item_code) in enumerate(zip(items, kept.codes.codes(items).tolist())):
            at = slice(counts.indptr[r], counts.indptr[r + 1])
            cols = counts.indices[at]
            hood = _Neighbourhood(item, item_code, codes[cols], knn_values[at],
                                  counts.data[at], found.df[cols], found.df_items[r],
                                  found.sampled[r], names=found.ids[cols])
            if rules is not None:
                at = slice(rules.indptr[r], rules.indptr[r + 1])
                hood.rules = CodedRow(codes[rules.indices[at]], rules.data[at])
            out.append(hood)
        return out

    def _read_sample(self, items: list[str]) -> SessionSample:
        """The items' recent sessions: one row read per item and per sampled session."""
        sampled = self.store.get_rows("isess", items)
        sessions = sorted({s for row in sampled for s in row})
        return SessionSample(sampled, sessions,
                             self.store.get_local_rows("sess", sessions) if sessions else [])

    def _item_counts(self, items: list[str], kept: KeptRows, sample: SessionSample
                     ) -> ItemCounts | None:
        """``c(i, j)`` of these items over their recent sessions (``sample``; None where none
        has any), with the session counts read once."""
        sampled, sessions, session_items = sample
        vocab = vocabulary(session_items)
        if not vocab:
            return None
        in_sessions = rows_matrix(sampled, {s: n for n, s in enumerate(sessions)}, binary=True)
        positions = rows_matrix(session_items, vocab)
        holds = positions.copy()
        holds.data[:] = 1.0
        counts = (in_sessions @ holds).tocsr()
        rules = None
        if self.rules == "read":
            item_cols = np.fromiter((vocab.get(i, -1) for i in items), np.int64, len(items))
            rules = read_time_rules(in_sessions, positions, item_cols, self.steps)
        outside = [i for i in dict.fromkeys(items) if i not in vocab]
        codes = kept.codes.codes([*vocab, *outside])
        df_read = kept.session_counts.values(codes, lambda stale: self._session_counts(
            kept.codes.names(stale).tolist()))
        df_vocab = df_read[:len(vocab)]
        df_outside = dict(zip(outside, df_read[len(vocab):].tolist()))
        df_items = [df_vocab[vocab[i]] if i in vocab else df_outside[i] for i in items]
        return ItemCounts(np.array(list(vocab), dtype=object), codes[:len(vocab)], counts,
                          df_vocab, df_items, [len(row) for row in sampled], rules)

    def _session_counts(self, items: list[str]) -> list[float]:
        """Each item's number of sessions (``df``), 0 where unknown."""
        return [row.get("n", 0.0) for row in self.store.get_rows("df", items)]

    def _coded_rules(self, items: list[str], kept: KeptRows) -> list[CodedRow]:
        """The last items' rules (``sr`` rows, or scored at read time with their
        neighbourhoods: :func:`read_time_rules`), coded."""
        if self.rules == "read":
            return [hood.rules for hood in self._neighbourhoods(items, kept)]
        return [CodedRow(kept.codes.codes(list(row)), np.fromiter(row.values(), float, len(row)))
                for row in self.store.get_rows("sr", items)]

    def rule_rows(self, items: list[str]) -> list[dict[str, float]]:
        """Each item's next-item rules (written or scored at read time), by name."""
        kept = self._kept_rows()
        return [dict(zip(kept.codes.names(row.codes).tolist(), row.values.tolist()))
                for row in self._coded_rules(items, kept)]

    def similar(self, items: list[str]) -> list[dict[str, float]]:
        """Item neighbours scored at read time from the session ↔ item adjacency this model
        keeps anyway (GraphJet's approach: nothing is counted per pair while learning).

        ``c(a, b)`` (as in :meth:`knn_rows`) is scaled from ``a``'s sample of recent sessions
        to all of ``a``'s sessions (``df``); similarity is Jaccard, ``c / (df_a + df_b − c)``,
        and each item keeps its ``neighbours`` best."""
        return [hood.similar(self.neighbours) for hood in self._neighbourhoods(items)]

    def similar_rows(self, items: list[str]) -> tuple[Columns, RowArrays]:
        """:meth:`similar` as arrays (:func:`recommend_neighbours`' input), joined by code."""
        kept = self._kept_rows()
        ids, (rows,) = joined_rows(kept.codes, [hood.similar_coded(self.neighbours)
                                                for hood in self._neighbourhoods(items, kept)])
        return ids, rows


_NO_RULES = CodedRow(np.empty(0, np.int64), np.empty(0))


class _Neighbourhood:
    """One item's counts ``c(i, j)`` over its recent sessions (``names``: the ``j``), with the
    ``j``'s session counts; its kNN row (``c · idf``) and Jaccard row are made on first use."""

    __slots__ = ("item", "item_code", "codes", "knn_values", "counts", "df", "df_item",
                 "sampled", "rules", "_names", "_item_codes", "_knn", "_jaccard", "_similar")

    def __init__(self, item: str, item_code: int = -1,
                 codes: np.ndarray = np.empty(0, np.int64), knn_values: np.ndarray = np.empty(0),
                 counts: np.ndarray = np.empty(0), df: np.ndarray = np.empty(0),
                 df_item: float = 0.0, sampled: int = 0, names: np.ndarray | None = None,
                 item_codes: ItemCodes | None = None) -> None:
        """``item_code``: the item's code among ``codes``' (-1: none); ``names``: the members'
        names, else looked up in ``item_codes`` when first asked for (lists scored by code
        never ask)."""
        self.item, self.item_code, self.codes, self.knn_values = item, item_code, codes, \
            knn_values
        self.counts, self.df, self.df_item, self.sampled = counts, df, df_item, sampled
        self._names, self._item_codes = names, item_codes
        self.rules = _NO_RULES  # scored at read time (rules="read"), else unused
        self._knn = self._jaccard = self._similar = None

    @property
    def names(self) -> np.ndarray:
        """The members' names (an object array, in ``codes``' order)."""
        if self._names is None:
            self._names = (self._item_codes.names(self.codes) if self._item_codes is not None
                           else np.empty(0, object))
        return self._names

    def pack(self, hashes: ItemHashes, total: float | None, counted_as: str) -> bytes:
        """This neighbourhood for another process (:meth:`SessionModel.published_rows`);
        ``total``: the idf's N it was counted with (None: idf off); ``counted_as``: the
        counting options."""
        names = [name.encode() for name in self.names.tolist()]
        return msgspec.msgpack.encode((
            PUBLISHED_FORMAT, counted_as, total, float(self.df_item), int(self.sampled),
            hashes.of_codes(self.codes).tobytes(), self.counts.astype(np.float32).tobytes(),
            self.df.astype(np.float64).tobytes(),
            np.cumsum([len(name) for name in names], dtype=np.uint32).tobytes(), b"".join(names),
            self._rule_positions().tobytes(), self.rules.values.astype(np.float64).tobytes()))

    def _rule_positions(self) -> np.ndarray:
        """Where each rule's item is among the members (a rule's item is always one: it
        follows the item in one of the sessions counted)."""
        position = {code: n for n, code in enumerate(self.codes.tolist())}
        return np.fromiter(map(position.__getitem__, self.rules.codes.tolist()), np.uint32,
                           len(self.rules.codes))

    @classmethod
    def unpack(cls, item: str, packed: bytes, kept: KeptRows, counted_as: str
               ) -> "_Neighbourhood | None":
        """:meth:`pack`'s neighbourhood, coded for ``kept`` (None: another format, or
        counted with other options than ``counted_as``)."""
        try:
            fields = msgspec.msgpack.decode(packed)
        except msgspec.DecodeError:
            return None
        if not isinstance(fields, list) or len(fields) != 12 or fields[0] != PUBLISHED_FORMAT:
            return None
        if fields[1] != counted_as:
            _warn_counted_apart(fields[1], counted_as)
            return None
        (_, _, total, df_item, sampled, hashes, counts, df, name_ends, names, rule_positions,
         rule_values) = fields
        hashes = np.frombuffer(hashes, np.uint64)
        codes = kept.hashes.codes_of(hashes)
        if codes.min(initial=0) < 0:  # names never seen in this process: coded (and hashed) now
            unseen = np.flatnonzero(codes < 0)
            ends = np.frombuffer(name_ends, np.uint32).astype(np.int64)
            starts = ends - np.diff(ends, prepend=0)
            codes[unseen] = kept.codes.codes([names[starts[n]:ends[n]].decode()
                                              for n in unseen.tolist()])
            kept.hashes.of_codes(codes[unseen])
        counts = np.frombuffer(counts, np.float32).astype(np.float64)
        df = np.frombuffer(df, np.float64)
        [item_code] = kept.codes.codes([item])
        hood = cls(item, int(item_code), codes, counts * _idf(df, total), counts, df, df_item,
                   sampled, item_codes=kept.codes)
        if rule_positions:
            hood.rules = CodedRow(codes[np.frombuffer(rule_positions, np.uint32)],
                                  np.frombuffer(rule_values, np.float64))
        return hood

    def knn(self) -> dict[str, float]:
        if self._knn is None:
            self._knn = dict(zip(self.names.tolist(), self.knn_values.tolist()))
        return self._knn

    def similar(self, neighbours: int) -> dict[str, float]:
        """Jaccard ``c / (df_a + df_b − c)``, ``c`` scaled from the sample to all of the
        item's sessions; the ``neighbours`` best, the item itself left out."""
        if self._similar is None:
            at, coded = self._best_jaccard(neighbours)
            self._similar = dict(zip(self.names[at].tolist(), coded.values.tolist()))
        return self._similar

    def similar_coded(self, neighbours: int) -> CodedRow:
        """:meth:`similar` with members as codes."""
        return self._best_jaccard(neighbours)[1]

    def _best_jaccard(self, neighbours: int) -> tuple[np.ndarray, CodedRow]:
        """(positions of the ``neighbours`` best members, the coded row), computed once."""
        if self._jaccard is None:
            at, sims = np.empty(0, np.int64), np.empty(0)
            if self.sampled:
                at, sims = jaccard_members(self.codes, self.counts, self.df, self.item_code,
                                           float(self.df_item), int(self.sampled))
                if len(sims) > neighbours:
                    best = np.argpartition(-sims, neighbours - 1)[:neighbours]
                    at, sims = at[best], sims[best]
            self._jaccard = at, CodedRow(self.codes[at], sims)
        return self._jaccard


class SessionCooccurrence(SessionModel):
    """Co-occurrence neighbours of the query's items (as :class:`CooccurrenceModel` scores
    them), with similarities read at query time from the session model's state
    (:meth:`SessionModel.similar`) instead of pair counts written per event."""

    name = "cooc_read"

    def __init__(self, recency: float = 0.5, **options) -> None:
        super().__init__(**{"rules": "read", **options})  # its queries use no rules
        self.recency = recency

    def _recommend(self, queries: list[Query], k: int) -> list[Recommendations]:
        return recommend_neighbours(queries, [q.session_items for q in queries],
                                    self.similar_rows, self.recency, k)


def read_time_rules(in_sessions: sp.csr_matrix, positions: sp.csr_matrix,
                    item_cols: np.ndarray, steps: int) -> sp.csr_matrix:
    """Sequential rules scored at read time (``rules="read"``), items × vocabulary: in each
    of item ``a``'s recent sessions (row ``a`` of ``in_sessions``: items × sessions), an item
    ``b`` at most ``steps`` positions after ``a`` (``positions``: sessions × vocabulary, each
    session's latest positions; ``a`` is column ``item_cols[a]``, -1 where no session holds
    it) adds ``1 / gap`` to ``a → b``. Where ``a`` or ``b`` repeats in a session only its last
    visit counts, unlike the rules written per event."""
    n_items, width = len(item_cols), positions.shape[1]
    pair_item = np.repeat(np.arange(n_items), np.diff(in_sessions.indptr))
    pair_session = in_sessions.indices.astype(np.int64)
    lengths = np.diff(positions.indptr)[pair_session]
    # every (item, session) pair's session entries, gathered flat
    owner = np.repeat(np.arange(len(pair_session)), lengths)
    starts = np.repeat(positions.indptr[pair_session] - np.cumsum(lengths) + lengths, lengths)
    entry = np.arange(len(owner)) + starts
    cols, at = positions.indices[entry], positions.data[entry]
    own = cols == item_cols[pair_item][owner]  # the item itself in each of its sessions
    held = np.zeros(len(pair_session), bool)
    held[owner[own]] = True
    at_item = np.zeros(len(pair_session))
    at_item[owner[own]] = at[own]
    gap = at - at_item[owner]
    valid = held[owner] & (gap > 0) & (gap <= steps)
    rules = sp.csr_matrix((1.0 / gap[valid], (pair_item[owner[valid]], cols[valid])),
                          shape=(n_items, width))
    rules.sum_duplicates()
    return rules


def _warn_counted_apart(theirs: object, ours: str) -> None:
    """Say once per process that published neighbourhoods are ignored, and why."""
    global _WARNED_APART
    if not _WARNED_APART:
        _WARNED_APART = True
        log.warning("published neighbourhoods were counted with %r, this process counts with "
                    "%r: it counts its own (set the session model's options alike in every "
                    "role)", theirs, ours)


_WARNED_APART = False


def _idf(df: np.ndarray, total: float | None) -> np.ndarray:
    """``log(N / df)`` (+10⁻³: every item keeps a weight) of session counts ``df``; all ones
    where ``total`` (N) is None (idf off)."""
    if total is None:
        return np.ones(len(df))
    return np.log(max(total, 2.0) / np.maximum(df, 1.0)) + 1e-3
