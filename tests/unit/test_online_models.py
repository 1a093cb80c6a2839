"""Incremental maths against from-scratch recomputation on small data; known-answer cases."""

from collections import defaultdict

import numpy as np
import pytest

from online_models.base import (Columns, ItemCodes, Query, RowArrays, factorize, named_rows,
                                top_k_dense)
from online_models.cooccurrence import CooccurrenceModel, recommend_neighbours
from online_models.kernels import mf_epochs
from online_models.mf import OnlineMF, seeded_vectors
from online_models.popularity import PopularityModel
from online_models.session import SessionModel
from online_models.signals import SignalConfig, SignalMapper
from online_models.store import trim_row
from schemas.events import Interaction


def click(session, item, t, kind="click", dwell=None, duration=None, user=None):
    return Interaction(event_id=f"{session}-{item}-{t}", user_id=user or session, item_id=item,
                       type=kind, timestamp=1.7e9 + t, session_id=session, dwell_ms=dwell,
                       item_duration_ms=duration)


def random_sessions(seed=0, n_sessions=40, n_items=15, max_len=8):
    rng = np.random.default_rng(seed)
    evs, t = [], 0
    for s in range(n_sessions):
        for _ in range(rng.integers(1, max_len)):
            t += 1
            evs.append(click(f"s{s}", f"i{rng.integers(n_items)}", t))
    return sorted(evs, key=lambda e: (e.timestamp, e.session_id))


def learn_in_batches(model, evs, size):
    mapper = SignalMapper()
    for start in range(0, len(evs), size):
        model.learn(mapper.map(evs[start:start + size]))
    return model


# --- signals ---------------------------------------------------------------------------------
def test_signal_mapping_documented_table():
    m = SignalMapper(SignalConfig())
    assert m.weight(click("s", "i", 0, dwell=1000)) == -1.0  # short dwell = skip
    assert m.weight(click("s", "i", 0, kind="skip")) == -1.0
    assert m.weight(click("s", "i", 0, kind="purchase")) == 4.0
    assert m.weight(click("s", "i", 0, kind="impression")) == -0.05
    assert m.weight(click("s", "i", 0, kind="dislike")) == -2.0
    full = m.weight(click("s", "i", 0, dwell=60_000, duration=60_000))
    half = m.weight(click("s", "i", 0, dwell=30_000, duration=60_000))
    assert full == pytest.approx(1 + 0.5 * np.log1p(1.0)) and full > half > 1.0
    # without a duration, dwell is normalised by the item's running mean dwell
    m2 = SignalMapper()
    first = m2.weight(click("s", "j", 0, dwell=20_000))
    assert first == pytest.approx(1 + 0.5 * np.log1p(1.0))
    assert m2.weight(click("s", "j", 1, dwell=200_000)) > first


# --- session model -----------------------------------------------------------------------------
def brute_force_session_state(evs, steps, max_items):
    rules = defaultdict(lambda: defaultdict(float))
    sessions = defaultdict(dict)
    for e in evs:
        row = sessions[e.session_id]
        pos = max(row.values(), default=0.0) + 1
        for prev, p in row.items():
            if pos - p <= steps and prev != e.item_id:
                rules[prev][e.item_id] += 1.0 / (pos - p)
        row[e.item_id] = pos
        trim_row(row, max_items)
    return rules, sessions


@pytest.mark.parametrize("batch", [1, 7, 1000])
def test_session_model_state_equals_from_scratch(batch):
    evs = random_sessions()
    model = learn_in_batches(SessionModel(steps=3, rules="written", rules_per_item=10_000,
                                          max_session_items=4), evs, batch)
    rules, sessions = brute_force_session_state(evs, 3, 4)
    store = model.store
    for item, row in rules.items():
        assert store.get_rows("sr", [item])[0] == pytest.approx(dict(row))
    for session, row in sessions.items():
        assert store.get_rows("sess", [session])[0] == row
    df = defaultdict(int)
    for session in {e.session_id for e in evs}:
        for item in {e.item_id for e in evs if e.session_id == session}:
            df[item] += 1
    for item, n in df.items():
        assert store.get_rows("df", [item])[0]["n"] == n
    assert store.get_rows("meta", ["sessions"])[0]["n"] == len({e.session_id for e in evs})


def test_session_model_known_answer_next_item_and_repeat():
    evs = []
    for s in range(20):  # a → b → c in every training session
        evs += [click(f"s{s}", x, 3 * s + n) for n, x in enumerate("abc")]
    model = learn_in_batches(SessionModel(), evs, 10)
    [rec] = model.recommend([Query("new", ("a", "b"))], k=3)
    assert rec.items[0] == "b"           # repeat consumption: the last item ranks first
    [rec] = model.recommend([Query("new", ("a", "b"), exclude=frozenset("ab"))], k=1)
    assert rec.items == ["c"]


def test_session_model_ignores_impressions():
    model = learn_in_batches(SessionModel(), [click("s", "a", 0, kind="impression")], 10)
    assert model.store.get_rows("sess", ["s"]) == [{}]


# --- co-occurrence -------------------------------------------------------------------------------
@pytest.mark.parametrize("batch", [1, 5, 1000])
def test_cooccurrence_counts_equal_from_scratch(batch):
    evs = random_sessions(seed=2)
    model = learn_in_batches(CooccurrenceModel(window=3, max_gap_s=1e9, neighbours=10_000,
                                               half_life_s=1e12), evs, batch)
    counts = defaultdict(lambda: defaultdict(float))
    windows = defaultdict(dict)
    for e in evs:
        win = windows[e.session_id]
        for other in win:
            if other != e.item_id:
                counts[e.item_id][other] += 1.0
                counts[other][e.item_id] += 1.0
        win[e.item_id] = e.timestamp
        trim_row(win, 3)
    for item, row in counts.items():
        assert model.store.get_rows("cooc", [item])[0] == pytest.approx(dict(row), rel=1e-9)


