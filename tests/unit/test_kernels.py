"""The compiled learning loops give exactly the state the plain Python loops gave."""

from collections import defaultdict

import msgspec
import numpy as np
import pytest

from online_models.cooccurrence import CooccurrenceModel
from online_models.session import SessionModel
from online_models.signals import SignalBatch, SignalMapper
from online_models.store import MemoryStore, trim_row
from stream.simulator import UserSimulator


class PythonLoopCooc(CooccurrenceModel):
    """The co-occurrence model's learning as one Python loop per event (the reference)."""

    def _learn(self, batch: SignalBatch):
        batch = self._paired(batch)
        if len(batch) == 0:
            return None
        factors = (np.ones(len(batch)) if self.half_life_s is None else np.exp2(
            (batch.timestamps - self._landmark(float(batch.timestamps[0]))) / self.half_life_s))
        owners = self._owners(batch).tolist()
        distinct = list(dict.fromkeys(owners))
        windows = {s: dict(row) for s, row in
                   zip(distinct, self.store.get_local_rows("win", distinct))}
        counts = defaultdict(lambda: defaultdict(float))
        mass = defaultdict(lambda: defaultdict(float))
        for session, item, ts, weight, factor in zip(
                owners, batch.items.tolist(), batch.timestamps.tolist(),
                batch.weights.tolist(), factors.tolist()):
            window, contribution = windows[session], factor * weight
            for other, seen_ts in window.items():
                if other != item and ts - seen_ts <= self.max_gap_s:
                    counts[item][other] += contribution
                    counts[other][item] += contribution
            mass[item]["n"] += contribution
            window[item] = ts
            trim_row(window, self.window)
        self.store.set_local_rows("win", windows)
        self.store.incr_rows("cooc", counts, keep_top=self.neighbours)
        self.store.incr_rows("mass", mass)


class PythonLoopSession(SessionModel):
    """The session model's learning as one Python loop per event (the reference)."""

    def _learn(self, batch: SignalBatch):
        batch = self._visits(batch)
        sessions = list(dict.fromkeys(batch.sessions.tolist()))
        rows = {s: dict(row) for s, row in
                zip(sessions, self.store.get_local_rows("sess", sessions))}
        new_sessions = sum(1 for s in sessions if not rows[s])
        item_sessions = defaultdict(dict)
        rules = defaultdict(lambda: defaultdict(float))
        new_in_session = defaultdict(float)
        last_position = {s: max(row.values(), default=0.0) for s, row in rows.items()}
        steps = self.steps
        recent = {s: sorted(((i, p) for i, p in row.items() if p > last_position[s] - steps),
                            key=lambda pair: pair[1]) for s, row in rows.items()}
        for session, item, ts in zip(batch.sessions.tolist(), batch.items.tolist(),
                                     batch.timestamps.tolist()):
            row = rows[session]
            position = last_position[session] + 1.0
            last_position[session] = position
            window = recent[session]
            for prev, prev_pos in window:
                if prev != item and row.get(prev) == prev_pos:
                    rules[prev][item] += 1.0 / (position - prev_pos)
            window.append((item, position))
            if window[0][1] <= position - steps:
                del window[0]
            if item not in row:
                new_in_session[item] += 1.0
            row[item] = position
            trim_row(row, self.max_session_items)
            item_sessions[item][session] = ts
        self.store.set_local_rows("sess", rows)
        self.store.set_rows("isess", item_sessions, keep_top=self.sessions_per_item)
        self.store.incr_rows("sr", rules, keep_top=self.rules_per_item)
        self.store.incr_rows("df", {item: {"n": n} for item, n in new_in_session.items()})
        if new_sessions:
            self.store.incr_rows("meta", {"sessions": {"n": float(new_sessions)}})


