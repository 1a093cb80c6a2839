"""Blend candidate sources, then re-rank: seen-filter, exclusions, pins, MMR diversity, freshness
boost and exposure fairness. Every item keeps an explanation.

Blend (documented ranking): each source's scores are divided by that source's best score, so
every source contributes on a 0–1 scale, and

    score(i) = Σ_s weight_s · norm_s(i) + freshness_weight · 2^(−age(i) / freshness_half_life)

with ``age`` the time since the item was first seen. Default weights: session 1.0, cooc 0.1,
ann 0.02, trending 0.01 — chosen on a validation split (``bench/tune_blend.py``), where larger
weights for the weaker sources cost HR@20; the others mostly order what session-kNN cannot
score (users between sessions, new items). Long-term sources (``als`` 1.0, ``history`` 0.75)
take ``user_blend``'s weights from MovieLens; ``ann_two_tower`` (1.0) was chosen for this
pipeline on MovieLens's validation part (``blend_user``); ``content`` stays 0.1 (see below).

The explanation is the source contributing most ("because you viewed X" for co-occurrence with
the session item it came from, "trending", ...).

Re-ranking is greedy MMR: the next item maximises
``λ · score(i) − (1 − λ) · max_{j chosen} cos(v_i, v_j)`` subject to exposure fairness — at
most ``max_head_share`` of the list from head (popular) items and at least ``min_tail_share``
from the long tail (when the candidates allow: with no tail candidate left the head cap is
relaxed rather than the list cut short). Pins take their positions first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from itertools import chain

import numpy as np
from numba import njit

from online_models.base import vocabulary


@dataclass(slots=True)
class Candidate:
    item_id: str
    score: float
    reason: str


#: Each candidate source's weight in the blend, as live serving uses them unless a deployment
#: sets its own (``STREAMREC_SOURCE_WEIGHTS``). Chosen on a validation split of YooChoose
#: (bench/tune_blend.py; docs/models.md).
SOURCE_WEIGHTS: dict[str, float] = {
    "session": 1.0, "cooc": 0.1, "ann": 0.02, "trending": 0.01,
    # returning users, when the worker runs these models: user_blend's weights relative to
    # session (bench/tune_user.py, MovieLens); the trainer's two-tower versions
    # (STREAMREC_TRAINER_DIR) chosen for this pipeline on MovieLens's validation part
    # (bench/tune_blend.py --protocol user: 1.0 over 0.5). Content won there at 1.5 too (HR@10
    # 0.1144 against 0.1086 at 0.1), but where many items tie at its top score (the
    # simulator's descriptions) 1.5 hands every feed to it: 0.1 unless a deployment sets it.
    # gru4rec and sasrec at their best weights beside session on the validation split
    # (bench/tune_session_seq.py; sasrec's is session_seq's)
    "als": 1.0, "history": 0.75, "content": 0.1, "ann_two_tower": 1.0, "gru4rec": 0.1,
    "sasrec": 1.0}


@dataclass(frozen=True)
class RerankPolicy:
    mmr_lambda: float = 0.8
    max_head_share: float = 0.6
    min_tail_share: float = 0.2
    freshness_weight: float = 0.0  # > 0 boosts new items (YooChoose validation: 0.05 cost HR)
    freshness_half_life_s: float = 86400.0
    pool_per_slot: int = 5  # re-rank the best 5·k candidates (at least 50): pool_size
    source_weights: dict[str, float] = field(default_factory=lambda: dict(SOURCE_WEIGHTS))

    def pool_size(self, k: int) -> int:
        """How many candidates (after the seen-filter) re-ranking chooses a list of ``k`` from."""
        return max(self.pool_per_slot * k, 50)


@dataclass(slots=True)
class SourceList:
    """One source's candidates for one request (or :func:`blend`'s list of them all): items
    best first, their scores, and why — one reason for all of them or one per item. Iterates
    as ``(item, score, reason)``."""

    items: list[str]
    scores: np.ndarray
    reasons: str | list[str]

    def all_reasons(self) -> list[str]:
        """One reason per item."""
        return [self.reasons] * len(self.items) if isinstance(self.reasons, str) \
            else self.reasons

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self):
        return zip(self.items, self.scores.tolist(), self.all_reasons())


def blend(sources: dict[str, SourceList], policy: RerankPolicy,
          item_age_s: dict[str, float] | None = None, limit: int | None = None
          ) -> SourceList:
    """``sources``: name → its list; returns the blended list best first (the best ``limit``
    items, where given), each item with the reason of its largest term (the first on a tie)."""
    return blend_pass([sources], policy, item_age_s, [limit])[0]


def blend_pass(requests: list[dict[str, SourceList]], policy: RerankPolicy,
               item_age_s: dict[str, float] | None = None,
               limits: list[int | None] | None = None) -> list[SourceList]:
    """:func:`blend` for each request's sources at once: one item numbering and one compiled
    pass for them all (a serving pass blends a few dozen lists of a few hundred candidates).
    Columns, not one object per candidate: most never reach the list (:func:`rerank`)."""
    lists = [[(policy.source_weights.get(name, 0.0), rows) for name, rows in sources.items()
              if len(rows)] for sources in requests]
    every = list(chain.from_iterable(lists))
    if not every:
        return [SourceList([], np.empty(0), []) for _ in requests]
    flat = list(chain.from_iterable(rows.items for _, rows in every))
    number = vocabulary([flat])  # one number per item in the pass, first seen first
    names = list(number)
    ids = np.fromiter(map(number.__getitem__, flat), np.int64, len(flat))
    lengths = np.fromiter((len(rows) for _, rows in every), np.int64, len(every))
    list_starts = np.concatenate(([0], np.cumsum(lengths)))  # each list's first term
    scores = np.concatenate([np.asarray(rows.scores, np.float64) for _, rows in every])
    tops = np.maximum.reduceat(scores, list_starts[:-1])
    # weight · score / top, as the documented sum (a list whose top is 0 divides by 1)
    parts = np.repeat([weight for weight, _ in every], lengths) * scores \
        / np.repeat(np.where(tops == 0.0, 1.0, tops), lengths)
    fresh = np.zeros(len(names))
    if item_age_s:
        for n, item in enumerate(names):
            if item in item_age_s:
                fresh[n] = policy.freshness_weight * 2.0 ** (
                    -item_age_s[item] / policy.freshness_half_life_s)
    request_starts = list_starts[np.concatenate(([0], np.cumsum([len(one) for one in lists])))]
    limits = limits or [None] * len(requests)
    terms, totals, starts = _blend_ranked(
        ids, parts, request_starts, len(names), fresh,
        np.array([-1 if limit is None else limit for limit in limits], np.int64))
    reasons = list(chain.from_iterable(rows.all_reasons() for _, rows in every))
    out = []
    for n, limit in enumerate(limits):
        chosen, values = terms[starts[n]:starts[n + 1]], totals[starts[n]:starts[n + 1]]
        items = [names[code] for code in ids[chosen].tolist()]
        order = _ties_by_name(values, items)
        if order is not None:
            chosen, values, items = chosen[order], values[order], [items[i] for i in order]
        chosen, values, items = chosen[:limit], values[:limit], items[:limit]
        out.append(SourceList(items, values, [reasons[term] for term in chosen.tolist()]))
    return out


@njit(cache=True, nogil=True)
def _blend_ranked(ids, parts, request_starts, code_count, fresh,
                  limits):  # pragma: no cover (compiled)
    """Per request (its terms ``request_starts[r]:request_starts[r + 1]``): each item's total
    (its terms summed in order, plus ``fresh[item]``), its largest term (the first on a tie),
    and the items by falling total, the best ``limits[r]`` (all where < 0) and any tied with
    the last of them. Returns (each ranked item's largest term, its total, each request's
    start in those)."""
    total = np.zeros(code_count)
    largest = np.zeros(code_count)
    strongest = np.zeros(code_count, np.int64)
    owner = np.full(code_count, -1, np.int64)
    out_terms = np.empty(len(ids), np.int64)
    out_totals = np.empty(len(ids))
    out_starts = np.zeros(len(request_starts), np.int64)
    written = 0
    for r in range(len(request_starts) - 1):
        first = request_starts[r]
        unique = np.empty(request_starts[r + 1] - first, np.int64)
        count = 0
        for t in range(first, request_starts[r + 1]):
            code = ids[t]
            if owner[code] != r:
                owner[code] = r
                total[code] = parts[t]
                largest[code] = parts[t]
                strongest[code] = t
                unique[count] = code
                count += 1
            else:
                total[code] += parts[t]
                if parts[t] > largest[code]:
                    largest[code] = parts[t]
                    strongest[code] = t
        values = np.empty(count)
        for n in range(count):
            total[unique[n]] += fresh[unique[n]]
            values[n] = -total[unique[n]]
        order = np.argsort(values, kind="mergesort")
        keep = count if limits[r] < 0 or limits[r] >= count else limits[r]
        while 0 < keep < count and values[order[keep]] == values[order[keep - 1]]:
            keep += 1  # ties at the cut stay: names order them
        for n in range(keep):
            code = unique[order[n]]
            out_terms[written] = strongest[code]
            out_totals[written] = total[code]
            written += 1
        out_starts[r + 1] = written
    return out_terms, out_totals, out_starts


def _ties_by_name(values: np.ndarray, names: list[str]) -> list[int] | None:
    """Where items ranked by falling ``values`` hold equal values: the order that puts each run
    of them in name order, so equal scores rank alike whichever source listed an item first
    (None where nothing ties)."""
    tied = values[1:] == values[:-1]  # item i ties with item i + 1
    if not tied.any():
        return None
    # each run of ties: where `tied` turns on (its first item) and off (one past its last)
    edges = np.flatnonzero(np.diff(np.concatenate(([False], tied, [False])).view(np.int8)))
    order = list(range(len(names)))
    for start, end in zip(edges[::2].tolist(), (edges[1::2] + 1).tolist()):
        order[start:end] = sorted(order[start:end], key=names.__getitem__)
    return order


def rerank(candidates: SourceList, k: int, policy: RerankPolicy, *,
           seen: frozenset[str] = frozenset(), exclude: frozenset[str] = frozenset(),
           pins: dict[int, Candidate] | None = None, head_items: frozenset[str] = frozenset(),
           vectors: dict[str, np.ndarray] | None = None) -> list[Candidate]:
    """The final list of at most ``k`` items from ``candidates`` (best first: :func:`blend`'s
    list); see the module doc."""
    pins = {p: c for p, c in (pins or {}).items() if 0 <= p < k}
    added = exclude | {c.item_id for c in pins.values()}
    blocked = seen | added if added else seen  # no copy of the seen set per list
    pool = [n for n, item in enumerate(candidates.items) if item not in blocked][
        :policy.pool_size(k)]
    items = [candidates.items[n] for n in pool]
    free = k - len(pins)
    max_head = math.floor(policy.max_head_share * k)
    is_head = np.array([item in head_items for item in items], bool)
    min_tail = min(math.ceil(policy.min_tail_share * k), len(items) - int(is_head.sum()))
    head_count = sum(1 for c in pins.values() if c.item_id in head_items)
    tail_count = len(pins) - head_count
    scores = np.asarray(candidates.scores, np.float64)[pool]
    normalised = scores / max(scores.max(initial=0.0), 1e-12)
    similarity = _cosine_matrix(items, vectors or {})
    order = mmr_order(normalised, is_head, similarity, policy.mmr_lambda, free, max_head,
                      min_tail, head_count, tail_count).tolist()
    reasons = candidates.all_reasons()
    chosen = [Candidate(items[n], score, reasons[pool[n]])
              for n, score in zip(order, scores[order].tolist())]
    out, rest = [], iter(chosen)
    for position in range(k):
        if position in pins:
            out.append(pins[position])
        else:
            nxt = next(rest, None)
            if nxt is None:
                continue
            out.append(nxt)
    return out


@njit(cache=True, nogil=True)
def mmr_order(scores, is_head, similarity, mmr_lambda, free, max_head, min_tail, head_count,
              tail_count):  # pragma: no cover (compiled)
    """Greedy MMR under the head/tail shares: the pool positions chosen, in order. Each step
    takes the first best ``λ · score − (1 − λ) · max cos(chosen)`` among the eligible (only tail
    items once the head cap is reached or the tail minimum needs every remaining slot, unless
    no tail item is left)."""
    n = len(scores)
    max_sim = np.zeros(n)
    available = np.ones(n, np.bool_)
    order = np.empty(min(free, n), np.int64)
    chosen = 0
    while chosen < free:
        tail_left = False
        any_left = False
        for i in range(n):
            if available[i]:
                any_left = True
                if not is_head[i]:
                    tail_left = True
        if not any_left:
            break
        tail_only = tail_left and (head_count >= max_head
                                   or min_tail - tail_count >= free - chosen)
        best, best_value = -1, 0.0
        for i in range(n):
            if available[i] and not (tail_only and is_head[i]):
                value = mmr_lambda * scores[i] - (1 - mmr_lambda) * max_sim[i]
                if best < 0 or value > best_value:
                    best, best_value = i, value
        if best < 0:
            break
        available[best] = False
        order[chosen] = best
        chosen += 1
        for i in range(n):
            if similarity[best, i] > max_sim[i]:
                max_sim[i] = similarity[best, i]
        if is_head[best]:
            head_count += 1
        else:
            tail_count += 1
    return order[:chosen]


def _cosine_matrix(pool: list[str], vectors: dict[str, np.ndarray]) -> np.ndarray:
    """Pairwise cosine similarity of the pool's vectors (0 where a vector is missing)."""
    rows = [(n, vectors[item]) for n, item in enumerate(pool) if item in vectors]
    if not rows:
        return np.zeros((len(pool), len(pool)), np.float32)
    matrix = np.zeros((len(pool), len(rows[0][1])), np.float32)
    matrix[[n for n, _ in rows]] = np.stack([v for _, v in rows])
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    matrix /= np.where(norms > 0, norms, 1.0)
    return matrix @ matrix.T