def test_cooccurrence_decay_halves_old_evidence():
    model = CooccurrenceModel(half_life_s=100.0, max_gap_s=1e9, normalisation="none")
    learn_in_batches(model, [click("s1", "a", 0), click("s1", "b", 0),
                             click("s2", "a", 100), click("s2", "c", 100)], 10)
    row = model.store.get_rows("cooc", ["a"])[0]
    assert row["c"] == pytest.approx(2 * row["b"])  # one half-life newer: twice the weight


@pytest.mark.parametrize("normalisation", ["cosine", "jaccard", "lift", "none"])
def test_cooccurrence_normalisations(normalisation):
    model = CooccurrenceModel(normalisation=normalisation, half_life_s=1e12, max_gap_s=1e9)
    evs = [click("s1", "a", 0), click("s1", "b", 1), click("s2", "a", 2), click("s2", "b", 3),
           click("s3", "a", 4), click("s3", "c", 5)]
    learn_in_batches(model, evs, 100)
    sims = model.similar(["a"])[0]
    n = {"a": 3.0, "b": 2.0, "c": 1.0}
    c = {"b": 2.0, "c": 1.0}
    expected = {"cosine": lambda j: c[j] / np.sqrt(n["a"] * n[j]),
                "jaccard": lambda j: c[j] / (n["a"] + n[j] - c[j]),
                "lift": lambda j: c[j] * 6.0 / (n["a"] * n[j]),
                "none": lambda j: c[j]}[normalisation]
    for j in ("b", "c"):
        assert sims[j] == pytest.approx(expected(j))


def session_model_and_sessions(seed: int, n_sessions: int, n_items: int, batch: int):
    """A session model keeping every session of random ones, the sessions' item sets, and
    the items."""
    evs = random_sessions(seed=seed, n_sessions=n_sessions, n_items=n_items)
    model = learn_in_batches(SessionModel(sessions_per_item=1000), evs, batch)
    sessions: dict[str, set[str]] = defaultdict(set)
    for e in evs:
        sessions[e.session_id].add(e.item_id)
    return model, list(sessions.values()), sorted({e.item_id for e in evs})


def test_read_time_similarity_is_jaccard_over_sessions_counted_from_scratch():
    model, sessions, items = session_model_and_sessions(3, 60, 12, 37)
    df = {i: sum(i in s for s in sessions) for i in items}
    for item, sims in zip([*items, "unknown"], model.similar([*items, "unknown"])):
        expected = {}
        for other in items:
            c = sum(item in s and other in s for s in sessions)
            if other != item and c:
                expected[other] = c / (df[item] + df[other] - c)
        assert sims.keys() == expected.keys()
        assert all(sims[j] == pytest.approx(v) for j, v in expected.items())


def test_session_knn_rows_count_each_items_sessions_weighted_by_idf():
    model, sessions, items = session_model_and_sessions(5, 40, 10, 29)
    idf = {j: np.log(len(sessions) / sum(j in s for s in sessions)) + 1e-3 for j in items}
    for item, row in zip([*items, "unknown"], model.knn_rows([*items, "unknown"])):
        expected = {j: c * idf[j] for j in items
                    if (c := sum(item in s and j in s for s in sessions))}
        assert row.keys() == expected.keys()  # the item itself included: c(i, i) = df(i)
        assert all(row[j] == pytest.approx(v, rel=1e-6) for j, v in expected.items())


def test_kept_neighbour_rows_are_reused_until_too_old_and_bounded(monkeypatch):
    import online_models.store as store_module

    clock = [100.0]
    monkeypatch.setattr(store_module.time, "monotonic", lambda: clock[0])
    evs = [click("s1", "a", 0), click("s1", "b", 1)]
    model = learn_in_batches(SessionModel(), evs, 2)
    model.cache_rows(max_age_s=1.0, max_rows=2)
    assert model.knn_rows(["a"])[0].keys() == {"a", "b"}
    model.learn(SignalMapper().map([click("s1", "c", 2)]))
    assert model.knn_rows(["a"])[0].keys() == {"a", "b"}  # kept: at most 1 s old
    assert model.similar(["a"])[0].keys() == {"b"}  # counted with the kNN row
    assert model.similar(["c"])[0].keys() == {"a", "b"}  # not kept yet: counted now
    clock[0] += 1.5
    assert model.knn_rows(["a", "b"])[0].keys() == {"a", "b", "c"}
    model.learn(SignalMapper().map([click("s1", "d", 3)]))
    assert model.knn_rows(["c"])[0].keys() == {"a", "b", "c", "d"}  # evicts the oldest
    assert model.knn_rows(["a"])[0].keys() == {"a", "b", "c", "d"}
    model.cache_rows(0)
    model.learn(SignalMapper().map([click("s1", "e", 4)]))
    assert "e" in model.knn_rows(["a"])[0]


@pytest.mark.parametrize("rules", ["read", "written"])
def test_published_neighbourhoods_read_elsewhere_equal_the_ones_counted(rules):
    """What one process publishes (names as hashes), another process (other codes) reads:
    the same kNN, similarity and rule rows, and the same recommendations, counting nothing."""
    evs = random_sessions(seed=3, n_sessions=60, n_items=25)
    publisher = learn_in_batches(SessionModel(rules=rules), evs, 50)
    items = [f"i{n}" for n in range(27)]  # two never seen: published empty
    published = dict(zip(items, publisher.published_rows(items)[0]))

    reader = SessionModel(rules=rules)
    reader.store = publisher.store  # the same state, but codes of its own
    reader.cache_rows(max_age_s=60.0)
    reader.knn_rows(["i9", "zz"])  # other codes first
    asked = []
    reader.read_published_rows(lambda wanted: asked.extend(wanted) or [
        published.get(item) for item in wanted])
    reader._item_counts = None  # counting would fail: everything comes published
    queries = [Query("u", tuple(f"i{n}" for n in range(k, k + 4)), exclude=frozenset({"i3"}))
               for k in range(20)]
    got = reader.recommend(queries, k=10)
    # each item asked for once; i9 was kept (counted above)
    assert sorted(asked) == sorted({i for q in queries for i in q.session_items} - {"i9"})
    expected = publisher.recommend(queries, k=10)
    assert [r.items for r in got] == [r.items for r in expected]
    assert all(np.array_equal(a.scores, b.scores) for a, b in zip(got, expected))
    assert reader.knn_rows(items[:20]) == publisher.knn_rows(items[:20])
    assert reader.similar(items[:20]) == publisher.similar(items[:20])
    if rules == "read":
        assert reader.rule_rows(items[:20]) == publisher.rule_rows(items[:20])
    assert reader.knn_rows(["i25"]) == [{}]


