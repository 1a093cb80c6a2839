"""Item-item co-occurrence: time-decayed, cosine-normalised, top-N neighbours per item.

Each positive event of item ``b`` whose owner's recent window holds item ``a`` (at most
``window`` items, within ``max_gap_s``) adds ``f(t) · w_b`` to both ``C[a][b]`` and
``C[b][a]``, where ``w`` is the signal weight and ``f(t) = 2^((t − L)/half_life)`` is forward
decay against a landmark ``L`` fixed at the first event (so older co-occurrences fade without
touching them; ``half_life_s=None``: no decay). The owner is the session (``scope="session"``,
anonymous next-item) or the user (``scope="user"``: the user's whole recent history, for
returning users). Each item's mass ``n[a] += f(t) · w_a`` gives the normalisation
``sim(a, b) = C[a][b] / (n[a]^α · n[b]^(1−α))`` (α = ½: cosine; larger α favours popular
neighbours less); the decay factor cancels in the ratio. Rows keep their ``neighbours``
largest raw counts (the store trims).

A query scores ``Σ_a r(a) · sim(a, ·)`` over its items, newest last, with recency weights
``r = recency^(L − p)``. ``query="history"`` (user scope) queries the user's stored window (up
to ``history`` newest items) followed by the request's session items; ``"session"`` only the
request's items. (Cosine was chosen over Jaccard and lift on the YooChoose replay: see
docs/benchmarks.md.)

Limits: the landmark is never moved, so at the default half-life of 7 days scores stay in
float range for ~1,000 days of stream time before a rebuild is needed.
"""

from __future__ import annotations

import numpy as np

from online_models.base import (Columns, LearnReport, OnlineModel, Query, Recommendations,
                                RowArrays, named_rows, row_chunks, top_k_dense)
from online_models.kernels import (code_ids, code_sums, cooc_pairs, sum_pairs,
                                   weighted_row_sums, window_arrays, window_rows)
from online_models.signals import SignalBatch
from online_models.store import slack


