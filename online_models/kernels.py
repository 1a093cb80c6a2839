"""Compiled inner loops of the online models (numba), over integer-coded batches.

The models keep their state and semantics; only the per-event loops that Python ran one
event at a time run here, over arrays (ids coded by :func:`code_ids`). Compiled on first use
and cached on disk beside this file (``cache=True``; where the folder is read-only numba
compiles again at each start, a few seconds).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from online_models.store import FlatRows


def code_ids(values: list[str]) -> tuple[list[str], dict[str, int]]:
    """Distinct ids sorted (code order = Python string order = Redis's member byte order, so
    ties broken by code are broken as the stores break them) and each id's code."""
    distinct = sorted(set(values))
    return distinct, {v: n for n, v in enumerate(distinct)}


@njit(cache=True, nogil=True)
def mf_epochs(user_vecs, item_vecs, rows_u, rows_i, targets, weights, learning_rate,
              regularisation, max_step_error, epochs):  # pragma: no cover (compiled)
    """Batch SGD of :class:`online_models.mf.OnlineMF`, in place: per epoch, every sample's
    clipped weighted error from the vectors as the epoch starts; each row then moves by the
    mean of its samples' steps (float32 throughout)."""
    n_users, dim = user_vecs.shape
    n_items = item_vecs.shape[0]
    inv_u = np.zeros(n_users, np.float32)
    inv_i = np.zeros(n_items, np.float32)
    for n in range(len(rows_u)):
        inv_u[rows_u[n]] += 1.0
        inv_i[rows_i[n]] += 1.0
    for r in range(n_users):
        if inv_u[r] > 0:
            inv_u[r] = 1.0 / inv_u[r]
    for r in range(n_items):
        if inv_i[r] > 0:
            inv_i[r] = 1.0 / inv_i[r]
    lr = np.float32(learning_rate)
    reg = np.float32(regularisation)
    cap = np.float32(max_step_error)
    step_u = np.zeros_like(user_vecs)
    step_i = np.zeros_like(item_vecs)
    for _ in range(epochs):
        step_u[:] = 0.0
        step_i[:] = 0.0
        for n in range(len(rows_u)):
            u, i = rows_u[n], rows_i[n]
            dot = np.float32(0.0)
            for k in range(dim):
                dot += user_vecs[u, k] * item_vecs[i, k]
            err = (targets[n] - dot) * weights[n]
            err = min(max(err, -cap), cap)
            su, si = lr * inv_u[u], lr * inv_i[i]
            for k in range(dim):
                p, q = user_vecs[u, k], item_vecs[i, k]
                step_u[u, k] += su * (err * q - reg * p)
                step_i[i, k] += si * (err * p - reg * q)
        user_vecs += step_u
        item_vecs += step_i


@njit(cache=True, nogil=True)
def _trim_window(items, stamps, length, keep):  # pragma: no cover (compiled)
    """Drop the oldest entries (ties: lowest item code) until ``keep`` remain; the new length."""
    while length > keep:
        low = 0
        for j in range(1, length):
            if stamps[j] < stamps[low] or (stamps[j] == stamps[low] and items[j] < items[low]):
                low = j
        length -= 1
        items[low], stamps[low] = items[length], stamps[length]
    return length


@njit(cache=True, nogil=True)
def cooc_pairs(owner_of, item_of, ts_of, contribution_of, win_items, win_ts, win_len,
               keep, limit, max_gap):  # pragma: no cover (compiled)
    """The co-occurrence model's event loop. Each event pairs its item with every other item
    of its owner's window seen within ``max_gap`` (both directions, in event order), then
    enters the window, which is cut back to its ``keep`` newest once past ``limit``. Windows
    (``win_*``, one row per owner) are updated in place; returns the pairs as (a, b, amount)."""
    width = win_items.shape[1]
    out_a = np.empty(2 * len(owner_of) * width, np.int64)
    out_b = np.empty_like(out_a)
    out_c = np.empty(len(out_a), np.float64)
    m = 0
    for e in range(len(owner_of)):
        o, item, t, c = owner_of[e], item_of[e], ts_of[e], contribution_of[e]
        length, found = win_len[o], -1
        for j in range(length):
            other = win_items[o, j]
            if other == item:
                found = j
            elif t - win_ts[o, j] <= max_gap:
                out_a[m], out_b[m], out_c[m] = item, other, c
                out_a[m + 1], out_b[m + 1], out_c[m + 1] = other, item, c
                m += 2
        if found >= 0:
            win_ts[o, found] = t
        else:
            win_items[o, length], win_ts[o, length] = item, t
            length += 1
        if length > limit:
            length = _trim_window(win_items[o], win_ts[o], length, keep)
        win_len[o] = length
    return out_a[:m], out_b[:m], out_c[:m]