def test_a_neighbourhood_counted_from_the_same_sample_is_not_counted_again():
    """The fingerprint of an item's sample (its sessions and their items) changes when one of
    its sessions gains an item, and only then; items given their current fingerprint are not
    counted (None), the others are counted as they would be alone."""
    evs = random_sessions(seed=5, n_sessions=40, n_items=20)
    model = learn_in_batches(SessionModel(), evs, 50)
    items = [f"i{n}" for n in range(20)]
    packed, prints = model.published_rows(items)
    assert all(p is not None for p in packed)
    assert model.published_rows(items, dict(zip(items, prints))) == ([None] * 20, prints)

    counting = []
    original = model._count_neighbourhoods
    model._count_neighbourhoods = lambda names, *rest: counting.extend(names) or original(
        names, *rest)
    sessions_of_i3 = set(model.store.get_rows("isess", ["i3"])[0])
    session = sorted(sessions_of_i3)[0]
    model.learn(SignalMapper().map([click(session, "i19", 10_000)]))  # i3's session grows
    changed = {i for i, row in zip(items, model.store.get_rows("isess", items))
               if session in row}
    again, new_prints = model.published_rows(items, dict(zip(items, prints)))
    assert {i for i, p in zip(items, again) if p is not None} == changed == set(counting)
    assert {i for i, a, b in zip(items, prints, new_prints) if a != b} == changed
    assert "i3" in changed and len(changed) < 20
    reader = SessionModel()  # what was counted for the changed items only, read elsewhere
    reader.store = model.store
    reader.read_published_rows(lambda wanted: [dict(zip(items, again))[i] for i in wanted])
    reader._item_counts = None  # counting would fail: everything comes published
    assert reader.knn_rows(sorted(changed)) == SessionModel.knn_rows(model, sorted(changed))


def test_a_published_neighbourhood_of_another_format_or_broken_is_counted_again():
    evs = random_sessions(seed=4)
    model = learn_in_batches(SessionModel(), evs, 50)
    expected = model.knn_rows(["i1", "i2", "i3"])
    [good], _ = model.published_rows(["i3"])
    model.read_published_rows(lambda items: [b"\x93\x02\x00\x00", b"not msgpack \xc1",
                                             good][-len(items):])
    assert model.knn_rows(["i1", "i2", "i3"]) == expected


def test_neighbourhoods_published_with_other_counting_options_are_counted_again(caplog,
                                                                              monkeypatch):
    import online_models.session as session_module

    monkeypatch.setattr(session_module, "_WARNED_APART", False)  # warned once per process
    evs = random_sessions(seed=6)
    publisher = learn_in_batches(SessionModel(steps=2), evs, 50)
    reader = SessionModel(steps=5)
    reader.store = publisher.store
    expected = reader.rule_rows(["i1", "i2"])
    published = dict(zip(["i1", "i2"], publisher.published_rows(["i1", "i2"])[0]))
    assert publisher.rule_rows(["i1", "i2"]) != expected  # the options change the rows
    reader.read_published_rows(lambda items: [published[i] for i in items])
    assert reader.rule_rows(["i1", "i2"]) == expected
    assert "counted with 'rules=read,steps=2" in caplog.text


def test_item_hashes_find_the_codes_of_names_hashed_before():
    from online_models.base import ItemCodes, ItemHashes, item_hash

    codes = ItemCodes()
    hashes = ItemHashes(codes)
    a_b = codes.codes(["a", "b"])
    assert hashes.of_codes(a_b).tolist() == [item_hash("a"), item_hash("b")]
    c = codes.codes(["c"])
    lookup = np.array([item_hash("b"), item_hash("c"), item_hash("a")], np.uint64)
    assert hashes.codes_of(lookup).tolist() == [a_b[1], -1, a_b[0]]  # c not hashed yet
    hashes.of_codes(np.concatenate((c, a_b)))
    assert hashes.codes_of(lookup).tolist() == [a_b[1], c[0], a_b[0]]
    assert item_hash("a") != item_hash("b") and item_hash("é") == item_hash("é")


def test_the_number_of_sessions_is_read_once_per_age_with_the_kept_rows(monkeypatch):
    import online_models.store as store_module

    clock = [100.0]
    monkeypatch.setattr(store_module.time, "monotonic", lambda: clock[0])
    model = learn_in_batches(SessionModel(), [click("s1", "a", 0), click("s1", "b", 1),
                                              click("s2", "c", 2), click("s2", "a", 3)], 2)
    reads = []
    get_rows = model.store.get_rows
    monkeypatch.setattr(model.store, "get_rows", lambda table, keys: (
        reads.append(table), get_rows(table, keys))[1])
    model.cache_rows(max_age_s=1.0)
    first = model.knn_rows(["a"])[0]
    model.knn_rows(["b"])
    assert reads.count("meta") == 1  # two counts, one read of N
    clock[0] += 1.5
    assert model.knn_rows(["a"])[0] == first and reads.count("meta") == 2