class CooccurrenceModel(OnlineModel):
    name = "cooc"
    local_tables = user_tables = ("win",)
    claims_shared_rows = True  # the forward-decay landmark

    def __init__(self, window: int = 5, max_gap_s: float = 3600.0, neighbours: int = 200,
                 half_life_s: float | None = 7 * 86400.0, normalisation: str = "jaccard",
                 scope: str = "session", query: str = "session", history: int = 20,
                 recency: float = 0.5, alpha: float = 0.5) -> None:
        super().__init__()
        if normalisation not in ("cosine", "jaccard", "lift", "none"):
            raise ValueError(f"normalisation must be cosine, jaccard, lift or none, not "
                             f"{normalisation!r}")
        if scope not in ("session", "user") or query not in ("session", "history"):
            raise ValueError("scope must be session or user, query session or history")
        if query == "history" and scope != "user":
            raise ValueError("query='history' needs scope='user' (the stored user windows)")
        self.window = window
        self.max_gap_s = max_gap_s
        self.neighbours = neighbours
        self.half_life_s = half_life_s
        self.normalisation = normalisation
        self.scope = scope
        self.query = query
        self.history = history
        self.recency = recency
        self.alpha = alpha

    def _owners(self, batch: SignalBatch) -> np.ndarray:
        return batch.users if self.scope == "user" else batch.sessions

    def _landmark(self, first_ts: float) -> float:
        # claimed atomically: concurrent workers must all scale by the same landmark
        return self.store.claim("meta", "landmark", "t", first_ts)

    @staticmethod
    def _paired(batch: SignalBatch) -> SignalBatch:
        return batch.select(batch.positive)  # only positive events co-occur

    def prefetch(self, batch: SignalBatch) -> None:
        paired = self._paired(batch)
        owners = list(dict.fromkeys(self._owners(paired).tolist()))
        self.store.prefetch_local_rows("win", owners)
        if self.store.writes_read_rows:  # the rows learning writes: both ends of every pair
            items = list(dict.fromkeys(paired.items.tolist()))
            earlier = [i for row in self.store.get_local_rows("win", owners) for i in row]
            self.store.prefetch_rows("cooc", list(dict.fromkeys([*items, *earlier])))
            self.store.prefetch_rows("mass", items)
            self.store.prefetch_rows("meta", ["landmark"])

    def _learn(self, batch: SignalBatch) -> LearnReport:
        batch = self._paired(batch)
        if len(batch) == 0:
            return LearnReport()
        if self.half_life_s is None:
            factors = np.ones(len(batch))
        else:
            landmark = self._landmark(float(batch.timestamps[0]))
            factors = np.exp2((batch.timestamps - landmark) / self.half_life_s)
        owners = self._owners(batch).tolist()
        distinct = list(dict.fromkeys(owners))
        stored = self.store.get_local_rows("win", distinct)
        # the per-event loop runs compiled over integer codes (online_models.kernels)
        ids, code = code_ids([*batch.items.tolist(), *(i for row in stored for i in row)])
        owner_code = {owner: n for n, owner in enumerate(distinct)}
        limit = self.window + slack(self.window)
        win_items, win_ts, win_len = window_arrays(
            stored, code, max([limit, *map(len, stored)]) + 1)
        item_codes = np.fromiter((code[i] for i in batch.items.tolist()), np.int64, len(batch))
        contributions = factors * batch.weights
        a, b, amounts = cooc_pairs(
            np.fromiter((owner_code[o] for o in owners), np.int64, len(owners)), item_codes,
            batch.timestamps.astype(np.float64), contributions, win_items, win_ts, win_len,
            self.window, limit, float(self.max_gap_s))
        windows = dict(zip(distinct, window_rows(ids, win_items, win_ts, win_len)))
        counts = sum_pairs(ids, a, b, amounts)
        mass = code_sums(ids, item_codes, contributions)
        self.store.set_local_rows("win", windows)  # sessions are partition-local
        self.store.incr_flat_rows("cooc", counts, keep_top=self.neighbours)
        self.store.incr_flat_rows("mass", mass)
        return LearnReport(events=len(batch))

    def similar(self, items: list[str]) -> list[dict[str, float]]:
        """Normalised neighbour rows of ``items`` (for "similar items" and scoring)."""
        rows = self.store.get_rows("cooc", items)
        others = sorted({j for row in rows for j in row} | set(items))
        mass = dict(zip(others, (r.get("n", 0.0) for r in self.store.get_rows("mass", others))))
        total = sum(mass.values()) or 1.0
        out = []
        for item, row in zip(items, rows):
            n_a = mass.get(item, 0.0)
            sims = {}
            for other, c in row.items():
                n_b = mass.get(other, 0.0)
                if n_a <= 0 or n_b <= 0:
                    continue
                if self.normalisation == "cosine":
                    sims[other] = c / (n_a ** self.alpha * n_b ** (1.0 - self.alpha))
                elif self.normalisation == "jaccard":
                    sims[other] = c / max(n_a + n_b - c, 1e-12)
                elif self.normalisation == "lift":
                    sims[other] = c * total / (n_a * n_b)
                else:
                    sims[other] = c
            out.append(sims)
        return out

    def similar_rows(self, items: list[str]) -> tuple[Columns, RowArrays]:
        """:meth:`similar` as arrays (:func:`recommend_neighbours`' input)."""
        return named_rows(self.similar(items))

    def _query_items(self, queries: list[Query]) -> list[tuple[str, ...]]:
        """Each query's items, oldest first: its session, after the user's stored history."""
        if self.query == "session":
            return [q.session_items for q in queries]
        users = sorted({q.user_id for q in queries})
        stored = dict(zip(users, self.store.get_local_rows("win", users)))
        out = []
        for q in queries:
            past = sorted(stored[q.user_id].items(), key=lambda kv: (kv[1], kv[0]))
            recent = [item for item, _ in past[-self.history:]]
            now = set(q.session_items)
            out.append(tuple(i for i in recent if i not in now) + tuple(q.session_items))
        return out

    def _recommend(self, queries: list[Query], k: int) -> list[Recommendations]:
        return recommend_neighbours(queries, self._query_items(queries), self.similar_rows,
                                    self.recency, k)


def recommend_neighbours(queries: list[Query], query_items: list[tuple[str, ...]],
                         similar_rows, recency: float, k: int, explain: bool = False
                         ) -> list[Recommendations]:
    """Each query scores ``Σ_a recency^(L − p) · sim(a, ·)`` over its items (oldest first);
    ``similar_rows(items)`` gives (neighbours, each item's similarities to them as
    :class:`RowArrays`): written-time rows here, read-time ones in
    :meth:`online_models.session.SessionModel.similar_rows`. ``explain``: each
    recommendation's ``sources`` names the query item whose term was largest (the earliest
    on a tie)."""
    q_items = sorted({i for items in query_items for i in items})
    if not q_items:
        return [Recommendations([], np.empty(0)) for _ in queries]
    ids, rows = similar_rows(q_items)
    if not len(ids):
        return [Recommendations([], np.empty(0)) for _ in queries]
    row_of = {item: r for r, item in enumerate(q_items)}
    neighbours = rows._replace(values=np.asarray(rows.values, np.float32))
    # every (query, item) entry: its row and recency weight, grouped by query, then by row
    lengths = np.fromiter(map(len, query_items), np.int64, len(query_items))
    query_starts = np.concatenate(([0], np.cumsum(lengths))).astype(np.int64)
    n = int(query_starts[-1])
    query_rows = np.fromiter((row_of[i] for items in query_items for i in items), np.int64, n)
    position = np.arange(n) - np.repeat(query_starts[:-1], lengths)
    weights = (recency ** (np.repeat(lengths, lengths) - 1 - position)).astype(np.float32)
    by_row = np.lexsort((query_rows, np.repeat(np.arange(len(queries)), lengths)))  # stable
    out: list[Recommendations] = []
    columns: list[np.ndarray] = []
    for a, b in row_chunks(len(queries), len(ids)):
        block = weighted_row_sums(neighbours.starts, neighbours.cols, neighbours.values,
                                  len(ids), query_starts, query_rows[by_row], weights[by_row],
                                  a, b)
        out += top_k_dense(ids, block, k, queries[a:b], columns if explain else None)
    if explain:
        explained = [n for n, rec in enumerate(out) if rec.items]
        sources = _strongest_sources(neighbours, len(ids),
                                     [[row_of[i] for i in query_items[n]] for n in explained],
                                     [columns[n] for n in explained], recency)
        for n, strongest in zip(explained, sources):
            out[n].sources = [query_items[n][p] for p in strongest]
    return out