def _batches(seed: int, tied_times: bool):
    events = list(UserSimulator(30, 40, seed=seed, impressions=True).events(3000, 1.7e9, 2.0))
    if tied_times:  # many equal timestamps: trims break ties by item id
        events = [msgspec.structs.replace(e, timestamp=float(int(e.timestamp) // 60 * 60))
                  for e in events]
    mapper = SignalMapper()
    return [mapper.map(events[i:i + 250]) for i in range(0, len(events), 250)]


@pytest.mark.parametrize("compiled_model,python_loop,seed,tied,settings", [
    (CooccurrenceModel, PythonLoopCooc, 1, False, {}),
    (CooccurrenceModel, PythonLoopCooc, 2, True, {}),
    (CooccurrenceModel, PythonLoopCooc, 3, True, {"window": 3, "max_gap_s": 120.0}),
    (CooccurrenceModel, PythonLoopCooc, 4, False,
     {"scope": "user", "window": 12, "half_life_s": None}),
    (SessionModel, PythonLoopSession, 5, False, {"rules": "written"}),
    (SessionModel, PythonLoopSession, 6, True,
     {"rules": "written", "max_session_items": 6, "steps": 3}),
    (SessionModel, PythonLoopSession, 7, False, {"rules": "written", "max_session_items": 3,
                                                 "steps": 5, "sessions_per_item": 4,
                                                 "rules_per_item": 5}),
], ids=lambda v: v.__name__ if isinstance(v, type) else None)
def test_compiled_loop_gives_the_python_loops_state(compiled_model, python_loop, seed, tied,
                                                     settings):
    compiled = compiled_model(**settings).bind(MemoryStore())
    reference = python_loop(**settings).bind(MemoryStore())
    for batch in _batches(seed, tied):
        compiled.learn(batch)
        reference.learn(batch)
    assert compiled.store.rows.keys() == reference.store.rows.keys()
    for table, rows in reference.store.rows.items():
        assert compiled.store.rows[table] == rows, table
    pairs = "cooc" if compiled_model is CooccurrenceModel else "sr"
    assert len(compiled.store.rows[pairs]) > 10


@pytest.mark.parametrize("seed", range(5))
def test_weighted_row_sums_equal_a_sparse_product_bit_for_bit(seed):
    """The co-occurrence source's kernel sums what scipy's CSR product summed, in its order
    (queries repeat items: their weights add first), so lists did not move a bit."""
    import scipy.sparse as sp

    from online_models.kernels import weighted_row_sums

    rng = np.random.default_rng(seed)
    rows = sp.random(20, 300, density=0.1, random_state=seed, dtype=np.float32, format="csr")
    queries = [rng.integers(0, 20, rng.integers(0, 12)) for _ in range(15)]
    weights = [(0.5 ** np.arange(len(q))[::-1]).astype(np.float32) for q in queries]
    product = (sp.csr_matrix(
        (np.concatenate([np.empty(0, np.float32), *weights]),
         (np.repeat(np.arange(15), [len(q) for q in queries]),
          np.concatenate([np.empty(0, np.int64), *queries]))), shape=(15, 20)) @ rows).toarray()
    starts = np.concatenate(([0], np.cumsum([len(q) for q in queries]))).astype(np.int64)
    flat_rows = np.concatenate([np.empty(0, np.int64), *queries]).astype(np.int64)
    flat_weights = np.concatenate([np.empty(0, np.float32), *weights])
    by_row = np.lexsort((flat_rows, np.repeat(np.arange(15), np.diff(starts))))
    for a, b in ((0, 15), (3, 9)):
        block = weighted_row_sums(rows.indptr.astype(np.int64), rows.indices.astype(np.int64),
                                  rows.data, 300, starts, flat_rows[by_row], flat_weights[by_row],
                                  a, b)
        assert block.dtype == np.float32
        assert np.array_equal(block, product[a:b])


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_top_k_rows_are_the_best_positive_cells_ties_in_column_order(seed, dtype):
    """Each row's k best positive cells, equal scores in column order even where a tie
    straddles the cut (a sort of every positive cell, by score then column, is the oracle)."""
    from online_models.kernels import top_k_rows

    rng = np.random.default_rng(seed)
    block = rng.integers(-2, 6, (40, 60)).astype(dtype) / 2  # few values: many ties
    block[rng.random(block.shape) < 0.05] = np.nan
    for k in (1, 7, 60):
        best, scores, counts = top_k_rows(block, k)
        assert best.shape == scores.shape == (40, k) and scores.dtype == dtype
        for row, n, columns, values in zip(block, counts, best, scores):
            positive = [c for c in range(60) if row[c] > 0]
            expected = sorted(positive, key=lambda c: (-row[c], c))[:k]
            assert n == len(expected)
            assert columns[:n].tolist() == expected
            assert values[:n].tolist() == row[expected].tolist()


@pytest.mark.parametrize("seed", range(5))
def test_jaccard_members_equal_the_array_formula_bit_for_bit(seed):
    """Read-time Jaccard over a neighbourhood (the item itself left out) is what the numpy
    formula gave, bit for bit, so read-time co-occurrence lists did not move."""
    from online_models.kernels import jaccard_members

    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 80))
    codes = rng.permutation(1000)[:n].astype(np.int64)
    counts = rng.integers(1, 20, n).astype(np.float32).astype(np.float64)
    df = rng.integers(0, 400, n).astype(np.float64)  # some below their count: capped
    item_code = int(codes[rng.integers(0, n)]) if seed % 2 else -1
    df_item, sampled = float(rng.integers(0, 300)), int(rng.integers(1, 60))
    at, sims = jaccard_members(codes, counts, df, item_code, df_item, sampled)
    expected_at = np.flatnonzero(codes != item_code)
    c, df_b = counts[expected_at], df[expected_at]
    n_a = max(df_item, float(sampled))
    n_b = np.maximum(df_b, c)
    est = np.minimum(c * (n_a / sampled), np.minimum(n_a, n_b))
    assert at.tolist() == expected_at.tolist()
    assert np.array_equal(sims, est / np.maximum(n_a + n_b - est, 1e-12))


def test_codes_of_hashes_find_each_known_hash_and_only_those():
    from online_models.kernels import codes_of_hashes

    rng = np.random.default_rng(0)
    hashes = rng.integers(0, 2**63, 500, dtype=np.uint64) * np.uint64(2)  # even: all distinct
    order = np.argsort(hashes)
    known, known_codes = hashes[order], np.arange(500, dtype=np.int64)[order]
    asked = np.concatenate((hashes[::7], hashes[:5] + np.uint64(1),
                            np.array([0, 2**64 - 1], np.uint64)))
    code_of = dict(zip(hashes.tolist(), range(500)))
    assert codes_of_hashes(known, known_codes, asked).tolist() == [
        code_of.get(h, -1) for h in asked.tolist()]
    assert codes_of_hashes(known[:0], known_codes[:0], asked).tolist() == [-1] * len(asked)