def test_coded_values_are_read_once_per_age_and_grow_with_the_codes(monkeypatch):
    import online_models.store as store_module
    from online_models.store import CodedValueCache

    clock, reads = [100.0], []
    monkeypatch.setattr(store_module.time, "monotonic", lambda: clock[0])

    def read(codes):
        reads.append(codes.tolist())
        return codes * 10.0 + clock[0]

    kept = CodedValueCache(max_age_s=1.0)
    assert kept.values(np.array([3, 1]), read).tolist() == [130.0, 110.0]
    clock[0] += 0.5
    assert kept.values(np.array([1, 7, 3]), read).tolist() == [110.0, 170.5, 130.0]
    assert reads == [[3, 1], [7]]  # only the code not kept yet
    clock[0] += 0.8  # 3 and 1 are 1.3 s old now, 7 is 0.8 s old
    assert kept.values(np.array([7, 3, 1000]), read).tolist() == [170.5, 131.3, 10101.3]
    assert reads[-1] == [3, 1000]
    assert kept.values(np.empty(0, np.int64), read).tolist() == []
    always = CodedValueCache(0.0)  # 0: nothing kept
    always.values(np.array([2]), read)
    always.values(np.array([2]), read)
    assert reads[-2:] == [[2], [2]]


def test_item_codes_join_rows_into_the_columns_a_vocabulary_gives():
    from online_models.base import ItemCodes, joined_columns, vocabulary

    rng = np.random.default_rng(2)
    rows = [list(dict.fromkeys(f"i{n}" for n in rng.integers(0, 30, rng.integers(0, 12))))
            for _ in range(20)]
    codes = ItemCodes()
    codes.codes([f"i{n}" for n in rng.permutation(30)[:10]])  # codes in another order first
    distinct, columns = joined_columns(np.concatenate([codes.codes(r) for r in rows]))
    vocab = vocabulary(rows)
    assert codes.names(distinct).tolist() == list(vocab)
    assert columns.tolist() == [vocab[i] for r in rows for i in r]
    empty, none = joined_columns(np.empty(0, np.int64))
    assert len(empty) == len(none) == 0


def test_joins_one_after_another_each_number_only_their_own_codes():
    """The join's scratch array is kept between calls (and grows): each call must find it
    as new, whatever earlier calls held."""
    from online_models.base import joined_columns

    rng = np.random.default_rng(5)
    for top in (10, 3, 50_000, 40, 7):
        codes = rng.integers(0, top, 200)
        distinct, columns = joined_columns(codes)
        first_seen = list(dict.fromkeys(codes.tolist()))
        assert distinct.tolist() == first_seen
        assert columns.tolist() == [first_seen.index(c) for c in codes.tolist()]


def test_kept_rows_score_as_rows_read_afresh_across_a_reset_of_the_codes(monkeypatch):
    import online_models.session as session_module

    model, _, items = session_model_and_sessions(6, 80, 25, 31)
    queries = [Query(f"u{n}", tuple(items[n:n + 1 + n % 4]), exclude=frozenset(items[n:n + 1]))
               for n in range(20)]
    afresh = model.recommend(queries, 10)
    model.cache_rows(max_age_s=60.0)
    monkeypatch.setattr(session_module, "MAX_ITEM_CODES", 12)
    generations = []
    for _ in range(3):  # the first pass codes more than 12 items: the next ones start over
        kept = model.recommend(queries, 10)
        assert [r.items for r in kept] == [r.items for r in afresh]
        assert all(np.array_equal(k.scores, a.scores) for k, a in zip(kept, afresh))
        generations.append(model._kept)
    assert generations[0] is not generations[1]


def test_read_time_similarity_scales_the_recent_sessions_sample_and_keeps_the_best():
    evs = [click("s1", "a", 0), click("s1", "b", 1), click("s2", "a", 2), click("s2", "c", 3),
           click("s3", "a", 4), click("s3", "b", 5), click("s4", "a", 6), click("s4", "c", 7),
           click("s5", "b", 8)]
    # a's sample: its 2 most recent sessions (s3, s4) of 4, so each count is doubled;
    # df: a 4, b 3, c 2
    sims = learn_in_batches(SessionModel(sessions_per_item=2), evs, 3).similar(["a"])[0]
    assert sims == {"b": pytest.approx(2 / (4 + 3 - 2)), "c": pytest.approx(2 / (4 + 2 - 2))}
    top = learn_in_batches(SessionModel(neighbours=1), evs, 3).similar(["a"])[0]
    assert top == {"c": pytest.approx(2 / (4 + 2 - 2))}  # all sessions: b 2/5, c 2/4


def test_rules_read_at_query_time_equal_the_rules_written_when_no_item_repeats():
    rng = np.random.default_rng(4)
    evs, t = [], 0
    for s in range(50):  # sessions of distinct items: where items repeat, the two differ
        for item in rng.permutation(14)[:rng.integers(1, 9)]:
            t += 1
            evs.append(click(f"s{s}", f"i{item}", t))
    written = learn_in_batches(SessionModel(rules="written", rules_per_item=1000), evs, 23)
    read = learn_in_batches(SessionModel(rules="read", sessions_per_item=1000), evs, 23)
    assert not read.store.rows.get("sr")  # nothing counted per pair while learning
    items = sorted({e.item_id for e in evs})
    rules = read.rule_rows(items)
    for item, rule in zip(items, rules):
        stored = written.rule_rows([item])[0]
        assert stored == written.store.get_rows("sr", [item])[0]
        assert rule.keys() == stored.keys() and all(
            rule[b] == pytest.approx(stored[b]) for b in rule), item
    queries = [Query("u", tuple(e.item_id for e in evs[i:i + 3])) for i in range(0, 60, 5)]
    assert ([r.items for r in read.recommend(queries, 5)]
            == [r.items for r in written.recommend(queries, 5)])