def _strongest_sources(neighbours: RowArrays, width: int, rows: list[list[int]],
                       columns: list[np.ndarray], recency: float,
                       max_cells: int = 2_000_000) -> list[list[int]]:
    """For each query (its items' rows of ``neighbours``, float32 over ``width`` columns,
    oldest first; its recommended ``columns``), per column the position of the item whose term
    ``recency^(L − p) · sim`` is largest, the earliest on a tie, as float32 as the scores.
    Queries in chunks: each chunk's items × chosen columns of the rows copied into a dense
    table (at most ``max_cells``), then every (query, item, column) term gathered from it."""
    if not rows or not len(neighbours.values):  # no query, or no term anywhere (the first
        return [[0] * len(query_cols) for query_cols in columns]  # item, as on any tie)
    longest, widest = max(map(len, rows)), max(max(map(len, columns)), 1)
    step = max(1, int((max_cells / (longest * widest)) ** 0.5))
    entry_rows = np.repeat(np.arange(len(neighbours.starts) - 1, dtype=np.int64),
                           np.diff(neighbours.starts))
    out: list[list[int]] = []
    for a in range(0, len(rows), step):
        out += _strongest_in_chunk(neighbours, width, entry_rows, rows[a:a + step],
                                   columns[a:a + step], recency, longest, widest)
    return out


def _strongest_in_chunk(neighbours: RowArrays, width: int, entry_rows: np.ndarray,
                        rows: list[list[int]], columns: list[np.ndarray], recency: float,
                        longest: int, widest: int) -> list[list[int]]:
    """:func:`_strongest_sources` for a few queries (``entry_rows``: each entry's row)."""
    item_rows = np.full((len(rows), longest), -1, np.int64)
    weights = np.zeros((len(rows), longest), np.float32)
    cols = np.full((len(rows), widest), -1, np.int64)
    for q, (query_rows, query_cols) in enumerate(zip(rows, columns)):
        item_rows[q, :len(query_rows)] = query_rows
        weights[q, :len(query_rows)] = [recency ** (len(query_rows) - 1 - p)
                                        for p in range(len(query_rows))]
        cols[q, :len(query_cols)] = query_cols
    # the chunk's rows and chosen columns numbered densely (padding, -1, maps to the last);
    # no boolean indexing: with random masks it costs ~10 ns an element in branch misses
    row_of, used_rows = _dense_numbers(item_rows, len(neighbours.starts) - 1)
    col_of, used_cols = _dense_numbers(cols, width)
    table = np.zeros((used_rows + 1, used_cols + 1), np.float32)
    r, c = row_of[entry_rows], col_of[neighbours.cols]
    kept = np.flatnonzero((r < used_rows) & (c < used_cols))
    table[r[kept], c[kept]] = neighbours.values[kept]
    terms = table[row_of[item_rows][:, :, None], col_of[cols][:, None, :]] * weights[:, :, None]
    terms[item_rows < 0] = -np.inf  # padding never wins
    best = terms.argmax(axis=1)  # queries × columns
    return [best[q, :len(query_cols)].tolist() for q, query_cols in enumerate(columns)]


def _dense_numbers(values: np.ndarray, size: int) -> tuple[np.ndarray, int]:
    """(a map of each number in ``range(size)`` to its rank among the distinct ``values``
    ≥ 0, numbers not among them (and -1, at the end) to that count; the count)."""
    present = np.zeros(size + 1, bool)
    present[values] = True  # -1 marks the extra last slot
    used = np.flatnonzero(present[:size])
    number = np.full(size + 1, len(used), np.int64)
    number[used] = np.arange(len(used))
    return number, len(used)
