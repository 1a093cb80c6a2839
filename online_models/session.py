"""Session-based next-item scores: session-kNN + sequential rules + repeat-consumption.

Three signals over the current session ``q = (i_1 … i_L)`` are normalised per query and blended:

1. **Session-kNN** (V-SKNN family, Ludewig & Jannach 2018): past sessions that share items with
   ``q`` are neighbours, similarity ``Σ_{i∈s∩q} w_pos(i)`` with linear recency weights
   ``w_pos(i_p) = p / L``; the ``sessions_per_item`` most recent sessions of each item of
   ``q`` vote for their items, weighted by similarity and ``idf = log(N / df)``. (Keeping
   only the top-500 neighbours, as V-SKNN does, changed no metric on YooChoose: sessions are
   short, so we skip that per-query sort. 50 sessions per item, not 300, on the validation
   split: HR@20 0.6471 against 0.6472, and a sixth of the rows written and read.)
2. **Sequential rules** (SR): item ``a`` seen ``g ≤ steps`` positions before ``b`` in a session
   adds ``1/g`` to rule ``a → b``; the last item's rules score the next item.
3. **Repeat consumption**: items of ``q`` itself, weight ``0.5^(L − p)`` (the last item 1).
   (26 % of next clicks in the YooChoose sample repeat the previous item.)

State (all in the store, all bounded): ``sess`` session → {item: position} (last
``max_session_items``); ``isess`` item → {session: time} (most recent ``sessions_per_item``);
``sr`` item → {next item: weight} (top ``rules_per_item``; only with ``rules="written"``:
``"read"`` scores rules at query time from ``isess`` and ``sess``); ``df`` item → {"n": sessions}.

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

from itertools import chain

import numpy as np
import scipy.sparse as sp

from online_models.base import (LearnReport, OnlineModel, Query, Recommendations,
                                parallel_chunks, row_chunks, top_k_dense, vocabulary)
from online_models.cooccurrence import recommend_neighbours
from online_models.signals import SignalBatch
from online_models.kernels import (code_ids, code_sums, session_steps, sum_pairs,
                                   window_arrays, window_rows)
from online_models.store import FlatRows, slack


#: Up to this many local items the co-visit matrix is used dense (4 bytes × n², ≤ 144 MB).
DENSE_COVISIT_MAX_ITEMS = 6000


class SessionModel(OnlineModel):
    name = "session"
    local_tables = ("sess",)

    def __init__(self, sessions_per_item: int = 50, steps: int = 5,
                 rules_per_item: int = 200, max_session_items: int = 50,
                 sr_weight: float = 0.25, repeat_weight: float = 3.0,
                 use_idf: bool = True, neighbours: int = 200, rules: str = "written"
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

    # --- learning --------------------------------------------------------------------------
    @staticmethod
    def _visits(batch: SignalBatch) -> SignalBatch:
        # The sequence is the signal here: a skip still moves the session forward (the user
        # was there); impressions are not visits.
        return batch.select(batch.types != "impression")

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
    def _recommend(self, queries: list[Query], k: int) -> list[Recommendations]:
        store = self.store
        q_items = sorted({i for q in queries for i in q.session_items})
        if not q_items:
            return [Recommendations([], np.empty(0)) for _ in queries]
        # hop 1: recent sessions of every query item; hop 2: those sessions' items
        item_sessions = dict(zip(q_items, store.get_rows("isess", q_items)))
        sessions = sorted({s for row in item_sessions.values() for s in row})
        sess_rows = store.get_local_rows("sess", sessions)
        last_items = sorted({q.session_items[-1] for q in queries if q.session_items})
        rules = dict(zip(last_items, store.get_rows("sr", last_items) if self.rules == "written"
                         else self._rules_at_read(last_items, item_sessions,
                                                  dict(zip(sessions, sess_rows)))))
        vocab = vocabulary(sess_rows, [q_items], rules.values())
        ids = np.array(list(vocab), dtype=object)
        shape = (len(queries), len(vocab))
        incidence = _rows_matrix(sess_rows, vocab, binary=True)
        # query matrices: linear position weights (kNN), recency (repeat), last item (SR)
        lengths = np.fromiter((len(q.session_items) for q in queries), np.int64, len(queries))
        cols = np.fromiter((vocab[i] for q in queries for i in q.session_items), np.int64,
                           int(lengths.sum()))
        qr = np.repeat(np.arange(len(queries)), lengths)
        length_of = np.repeat(lengths, lengths).astype(np.float32)
        p = np.arange(len(cols)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        # duplicates (repeated items in a session) add up, as repeated evidence should
        q_pos = sp.csr_matrix((((p + 1) / length_of).astype(np.float32), (qr, cols)),
                              shape=shape)  # float32 throughout: float64 doubles the work
        repeat = sp.csr_matrix((np.exp2(p - length_of + 1).astype(np.float32), (qr, cols)),
                               shape=shape)
        last_row = {item: r for r, item in enumerate(last_items)}
        has_items = np.flatnonzero(lengths)
        last_r = has_items
        last_c = [last_row[queries[r].session_items[-1]] for r in has_items.tolist()]
        last = sp.csr_matrix((np.ones(len(last_r)), (last_r, last_c)),
                             shape=(len(queries), len(last_items)))
        rules_matrix = _rows_matrix([rules[i] for i in last_items], vocab)
        # (q · Sᵀ) · S == q · (Sᵀ · S): the local item × item co-visit matrix is far smaller
        covisit = incidence.T @ incidence
        if self.use_idf:
            covisit = covisit @ sp.diags(self._idf(store, ids))
        covisit = covisit.astype(np.float32).tocsr()
        if len(ids) <= DENSE_COVISIT_MAX_ITEMS:  # sparse · dense beats sparse · sparse here
            covisit = covisit.toarray()
        rules_matrix = rules_matrix.astype(np.float32)

        # rules and repeat are sparse: scale and add them sparsely into the dense kNN block
        sparse_terms = (_sparse_row_normalise((last @ rules_matrix).tocsr()) * self.sr_weight
                        + repeat * self.repeat_weight).tocsr()
        sparse_terms.sum_duplicates()

        def chunk(bounds: tuple[int, int]) -> list[Recommendations]:
            a, b = bounds
            knn = q_pos[a:b] @ covisit
            scores = _row_normalise(knn if isinstance(knn, np.ndarray) else knn.toarray())
            extra = sparse_terms[a:b].tocoo()
            scores[extra.row, extra.col] += extra.data  # (row, col) pairs are unique
            return top_k_dense(ids, scores, k, queries[a:b])

        return parallel_chunks(chunk, row_chunks(len(queries), len(ids), max_cells=1_000_000))

    def _rules_at_read(self, items: list[str], item_sessions: dict[str, dict[str, float]],
                       session_rows: dict[str, dict[str, float]]) -> list[dict[str, float]]:
        """Sequential rules scored at read time (``rules="read"``): in each of ``a``'s
        recent sessions, an item ``b`` at most ``steps`` positions after ``a`` adds
        ``1 / gap`` to ``a → b`` (from the rows' latest positions: where ``a`` or ``b``
        repeats, only its last visit counts, unlike the rules written per event)."""
        out = []
        steps = self.steps
        for a in items:
            rule: dict[str, float] = {}
            get = rule.get
            for session in item_sessions[a]:
                row = session_rows[session]
                at = row.get(a)
                if at is None:  # a left the session's window of latest items
                    continue
                for b, position in row.items():
                    gap = position - at
                    if 0 < gap <= steps:
                        rule[b] = get(b, 0.0) + 1.0 / gap
            out.append(rule)
        return out

    def similar(self, items: list[str]) -> list[dict[str, float]]:
        """Item neighbours scored at read time from the session ↔ item adjacency this model
        keeps anyway (GraphJet's approach: nothing is counted per pair while learning).

        ``c(a, b)``: how many of ``a``'s recent sessions (``isess``, at most
        ``sessions_per_item``) hold ``b`` (``sess``), scaled from that sample to all of
        ``a``'s sessions (``df``); similarity is Jaccard, ``c / (df_a + df_b − c)``, and each
        item keeps its ``neighbours`` best. Reads one row per item and per sampled session."""
        store = self.store
        sampled = store.get_rows("isess", items)
        sessions = sorted({s for row in sampled for s in row})
        if not sessions:
            return [{} for _ in items]
        session_items = store.get_local_rows("sess", sessions)
        vocab = vocabulary(session_items)
        if not vocab:
            return [{} for _ in items]
        counts = (_rows_matrix(sampled, {s: n for n, s in enumerate(sessions)}, binary=True)
                  @ _rows_matrix(session_items, vocab, binary=True)).tocsr()
        ids = np.array(list(vocab), dtype=object)
        # one read of the session counts: the vocabulary's, then the asked items' not in it
        outside = [i for i in dict.fromkeys(items) if i not in vocab]
        counts_read = self._session_counts(store, [*vocab, *outside])
        df_of = counts_read[:len(vocab)]
        df_outside = dict(zip(outside, counts_read[len(vocab):].tolist()))
        df_items = [df_of[vocab[i]] if i in vocab else df_outside[i] for i in items]
        out = []
        for r, item in enumerate(items):
            if not sampled[r]:
                out.append({})
                continue
            lo, hi = counts.indptr[r], counts.indptr[r + 1]
            cols, c = counts.indices[lo:hi], counts.data[lo:hi]
            keep = cols != vocab.get(item, -1)
            cols, c = cols[keep], c[keep]
            n_a = max(df_items[r], float(len(sampled[r])))
            n_b = np.maximum(df_of[cols], c)
            est = np.minimum(c * (n_a / len(sampled[r])), np.minimum(n_a, n_b))
            sims = est / np.maximum(n_a + n_b - est, 1e-12)
            if len(sims) > self.neighbours:
                best = np.argpartition(-sims, self.neighbours - 1)[:self.neighbours]
                cols, sims = cols[best], sims[best]
            out.append(dict(zip(ids[cols].tolist(), sims.tolist())))
        return out

    @staticmethod
    def _session_counts(store, ids: list[str]) -> np.ndarray:
        """Each item's number of sessions (``df``), 0 where unknown."""
        return np.array([row.get("n", 0.0) for row in store.get_rows("df", ids)],
                        np.float64)

    def _idf(self, store, ids: np.ndarray) -> np.ndarray:
        total = store.get_rows("meta", ["sessions"])[0].get("n", 1.0)
        df = self._session_counts(store, ids.tolist())
        return np.log(max(total, 2.0) / np.maximum(df, 1.0)) + 1e-3