def test_rules_read_at_query_time_score_each_session_by_its_latest_positions():
    rng = np.random.default_rng(7)
    evs, t = [], 0
    for s in range(60):  # items repeat within sessions; sessions longer than the window
        for item in rng.integers(0, 12, rng.integers(1, 70)):
            t += 1
            evs.append(click(f"s{s}", f"i{item}", t))
    model = learn_in_batches(SessionModel(rules="read", sessions_per_item=20, steps=3), evs, 31)
    items = sorted({e.item_id for e in evs}) + ["never-seen"]
    expected = []  # by hand: a's recent sessions, each session's latest positions
    for item, sessions in zip(items, model.store.get_rows("isess", items)):
        rule: dict[str, float] = {}
        for row in model.store.get_local_rows("sess", list(sessions)):
            if item in row:
                for other, at in row.items():
                    if 0 < at - row[item] <= 3:
                        rule[other] = rule.get(other, 0.0) + 1.0 / (at - row[item])
        expected.append(rule)
    got = model.rule_rows(items)
    assert any(expected) and not expected[-1]
    for item, rule, want in zip(items, got, expected):
        assert rule.keys() == want.keys() and all(
            rule[b] == pytest.approx(want[b]) for b in rule), item


# --- popularity ----------------------------------------------------------------------------------
def test_popularity_counts_positive_events_only():
    evs = [click("s", "a", 0), click("s", "a", 1), click("s", "b", 2),
           click("s", "c", 3, kind="skip")]
    model = learn_in_batches(PopularityModel(), evs, 2)
    assert model.store.get_rows("pop", ["all"])[0] == {"a": 2.0, "b": 1.0}
    assert model.recommend([Query("x")], 5)[0].items == ["a", "b"]


# --- matrix factorisation ----------------------------------------------------------------------
def test_mf_batch_step_equals_hand_computed_gradient():
    model = OnlineMF(factors=4, negatives=0, epochs=1, learning_rate=0.1, regularisation=0.01)
    batch = SignalMapper().map([click("u", "a", 0, user="u")])
    p0 = seeded_vectors(["u"], 4, 0.1, "user")[0]
    q0 = seeded_vectors(["a"], 4, 0.1, "item")[0]
    model.learn(batch)
    err = 1.0 - p0 @ q0
    p1 = model.store.get_vectors("user", ["u"], 4)[0][0]
    q1 = model.store.get_vectors("item", ["a"], 4)[0][0]
    assert p1 == pytest.approx(p0 + 0.1 * (err * q0 - 0.01 * p0), rel=1e-5)
    assert q1 == pytest.approx(q0 + 0.1 * (err * p0 - 0.01 * q0), rel=1e-5)


def checkerboard(rounds: int, items_per_group: int) -> list[Interaction]:
    """Users 0-9 click items a*, users 10-19 items b* (implicit's known-answer style)."""
    rng = np.random.default_rng(0)
    evs, t = [], 0
    for _ in range(rounds):
        for u in range(20):
            t += 1
            evs.append(click(f"u{u}", f"{'a' if u < 10 else 'b'}"
                             f"{rng.integers(items_per_group)}", t, user=f"u{u}"))
    return evs


def test_mf_known_answer_two_taste_groups():
    """Checkerboard: each user's top item must come from their own group."""
    model = learn_in_batches(OnlineMF(factors=8, epochs=3, seed=1), checkerboard(60, 5), 200)
    recs = model.recommend([Query(f"u{u}") for u in range(20)], k=1)
    assert all(rec.items[0][0] == ("a" if u < 10 else "b") for u, rec in enumerate(recs))


def test_mf_skips_push_scores_down_and_changed_items_are_reported():
    model = OnlineMF(factors=8, negatives=0, epochs=5, learning_rate=0.2)
    before = model.learn(SignalMapper().map([click("u", "x", 0, user="u")]))
    assert before.changed_item_vectors == ["x"]
    score = lambda: model.store.get_vectors("user", ["u"], 8)[0][0] @ \
        model.store.get_vectors("item", ["x"], 8)[0][0]
    high = score()
    for t in range(1, 4):
        model.learn(SignalMapper().map([click("u", "x", t, kind="skip", user="u")]))
    assert score() < high


def _mf_epochs_reference(pu_all, qi_all, rows_u, rows_i, targets, weights, lr, reg, cap,
                         epochs):
    """The batch SGD step written as array maths (the kernel's definition)."""
    for _ in range(epochs):
        pu, qi = pu_all[rows_u], qi_all[rows_i]
        err = np.clip((targets - (pu * qi).sum(1)) * weights, -cap, cap)[:, None]
        for vecs, rows, step in ((pu_all, rows_u, err * qi - reg * pu),
                                 (qi_all, rows_i, err * pu - reg * qi)):
            counts = np.bincount(rows, minlength=len(vecs))[rows][:, None]
            delta = np.zeros_like(vecs)
            np.add.at(delta, rows, lr * step / counts)  # each row: the mean of its steps
            vecs += delta


def test_mf_catalogue_keeps_last_positive_times_to_the_minute():
    """An item clicked again within its minute keeps its catalogue score: the store has
    nothing to write for it (a popular item's entry is not rewritten at every batch)."""
    model = OnlineMF(factors=4)
    start = 1.7e9 + 40  # a minute's start (click() adds 1.7e9 to its times)
    assert start % 60 == 0
    model.learn(SignalMapper().map([click("u", "x", 45), click("u", "y", 99)]))
    assert model.store.get_rows("catalog", ["all"]) == [{"x": start, "y": start}]
    model.learn(SignalMapper().map([click("v", "x", 70), click("v", "y", 101)]))
    assert model.store.get_rows("catalog", ["all"]) == [{"x": start, "y": start + 60}]
    assert model.catalogue() == ["x", "y"]