def sum_pairs(ids: list[str], a: np.ndarray, b: np.ndarray, amounts: np.ndarray
              ) -> FlatRows:
    """``ids[a] → ids[b] → Σ amount`` over the pairs, each cell summed in pair order (as a
    loop adding them one by one would: the same float result)."""
    if not len(a):
        return FlatRows([], [0], [], [])
    cells, where = np.unique(a * len(ids) + b, return_inverse=True)
    sums = np.bincount(where, weights=amounts, minlength=len(cells)).tolist()
    row_of, col_of = np.divmod(cells, len(ids))  # cells are sorted: each row's are adjacent
    starts = np.flatnonzero(np.diff(row_of, prepend=-1))
    names = np.asarray(ids, dtype=object)
    return FlatRows(names[row_of[starts]].tolist(), [*starts.tolist(), len(cells)],
                    names[col_of].tolist(), sums)


def code_sums(ids: list[str], codes: np.ndarray, weights: np.ndarray | None = None
              ) -> FlatRows:
    """``{"n": Σ weight}`` (a count without weights) for each id among ``codes``, as
    one-member rows."""
    present = np.unique(codes)
    sums = np.bincount(codes, weights=weights, minlength=len(ids))[present]
    return FlatRows.column(np.asarray(ids, dtype=object)[present].tolist(), "n",
                           sums.astype(float).tolist())