class SessionCooccurrence(SessionModel):
    """Co-occurrence neighbours of the query's items (as :class:`CooccurrenceModel` scores
    them), with similarities read at query time from the session model's state
    (:meth:`SessionModel.similar`) instead of pair counts written per event."""

    name = "cooc_read"

    def __init__(self, recency: float = 0.5, **options) -> None:
        super().__init__(**{"rules": "read", **options})  # its queries use no rules
        self.recency = recency

    def _recommend(self, queries: list[Query], k: int) -> list[Recommendations]:
        return recommend_neighbours(queries, [q.session_items for q in queries], self.similar,
                                    self.recency, k)


def _rows_matrix(rows: list[dict[str, float]], vocab: dict[str, int],
                 binary: bool = False) -> sp.csr_matrix:
    """CSR matrix with one row per dict (columns from ``vocab``)."""
    lengths = [len(row) for row in rows]
    nnz = sum(lengths)
    cols = np.fromiter(map(vocab.__getitem__, chain.from_iterable(rows)), np.int64, nnz)
    vals = (np.ones(nnz) if binary
            else np.fromiter(chain.from_iterable(row.values() for row in rows), float, nnz))
    return sp.csr_matrix((vals, cols, np.concatenate(([0], np.cumsum(lengths)))),
                         shape=(len(rows), len(vocab)))


def _sparse_row_normalise(matrix: sp.csr_matrix) -> sp.csr_matrix:
    """Sparse rows scaled so each row's largest entry is 1."""
    peak = matrix.max(axis=1).toarray().ravel()
    return sp.diags(1.0 / np.where(peak > 0, peak, 1.0)).astype(np.float32) @ matrix


def _row_normalise(matrix: np.ndarray) -> np.ndarray:
    """Scale each row so its largest entry is 1 (all-zero rows stay zero), in place."""
    peak = matrix.max(axis=1, keepdims=True)
    matrix *= 1.0 / np.where(peak > 0, peak, 1.0)
    return matrix