def test_mf_kernel_takes_each_rows_mean_step():
    rng = np.random.default_rng(0)
    users, items = rng.normal(size=(5, 8)).astype(np.float32), rng.normal(size=(7, 8)).astype(
        np.float32)
    rows_u, rows_i = rng.integers(5, size=40), rng.integers(7, size=40)
    targets = (rng.random(40) > 0.5).astype(np.float32)
    weights = rng.random(40).astype(np.float32) * 3
    expected_u, expected_i = users.copy(), items.copy()
    _mf_epochs_reference(expected_u, expected_i, rows_u, rows_i, targets, weights, 0.5, 0.01,
                         2.0, 3)
    mf_epochs(users, items, rows_u, rows_i, targets, weights, 0.5, 0.01, 2.0, 3)
    assert np.allclose(users, expected_u, atol=1e-5) and np.allclose(items, expected_i,
                                                                      atol=1e-5)
    assert not np.allclose(users, rng.normal(size=(5, 8)))


def test_helpers_factorize_and_seeded_vectors():
    uniques, codes = factorize(np.array(["b", "a", "b"], dtype=object))
    assert uniques == ["b", "a"] and codes.tolist() == [0, 1, 0]
    v = seeded_vectors(["x", "x", "y"], 64, 0.1, "item")
    assert np.array_equal(v[0], v[1]) and not np.array_equal(v[0], v[2])
    assert abs(v.std() - 0.1) < 0.03


def test_top_k_dense_ties_and_exclusions():
    ids = np.array(["a", "b", "c", "d"], dtype=object)
    block = np.array([[1.0, 3.0, 3.0, 0.0]])
    [rec] = top_k_dense(ids, block.copy(), 3, [Query("u")])
    assert rec.items == ["b", "c", "a"]  # equal scores: column order; zero scores dropped
    [rec] = top_k_dense(ids, block.copy(), 3, [Query("u", exclude=frozenset({"b"}))])
    assert rec.items == ["c", "a"]


def test_columns_found_through_codes_as_through_names():
    """A block's columns joined from item codes find names (excluded items) by code, as a
    dict of the column names would: names never coded, coded elsewhere, repeated."""
    codes = ItemCodes()
    codes.codes([f"i{n}" for n in range(30)])
    picked = np.array([17, 3, 25, 8, 11], np.int64)
    by_code = Columns(codes.names(picked), picked, codes)
    by_name = Columns(codes.names(picked))
    asked = ["i3", "nowhere", "i11", "i0", "i3", "i17"]
    assert by_code.find(asked).tolist() == by_name.find(asked).tolist() == [1, -1, 4, -1, 1, 0]
    block = np.ones((2, 5))
    queries = [Query("u", exclude=frozenset({"i25", "i0"})), Query("v", exclude=frozenset())]
    assert ([r.items for r in top_k_dense(by_code, block.copy(), 5, queries)]
            == [r.items for r in top_k_dense(by_name.names, block.copy(), 5, queries)]
            == [["i17", "i3", "i8", "i11"], ["i17", "i3", "i25", "i8", "i11"]])


def test_user_scope_pairs_across_sessions_and_queries_the_stored_history():
    """Returning users: likes days apart (different sessions) still co-occur, and a query
    with an empty session is answered from the user's stored history."""
    day = 86_400
    evs = [click(f"v-{n}", item, n * day, kind="like", user="v")
           for n, item in enumerate(["a", "b", "c"])]
    evs += [click(f"w-{n}", item, 10 + n * day, kind="like", user="w")
            for n, item in enumerate(["a", "b"])]
    evs += [click("u-0", "a", 20, kind="like", user="u")]
    evs.sort(key=lambda e: e.timestamp)
    by_session = learn_in_batches(CooccurrenceModel(normalisation="cosine"), evs, 2)
    assert by_session.store.get_rows("cooc", ["a"])[0] == {}  # one item per session: no pairs
    model = learn_in_batches(CooccurrenceModel(
        scope="user", query="history", window=50, max_gap_s=float("inf"), half_life_s=None,
        normalisation="cosine"), evs, 2)
    assert model.store.get_rows("cooc", ["a"])[0] == pytest.approx({"b": 4.0, "c": 2.0})
    [rec] = model.recommend([Query("u", (), exclude=frozenset({"a"}))], 3)
    assert rec.items == ["b", "c"]  # from u's stored history ("a"), not the empty session
    with pytest.raises(ValueError, match="scope='user'"):
        CooccurrenceModel(query="history")


def test_mixture_sums_normalised_part_scores_with_weights():
    from online_models.mixture import MixtureModel

    evs = [click("s1", "x", 1), click("s1", "y", 2), click("s2", "y", 3), click("s3", "x", 4),
           click("s3", "z", 5), click("s4", "x", 6)]
    mixture = MixtureModel({"pop": (PopularityModel, 1.0),
                            "cooc": (lambda: CooccurrenceModel(normalisation="cosine"), 2.0)})
    learn_in_batches(mixture, evs, 3)
    query = Query("u", ("y",))
    pop = {i: s for i, s in zip(*(lambda r: (r.items, r.scores))(
        mixture.parts["pop"].recommend([query], 10)[0]))}
    cooc = {i: s for i, s in zip(*(lambda r: (r.items, r.scores))(
        mixture.parts["cooc"].recommend([query], 10)[0]))}
    expected = {i: pop.get(i, 0) / max(pop.values()) + 2.0 * cooc.get(i, 0) / max(cooc.values())
                for i in set(pop) | set(cooc)}
    [rec] = mixture.recommend([query], 10)
    assert rec.items == sorted(expected, key=lambda i: (-expected[i], i))
    assert rec.scores == pytest.approx([expected[i] for i in rec.items])