def window_arrays(rows: list[dict[str, float]], code: dict[str, int], width: int
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Owners' windows ({item: time}) as the kernels' arrays: codes, times, lengths."""
    lengths = np.fromiter(map(len, rows), np.int64, len(rows))
    items = np.zeros((len(rows), width), np.int64)
    stamps = np.zeros((len(rows), width), np.float64)
    filled = np.arange(width) < lengths[:, None]
    total = int(lengths.sum())
    items[filled] = np.fromiter((code[i] for row in rows for i in row), np.int64, total)
    stamps[filled] = np.fromiter((t for row in rows for t in row.values()), np.float64, total)
    return items, stamps, lengths


def window_rows(ids: list[str], items: np.ndarray, stamps: np.ndarray, lengths: np.ndarray
                ) -> list[dict[str, float]]:
    """The kernels' window arrays back as rows ({item: time})."""
    filled = np.arange(items.shape[1]) < lengths[:, None]
    names = np.asarray(ids, dtype=object)[items[filled]].tolist()
    times = stamps[filled].tolist()
    bounds = [0, *np.cumsum(lengths).tolist()]
    return [dict(zip(names[lo:hi], times[lo:hi])) for lo, hi in zip(bounds, bounds[1:])]


@njit(cache=True, nogil=True)
def session_steps(session_of, item_of, row_items, row_pos, row_len, last_pos, steps, keep,
                  limit):  # pragma: no cover (compiled)
    """The session model's event loop. Each event takes its session's next position; every
    item whose latest position is within ``steps`` before it gains the rule ``item → this``
    worth ``1 / gap`` (in event order); the event's item takes the new position, and the row
    is cut back to its ``keep`` latest items once past ``limit``. Rows (``row_*``, one per
    session: item codes and positions) and ``last_pos`` are updated in place. Returns the
    rules as (a, b, amount) and, per event, whether its item was new to the row."""
    width = row_items.shape[1]
    out_a = np.empty(len(session_of) * min(steps, width), np.int64)
    out_b = np.empty_like(out_a)
    out_c = np.empty(len(out_a), np.float64)
    is_new = np.zeros(len(session_of), np.bool_)
    m = 0
    for e in range(len(session_of)):
        s, item = session_of[e], item_of[e]
        position = last_pos[s] + 1.0
        last_pos[s] = position
        length, found = row_len[s], -1
        for j in range(length):
            other = row_items[s, j]
            if other == item:
                found = j
            elif row_pos[s, j] >= position - steps:
                out_a[m], out_b[m], out_c[m] = other, item, 1.0 / (position - row_pos[s, j])
                m += 1
        if found >= 0:
            row_pos[s, found] = position
        else:
            is_new[e] = True
            row_items[s, length], row_pos[s, length] = item, position
            length += 1
        if length > limit:
            length = _trim_window(row_items[s], row_pos[s], length, keep)
        row_len[s] = length
    return out_a[:m], out_b[:m], out_c[:m], is_new


@njit(cache=True, nogil=True)
def weighted_row_sums(starts, cols, values, width, query_starts, query_rows, query_weights,
                      first, last):  # pragma: no cover (compiled)
    """Queries ``first..last`` as a dense float32 block of ``width`` columns: each query's
    entries (``query_starts[q]`` on: ``query_rows``, ``query_weights``, grouped by row, each
    group in its given order) weigh the rows (``starts``/``cols``/``values``, float32) they
    name; a group's weights are summed first, and rows are added in order: what a CSR product
    of the weights and the rows sums, term for term."""
    out = np.zeros((last - first, width), np.float32)
    for q in range(first, last):
        e, end = query_starts[q], query_starts[q + 1]
        while e < end:
            row, weight = query_rows[e], query_weights[e]
            e += 1
            while e < end and query_rows[e] == row:
                weight += query_weights[e]
                e += 1
            for j in range(starts[row], starts[row + 1]):
                out[q - first, cols[j]] += weight * values[j]
    return out


@njit(cache=True, nogil=True)
def session_knn_scores(starts, cols, values, query_starts, item_rows, item_weights,
                       rule_starts, rule_cols, rule_values, rule_weight, rule_row_of,
                       item_cols, repeat_weights, width, first, last
                       ):  # pragma: no cover (compiled)
    """:class:`online_models.session.SessionModel`'s scores of queries ``first..last`` as a
    dense float64 block of ``width`` columns. Per query (its items ``query_starts[q]`` on):
    its items' kNN rows (``starts``/``cols``/``values``, row ``item_rows[e]``) times their
    position weights, summed in order; the row scaled so its peak is 1 (times the peak's
    reciprocal); its last item's rule row (``rule_row_of[q]``, -1: none) times
    ``rule_weight`` added; each item's own column plus its repeat weight. Each cell is summed
    in that order (a session's repeated items add up, as repeated evidence should)."""
    out = np.zeros((last - first, width))
    for q in range(first, last):
        row = out[q - first]
        for e in range(query_starts[q], query_starts[q + 1]):
            weight = item_weights[e]
            r = item_rows[e]
            for j in range(starts[r], starts[r + 1]):
                row[cols[j]] += values[j] * weight
        peak = row.max() if width else 0.0
        scale = 1.0 / (peak if peak > 0 else 1.0)
        for c in range(width):
            row[c] *= scale
        r = rule_row_of[q]
        if r >= 0:
            for j in range(rule_starts[r], rule_starts[r + 1]):
                row[rule_cols[j]] += rule_values[j] * rule_weight
        for e in range(query_starts[q], query_starts[q + 1]):
            row[item_cols[e]] += repeat_weights[e]
    return out


@njit(cache=True, nogil=True)
def codes_of_hashes(known, known_codes, hashes):  # pragma: no cover (compiled)
    """The code of each of ``hashes`` where ``known`` (sorted) holds it (``known_codes``: the
    codes in ``known``'s order), else -1: one binary search per hash."""
    out = np.full(len(hashes), -1, np.int64)
    n = len(known)
    for j in range(len(hashes)):
        at = np.searchsorted(known, hashes[j])
        if at < n and known[at] == hashes[j]:
            out[j] = known_codes[at]
    return out


@njit(cache=True, nogil=True)
def jaccard_members(codes, counts, df, item_code, df_item, sampled):  # pragma: no cover
    """An item's Jaccard similarity to each member of its neighbourhood but itself (code
    ``item_code``): ``c / (n_a + n_b − c)``, the count ``c`` of shared sessions scaled from the
    item's ``sampled`` sessions to all of them (``n_a = max(df_item, sampled)``) and capped by
    both session counts (``n_b = max(df, c)``). Returns (the members' positions, their
    similarities), in member order."""
    n_a = max(df_item, float(sampled))
    scale = n_a / sampled
    at = np.empty(len(codes), np.int64)
    sims = np.empty(len(codes))
    m = 0
    for j in range(len(codes)):
        if codes[j] == item_code:
            continue
        c = counts[j]
        n_b = max(df[j], c)
        est = min(c * scale, min(n_a, n_b))
        sims[m] = est / max(n_a + n_b - est, 1e-12)
        at[m] = j
        m += 1
    return at[:m], sims[:m]


@njit(cache=True, nogil=True, inline="always")
def _worse(s, c, other_s, other_c):  # pragma: no cover (compiled)
    """Whether cell (score ``s``, column ``c``) ranks below the other: a lower score, or an
    equal score in a later column."""
    return s < other_s or (s == other_s and c > other_c)


@njit(cache=True, nogil=True, inline="always")
def _sift_down(heap_s, heap_c, n, s, c):  # pragma: no cover (compiled)
    """Put (``s``, ``c``) at the root of the heap's first ``n`` entries and sift it down."""
    i = 0
    while True:
        child = 2 * i + 1
        if child >= n:
            break
        right = child + 1
        if right < n and _worse(heap_s[right], heap_c[right], heap_s[child], heap_c[child]):
            child = right
        if _worse(s, c, heap_s[child], heap_c[child]):
            break
        heap_s[i], heap_c[i] = heap_s[child], heap_c[child]
        i = child
    heap_s[i], heap_c[i] = s, c


@njit(cache=True, nogil=True)
def top_k_rows(block, k):  # pragma: no cover (compiled)
    """Each row's ``k`` best positive cells of a dense block (``k`` ≤ its width): columns
    (``rows × k``, int64; a row's first ``counts[row]`` hold), their scores and ``counts``.
    Best first; equal scores in column order. One scan a row, keeping a heap of the ``k``
    best so far (its root the worst: lowest score, then highest column)."""
    n_rows, width = block.shape
    best = np.zeros((n_rows, k), np.int64)
    scores = np.zeros((n_rows, k), block.dtype)
    counts = np.zeros(n_rows, np.int64)
    heap_s = np.empty(k, block.dtype)
    heap_c = np.empty(k, np.int64)
    for r in range(n_rows):
        n = 0
        for c in range(width):
            s = block[r, c]
            if not s > 0:
                continue
            if n < k:  # push, then sift up while worse than the parent
                i = n
                n += 1
                while i > 0:
                    parent = (i - 1) // 2
                    if _worse(heap_s[parent], heap_c[parent], s, c):
                        break
                    heap_s[i], heap_c[i] = heap_s[parent], heap_c[parent]
                    i = parent
                heap_s[i], heap_c[i] = s, c
            elif s > heap_s[0]:  # an equal score comes later in column order: not better
                _sift_down(heap_s, heap_c, n, s, c)
        counts[r] = n
        for out in range(n - 1, -1, -1):  # pop the worst into the last free place
            best[r, out], scores[r, out] = heap_c[0], heap_s[0]
            if out:
                _sift_down(heap_s, heap_c, out, heap_s[out], heap_c[out])
    return best, scores, counts


def warm_up() -> None:
    """Load (or compile) every kernel now, on tiny inputs, so that the first batch a worker
    applies does not wait for it."""
    one, zero = np.zeros(1, np.int64), np.zeros(1, np.float64)
    mf_epochs(np.zeros((1, 2), np.float32), np.zeros((1, 2), np.float32), one, one,
              np.zeros(1, np.float32), np.zeros(1, np.float32), 0.1, 0.1, 1.0, 1)
    cooc_pairs(one, one, zero, zero, np.zeros((1, 3), np.int64), np.zeros((1, 3)), one.copy(),
               1, 1, 1.0)
    session_steps(one, one, np.zeros((1, 3), np.int64), np.zeros((1, 3)), one.copy(),
                  zero.copy(), 1, 1, 1)
    weighted_row_sums(np.zeros(2, np.int64), one, np.zeros(1, np.float32), 1,
                      np.zeros(2, np.int64), np.zeros(1, np.int64), np.zeros(1, np.float32),
                      0, 1)
    session_knn_scores(np.zeros(2, np.int64), one, np.ones(1), np.zeros(2, np.int64), one,
                       np.ones(1), np.zeros(2, np.int64), one, np.ones(1), 1.0, one, one,
                       np.ones(1), 1, 0, 1)
    jaccard_members(one, np.ones(1), np.ones(1), 0, 1.0, 1)
    codes_of_hashes(np.zeros(1, np.uint64), one, np.zeros(1, np.uint64))
    for dtype in (np.float32, np.float64):  # the co-occurrence and session blocks
        top_k_rows(np.ones((1, 1), dtype), 1)