@pytest.mark.parametrize("seed", range(20))
def test_trim_row_equals_sorting_by_score_then_member_bytes(seed):
    rng = np.random.default_rng(seed)
    n, keep = int(rng.integers(2, 400)), int(rng.integers(1, 200))
    values = rng.choice([0.5, 1.0, 2.0, 3.25], size=n) if seed % 2 else rng.random(n)
    row = {f"{'é' if k % 3 == 0 else 'e'}{k}": float(v) for k, v in enumerate(values)}
    expected = dict(row)
    if len(expected) > keep + max(1, keep // 10):
        for member, _ in sorted(expected.items(),
                                key=lambda kv: (kv[1], kv[0].encode()))[:len(expected) - keep]:
            del expected[member]
    assert trim_row(dict(row), keep) == expected


def test_als_gram_matrices_equal_the_sum_over_stored_vectors():
    """The k×k Gram matrices are kept by adding each changed vector's q'q'ᵀ − qqᵀ: after many
    batches they equal Σ qqᵀ over every stored user and item vector."""
    from online_models.als import OnlineALS

    model = learn_in_batches(OnlineALS(factors=6), random_sessions(seed=3, n_sessions=60,
                                                                   n_items=30), 25)
    for table in ("user", "item"):
        vectors = np.stack(list(model.store.vectors[table].values())).astype(np.float64)
        gram = model._gram(table)
        assert np.allclose(gram, vectors.T @ vectors, atol=1e-4), table


def test_als_user_vector_is_the_exact_least_squares_solution():
    """A user's stored factors solve the iALS normal equations against the item factors and
    Gram matrix as they stood when the user's batch was learned."""
    from online_models.als import OnlineALS

    model = learn_in_batches(OnlineALS(factors=4, regularisation=0.5, alpha=2.0,
                                       unobserved_weight=0.1, recency=1.0),
                             random_sessions(seed=4), 40)
    items = {i: v.astype(np.float64) for i, v in model.store.vectors["item"].items()}
    gram = sum(np.outer(v, v) for v in items.values())
    before = {k: v.copy() for k, v in model.store.vectors.items()}
    model.learn(SignalMapper().map([click("new", "i1", 999, user="new"),
                                    click("new", "i2", 999, kind="like", user="new")]))
    history = model.store.get_local_rows("history", ["new"])[0]
    assert history == {"i1": 1.0, "i2": 2.0}
    lhs = 0.1 * gram + 0.5 * np.eye(4)
    rhs = np.zeros(4)
    for item, weight in history.items():
        confidence = 0.1 + 2.0 * weight
        lhs += (confidence - 0.1) * np.outer(items[item], items[item])
        rhs += confidence * items[item]
    expected = np.linalg.solve(lhs, rhs)
    assert model.store.vectors["user"]["new"] == pytest.approx(expected, rel=1e-4, abs=1e-5)
    assert "new" not in before["user"]


def test_als_known_answer_two_taste_groups_and_fold_in():
    """Checkerboard users get their group's items; an unknown user with two a-items in the
    session is folded in and gets a-items too."""
    from online_models.als import OnlineALS

    model = learn_in_batches(OnlineALS(factors=8), checkerboard(30, 8), 100)
    recs = model.recommend([Query(f"u{u}") for u in range(20)], k=3)
    assert all(item[0] == ("a" if u < 10 else "b") for u, rec in enumerate(recs)
               for item in rec.items)
    [anonymous] = model.recommend([Query("stranger", ("a1", "a2"))], k=3)
    assert anonymous.items and all(item[0] == "a" for item in anonymous.items)


def test_contextual_mixture_weighs_parts_by_how_much_history_the_user_has():
    from online_models.mixture import ContextualMixture, context_bucket
    from online_models.trending import TrendingModel

    assert [context_bucket(n) for n in (0, 9, 10, 49, 50, 199, 200)] == [0, 0, 1, 1, 2, 2, 3]
    model = ContextualMixture(
        {"plain": (PopularityModel, 1.0),
         "recent": (lambda: TrendingModel(half_life_s=1.0), 1.0)},
        {0: {"plain": 1.0, "recent": 0.0}, 1: {"plain": 0.0, "recent": 1.0}})
    likes = [("fan", "old", n) for n in range(5)]
    likes += [("veteran", f"v{n}", 10 + n) for n in range(10)]
    likes += [("fan", "new", 100), ("fan", "new", 101)]
    model.learn(SignalMapper().map([
        Interaction(event_id=f"e{n}", user_id=u, item_id=i, type="like", timestamp=1.7e9 + t)
        for n, (u, i, t) in enumerate(likes)]))
    newbie, veteran = model.recommend([Query("newbie"), Query("veteran")], k=1)
    assert newbie.items == ["old"]  # no history: the plain counts
    assert veteran.items == ["new"]  # ten events: what is hot now


def test_vector_table_holds_vectors_as_rows_of_one_matrix():
    from online_models.store import MemoryStore, VectorTable

    table = VectorTable()
    table.scatter(["a", "b", "a"], np.array([[1, 1], [2, 2], [3, 3]], np.float32))
    assert sorted(table) == ["a", "b"] and table["a"].tolist() == [3, 3]  # the last one wins
    got, found = table.gather(["b", "zz", "a"], 2)
    assert found.tolist() == [True, False, True] and got.tolist() == [[2, 2], [0, 0], [3, 3]]
    del table["a"]
    table.scatter([f"k{i}" for i in range(200)], np.arange(400, dtype=np.float32).reshape(200, 2))
    assert len(table) == 201 and table["k199"].tolist() == [398, 399] and "a" not in table
    assert table["b"].tolist() == [2, 2]  # kept through the matrix growing
    copied = table.copy()
    table["b"] = [9, 9]
    assert copied["b"].tolist() == [2, 2] and table["b"].tolist() == [9, 9]
    with pytest.raises(ValueError, match="3 dimensions"):
        table.scatter(["c"], np.zeros((1, 3)))
    # add_vectors: absent keys start from their base row, a repeated key keeps its last sum
    store = MemoryStore()
    store.set_vectors("t", ["x"], np.ones((1, 2)))
    store.add_vectors("t", ["x", "y", "x"], np.full((3, 2), 0.5), np.full((3, 2), 10.0))
    assert store.get_vectors("t", ["x", "y"], 2)[0].tolist() == [[1.5, 1.5], [10.5, 10.5]]
    # distinct keys (one row lookup each): new keys grow the matrix, stored ones add up
    fresh = [f"n{i}" for i in range(100)]
    store.add_vectors("t", ["x", *fresh], np.ones((101, 2)), np.full((101, 2), 2.0))
    got, found = store.get_vectors("t", ["x", "n0", "n99", "zz"], 2)
    assert found.tolist() == [True, True, True, False]
    assert got.tolist() == [[2.5, 2.5], [3, 3], [3, 3], [0, 0]]
    with pytest.raises(ValueError, match="3-dimension vectors asked of a table of 2"):
        store.get_vectors("t", ["x"], 3)


@pytest.mark.parametrize("seed", range(3))
def test_flat_rows_write_what_their_dicts_write(seed):
    """Rows held flat (what batch maths produce) are added and set exactly as the same rows
    as dicts: sums in order, a later member set over an earlier one, trims included."""
    from online_models.store import FlatRows, MemoryStore

    rng = np.random.default_rng(seed)
    flat, dicts = MemoryStore(), MemoryStore()
    for _ in range(30):
        keys = sorted({f"k{i}" for i in rng.integers(0, 8, 5)})
        bounds, members, values, set_members = [0], [], [], []
        for _key in keys:
            chosen = [f"m{i}" for i in rng.choice(40, int(rng.integers(1, 12)), replace=False)]
            members += chosen
            set_members += [f"m{i}" for i in rng.integers(0, 40, len(chosen))]  # repeats
            values += rng.normal(size=len(chosen)).round(3).tolist()
            bounds.append(len(members))
        added, set_ = FlatRows(keys, bounds, members, values), FlatRows(keys, bounds,
                                                                        set_members, values)
        flat.incr_flat_rows("a", added, keep_top=10)
        dicts.incr_rows("a", added.as_dicts(), keep_top=10)
        flat.set_flat_rows("s", set_, keep_top=10)
        dicts.set_rows("s", set_.as_dicts(), keep_top=10)
    assert flat.rows == dicts.rows and len(flat.rows["a"]) > 3


@pytest.mark.parametrize("seed", range(5))
def test_neighbour_scores_and_explanations_equal_the_sum_computed_by_hand(seed):
    rng = np.random.default_rng(seed)
    items = [f"i{n}" for n in range(12)]
    # similarities in quarters, so equal terms (ties) happen and the earliest item must win
    sims = {a: {b: float(rng.integers(1, 4)) / 4 for b in rng.choice(items, 6) if b != a}
            for a in items}
    sessions = [tuple(rng.choice(items, rng.integers(1, 6))) for _ in range(8)]
    queries = [Query(f"u{n}", s, exclude=frozenset(s[-1:])) for n, s in enumerate(sessions)]
    recs = recommend_neighbours(queries, sessions,
                                lambda keys: named_rows([sims[k] for k in keys]), 0.5,
                                k=100, explain=True)
    for query, session, rec in zip(queries, sessions, recs):
        terms = defaultdict(list)  # item -> [(term, position)]
        for p, a in enumerate(session):
            for b, sim in sims[a].items():
                terms[b].append((0.5 ** (len(session) - 1 - p) * sim, p))
        expected = {b: sum(t for t, _ in ts) for b, ts in terms.items()
                    if b not in query.exclude}
        assert set(rec.items) == set(expected)
        assert np.allclose(rec.scores, [expected[b] for b in rec.items])
        assert list(rec.scores) == sorted(rec.scores, reverse=True)
        for b, source in zip(rec.items, rec.sources):
            best = max(t for t, _ in terms[b])
            assert source == session[min(p for t, p in terms[b] if t == best)]


def test_explained_lists_whose_every_neighbour_is_excluded_come_back_empty():
    """A user who has seen every neighbour of their items: no list to explain (this raised
    ValueError, failing the feed builder's whole round, again each round)."""
    sims = {"a": {"b": 1.0}, "b": {"a": 1.0}}
    [rec] = recommend_neighbours([Query("u", ("a", "b"), exclude=frozenset("ab"))], [("a", "b")],
                                 lambda keys: named_rows([sims[k] for k in keys]), 0.5, k=10,
                                 explain=True)
    assert rec.items == []


def test_session_queries_whose_items_have_no_sessions_get_their_repeats_only():
    model = learn_in_batches(SessionModel(), [click("s1", "a", 0)], 1)
    [rec] = model.recommend([Query("u", ("x", "y"))], k=5)  # items nobody has visited
    assert rec.items == ["y", "x"]  # the newest first


@pytest.mark.parametrize("seed", range(4))
def test_strongest_source_of_each_column_is_the_largest_term_in_any_chunking(seed):
    import scipy.sparse as sp

    from online_models.cooccurrence import _strongest_sources

    rng = np.random.default_rng(seed)
    matrix = sp.random(30, 200, density=0.2, random_state=seed, dtype=np.float32, format="csr")
    matrix.data = np.round(matrix.data * 4) / 4  # ties
    matrix.sort_indices()
    dense = matrix.toarray()
    rows = [list(rng.integers(0, 30, rng.integers(1, 9))) for _ in range(25)]
    columns = [rng.choice(200, rng.integers(0, 40), replace=False) for _ in range(25)]
    expected = []
    for items, cols in zip(rows, columns):
        weights = [np.float32(0.5 ** (len(items) - 1 - p)) for p in range(len(items))]
        expected.append([max(range(len(items)), key=lambda p: (dense[items[p], c] * weights[p],
                                                                 -p)) for c in cols])
    flat = RowArrays(matrix.indptr.astype(np.int64), matrix.indices.astype(np.int64),
                     matrix.data)
    assert _strongest_sources(flat, 200, rows, columns, 0.5) == expected
    assert _strongest_sources(flat, 200, rows, columns, 0.5, max_cells=60) == expected
