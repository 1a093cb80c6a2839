"""Re-ranking constraints, exploration propensities, off-policy estimators."""

import numpy as np
import pytest

from replay.ope import dr, ips, snips
from serving.explore import EpsilonGreedy, ExplorationPool, Slot, ThompsonSampling
from serving.rerank import Candidate, RerankPolicy, SourceList, blend, blend_pass, rerank


def random_candidates(rng, n=60):
    return [Candidate(f"i{i}", float(s), "r") for i, s in enumerate(rng.random(n))]


def listed(candidates: list[Candidate]) -> SourceList:
    """Candidates as the blend lists them (best first, as given)."""
    return SourceList([c.item_id for c in candidates], np.array([c.score for c in candidates]),
                      [c.reason for c in candidates])


@pytest.mark.parametrize("seed", range(20))
def test_every_reranked_list_respects_the_constraints(seed):
    rng = np.random.default_rng(seed)
    candidates = sorted(random_candidates(rng), key=lambda c: -c.score)
    head = frozenset(f"i{i}" for i in rng.choice(60, 30, replace=False))
    seen = frozenset(f"i{i}" for i in rng.choice(60, 8, replace=False))
    exclude = frozenset({"i1", "i2"})
    pins = {0: Candidate("pinned", 9.0, "editorial")}
    vectors = {c.item_id: rng.normal(size=8) for c in candidates}
    policy = RerankPolicy(max_head_share=0.5, min_tail_share=0.3)
    out = rerank(listed(candidates), 10, policy, seen=seen, exclude=exclude, pins=pins,
                 head_items=head, vectors=vectors)
    ids = [c.item_id for c in out]
    assert len(ids) == 10 and len(set(ids)) == 10
    assert ids[0] == "pinned"
    assert not set(ids) & (seen | exclude)
    assert sum(i in head for i in ids) <= 5
    assert sum(i not in head for i in ids) >= 3


def test_mmr_prefers_a_diverse_item_over_a_near_duplicate():
    candidates = [Candidate("a", 1.0, ""), Candidate("a2", 0.99, ""), Candidate("b", 0.9, "")]
    vectors = {"a": np.array([1.0, 0]), "a2": np.array([1.0, 0.01]), "b": np.array([0, 1.0])}
    out = rerank(listed(candidates), 2, RerankPolicy(mmr_lambda=0.5, max_head_share=1.0,
                                             min_tail_share=0.0), vectors=vectors)
    assert [c.item_id for c in out] == ["a", "b"]


def test_blend_normalises_sources_and_keeps_the_strongest_reason():
    out = blend({"session": SourceList(["x", "y"], np.array([10.0, 5.0]), "next in session"),
                 "trending": SourceList(["y"], np.array([100.0]), "trending")},
                RerankPolicy(source_weights={"session": 1.0, "trending": 0.6},
                             freshness_weight=0.0))
    assert [(item, round(score, 6), reason) for item, score, reason in out] == [
        ("y", 1.1, "trending"), ("x", 1.0, "next in session")]


def blend_by_hand(sources, weights, limit, fresh=None):
    """The documented blend, one candidate at a time: (item, score, reason) best first
    (``fresh``: item → its freshness term)."""
    total, best = {}, {}
    for name, rows in sources.items():
        top = max((s for _, s, _ in rows), default=1.0) or 1.0
        for item, score, reason in rows:
            part = weights.get(name, 0.0) * score / top
            total[item] = total.get(item, 0.0) + part
            if item not in best or part > best[item][0]:
                best[item] = (part, reason)
    for item in total:
        total[item] += (fresh or {}).get(item, 0.0)
    ranked = sorted(total.items(), key=lambda kv: (-kv[1], kv[0]))[:limit]
    return [(item, score, best[item][1]) for item, score in ranked]


@pytest.mark.parametrize("seed", range(30))
def test_blend_equals_the_documented_sum_with_ties_and_a_cut(seed):
    rng = np.random.default_rng(seed)
    items = [f"i{n}" for n in range(12)]
    sources, weights = {}, {}
    for name in ("session", "cooc", "trending", "unweighted"):
        chosen = rng.choice(items, int(rng.integers(0, 9)), replace=False).tolist()
        scores = rng.integers(0, 4, len(chosen)).astype(float)  # ties, and all-zero lists
        reasons = [f"{name} {n}" for n in range(len(chosen))]
        sources[name] = SourceList(chosen, scores, reasons if seed % 2 else name)
        if name != "unweighted":
            weights[name] = float(rng.choice([0.5, 1.0, 0.1]))
    limit = int(rng.integers(1, 14))
    out = blend(sources, RerankPolicy(source_weights=weights), limit=limit)
    assert list(out) == blend_by_hand(
        {name: list(rows) for name, rows in sources.items()}, weights, limit)


def random_sources(rng, items):
    sources = {}
    for name in ("session", "cooc", "trending", "unweighted"):
        chosen = rng.choice(items, int(rng.integers(0, 9)), replace=False).tolist()
        scores = rng.integers(0, 4, len(chosen)).astype(float)  # ties, and all-zero lists
        sources[name] = SourceList(chosen, scores, [f"{name} {n}" for n in range(len(chosen))])
    return sources


@pytest.mark.parametrize("seed", range(20))
def test_a_pass_blends_each_request_as_the_documented_sum_with_freshness(seed):
    """Requests blended in one pass share one item numbering: each still gets its own sum,
    cut and reasons (an item's terms in another request never count), with freshness."""
    rng = np.random.default_rng(seed)
    items = [f"i{n}" for n in range(10)]
    requests = [random_sources(rng, items) for _ in range(int(rng.integers(1, 6)))]
    weights = {"session": 1.0, "cooc": 0.5, "trending": 0.1}
    ages = {item: float(rng.integers(0, 3)) * 3600 for item in items[::2]}
    policy = RerankPolicy(source_weights=weights, freshness_weight=0.25,
                          freshness_half_life_s=3600)
    fresh = {item: 0.25 * 2.0 ** (-age / 3600) for item, age in ages.items()}
    limits = [None if rng.random() < 0.3 else int(rng.integers(0, 12)) for _ in requests]
    blended = blend_pass(requests, policy, ages, limits)
    assert len(blended) == len(requests)
    for sources, limit, out in zip(requests, limits, blended):
        expected = blend_by_hand({name: list(rows) for name, rows in sources.items()},
                                 weights, limit, fresh)
        assert [(i, pytest.approx(s), r) for i, s, r in out] == expected


def test_epsilon_greedy_propensities_match_observed_frequencies():
    policy = EpsilonGreedy(epsilon=0.3, reserved=(1,), seed=0)
    ranked, pool = ["a", "b", "c"], ["b", "p", "q", "r"]
    counts, logged = {}, {}
    for _ in range(20000):
        slot = policy.apply(ranked, pool)[1]
        counts[slot.item_id] = counts.get(slot.item_id, 0) + 1
        logged[slot.item_id] = slot.propensity
    for item, n in counts.items():
        assert n / 20000 == pytest.approx(logged[item], abs=0.01), item
    assert sum(logged.values()) == pytest.approx(1.0)
    assert policy.apply(ranked, pool)[0].propensity == 1.0  # unreserved slots are fixed
    always = EpsilonGreedy(epsilon=1.0, reserved=(1,), seed=0)
    assert always.apply(ranked, pool, fixed=frozenset({1}))[1] == \
        EpsilonGreedy(0.0).apply(ranked, pool)[1]  # a pinned position is never explored


@pytest.mark.parametrize("policy", [EpsilonGreedy, ThompsonSampling])
def test_choose_gives_the_decided_slots_of_apply_and_nothing_else(policy):
    ranked, pool = ["a", "b", "c", "d", "e"], ["b", "p", "q"]
    explorer = policy(reserved=(1, 3, 9), seed=2)  # 9: past the list
    for n in range(200):
        state = explorer.rng.bit_generator.state
        full = explorer.apply(ranked, pool, fixed=frozenset({3}) if n % 2 else frozenset())
        explorer.rng.bit_generator.state = state
        chosen = explorer.choose(ranked, pool, fixed=frozenset({3}) if n % 2 else frozenset())
        assert [s.position for s in chosen] == ([1] if n % 2 else [1, 3])
        assert all(full[s.position] == s for s in chosen)
        assert all(s == Slot(ranked[p], p, 1.0, False) for p, s in enumerate(full)
                   if p not in {c.position for c in chosen})


@pytest.mark.parametrize("policy", [EpsilonGreedy, ThompsonSampling])
def test_a_pool_counted_from_sets_explores_as_its_list_does(policy):
    rng = np.random.default_rng(3)
    top = [f"t{n}" for n in range(40)]
    for _ in range(300):
        blocked = frozenset(rng.choice(top, int(rng.integers(0, 40)), replace=False).tolist())
        pool = ExplorationPool(top, frozenset(top), blocked)
        as_list = [i for i in top if i not in blocked]
        assert len(pool) == len(as_list) and list(pool) == as_list
        assert all((i in pool) == (i in as_list) for i in [*top, "elsewhere"])
    ranked = ["t1", "a", "t5", "t7", "b", "t9"]  # ranked items in the pool and outside it
    explorer = policy(reserved=(0, 1, 3, 4), seed=7)
    for n in range(500):
        blocked = frozenset(rng.choice(top, int(rng.integers(0, 40)), replace=False).tolist())
        state = explorer.rng.bit_generator.state
        slots = explorer.apply(ranked, ExplorationPool(top, frozenset(top), blocked))
        explorer.rng.bit_generator.state = state  # the same draws, on the pool as a list
        assert slots == explorer.apply(ranked, [i for i in top if i not in blocked]), n
        if policy is EpsilonGreedy:  # the documented propensities, options listed by hand
            shown = list(ranked)
            for position in explorer.reserved:
                slot = slots[position]
                options = [i for i in top if i not in blocked and (
                    i not in shown or i == shown[position])]
                if not options:  # nothing to explore with: the ranked item, as ranked
                    assert (slot.propensity, slot.explored) == (1.0, False)
                    continue
                share = explorer.epsilon / len(options)
                kept = shown[position] in options
                assert slot.propensity == pytest.approx(
                    share if slot.explored else (1 - explorer.epsilon) + share * kept)
                shown[position] = slot.item_id


def test_thompson_propensities_sum_to_one_and_match_the_policy():
    policy = ThompsonSampling(reserved=(0,), propensity_draws=4000, seed=1)
    for _ in range(50):
        policy.update("good", True)
    for item in ("good", "ok", "bad"):
        for _ in range(200):
            policy.update(item, False)
    options = ["good", "ok", "bad", "new"]
    probs = policy.win_probabilities(options)
    assert probs.sum() == pytest.approx(1.0)
    picks = [policy.apply(["x"], options)[0].item_id for _ in range(3000)]
    for item, p in zip(options, probs):
        assert picks.count(item) / 3000 == pytest.approx(p, abs=0.03), item


def test_off_policy_estimators_recover_a_known_policy_value():
    rng = np.random.default_rng(0)
    n_actions, n = 5, 200_000
    ctr = np.array([0.1, 0.2, 0.3, 0.05, 0.5])
    logging = np.full(n_actions, 1 / n_actions)
    target = np.array([0.05, 0.05, 0.1, 0.1, 0.7])
    actions = rng.integers(n_actions, size=n)
    rewards = (rng.random(n) < ctr[actions]).astype(float)
    truth = float(target @ ctr)
    q_hat = ctr + 0.05  # a biased reward model: DR still unbiased through the weights
    args = (rewards, target[actions], logging[actions])
    for estimate in (ips(*args, n_boot=200), snips(*args, n_boot=200),
                     dr(*args, q_hat[actions], np.full(n, target @ q_hat), n_boot=200)):
        assert estimate.value == pytest.approx(truth, abs=0.01)
        assert estimate.ci_low < estimate.value < estimate.ci_high
        assert estimate.covers(truth)


def test_open_bandit_check_intervals_cover_the_observed_thompson_ctr():
    from pathlib import Path

    from replay.ope import open_bandit_check

    data = Path(__file__).resolve().parents[3] / "shared" / "data" / "open-bandit-sample"
    assert data.is_dir(), f"shared data missing at {data}"
    result = open_bandit_check(data, "all", n_boot=300)
    truth = result["bts_observed_ctr"]["value"]
    for name in ("ips", "snips", "dr"):
        assert result[name]["covers_observed"], (name, result[name], truth)


def test_concurrent_on_demand_lists_share_batches_and_each_gets_its_own():
    import threading
    import time as clock

    from serving.api import OnDemandBatches

    calls, logged = [], []

    def compute(users, k, exclude, pins):
        calls.append((list(users), k))
        clock.sleep(0.02)  # requests arriving meanwhile wait for the next batch
        return [f"feed-of-{u}-{k}" for u in users]

    batches = OnDemandBatches(compute, logged.extend)
    results = {}

    def ask(n):
        results[n] = batches.feed(f"u{n}", k=5 if n % 2 else None)

    threads = [threading.Thread(target=ask, args=(n,)) for n in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert results == {n: f"feed-of-u{n}-{5 if n % 2 else None}" for n in range(40)}
    assert sorted(logged) == sorted(results.values())  # every list served was logged
    assert len(calls) < 40  # shared passes
    # one pass per distinct k: a list never takes another request's size
    assert all((int(u[1:]) % 2 == 1) == (k == 5) for users, k in calls for u in users)


def test_an_on_demand_batch_failure_reaches_every_request_and_the_next_batch_runs():
    import threading

    import pytest

    from serving.api import OnDemandBatches

    def log(feeds):
        if any(f == "feed-bad" for f in feeds):
            raise RuntimeError("impression log down")

    batches = OnDemandBatches(lambda users, *_: [f"feed-{u}" for u in users], log)
    with pytest.raises(RuntimeError, match="impression log down"):
        batches.feed("bad", None)
    assert batches.feed("good", None) == "feed-good"  # the lead was released
    out = []
    threads = [threading.Thread(target=lambda: out.append(batches.feed("x", None)))
               for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert out == ["feed-x"] * 10



def test_passes_computed_while_the_log_waits_are_logged_in_one_flush():
    """Under load passes finish faster than Kafka acks: they share the next flush (one
    produce and one wait instead of one each); a pass that failed fails alone."""
    import threading
    import time as clock

    import pytest

    from serving.api import OnDemandBatches

    release, flushes = threading.Event(), []

    def log(feeds):
        flushes.append(sorted(feeds))
        if len(flushes) == 1:
            release.wait(10)  # the first flush waits for its acks

    def compute(users, *_):
        if "bad" in users:
            raise ValueError("bad pass")
        return [f"feed-{u}" for u in users]

    batches = OnDemandBatches(compute, log)
    first = batches.submit("a", None)
    deadline = clock.time() + 10
    while not flushes and clock.time() < deadline:  # the first flush is out
        clock.sleep(0.001)
    later = {}
    for user in ("b", "bad", "c"):  # one pass each, computed while the first flush waits
        later[user] = batches.submit(user, None)
        deadline = clock.time() + 10
        while batches._computed.qsize() < len(later) and clock.time() < deadline:
            clock.sleep(0.001)
    release.set()
    assert first.result(10) == "feed-a"
    assert later["b"].result(10) == "feed-b" and later["c"].result(10) == "feed-c"
    with pytest.raises(ValueError, match="bad pass"):
        later["bad"].result(10)
    assert flushes == [["feed-a"], ["feed-b", "feed-c"]]

def test_on_demand_lists_record_their_seconds_by_stage_and_their_failures():
    """Each answered list: queued + computed + logged = total, its pass counted once (with
    its wall and thread CPU time); a failed pass or flush counts its lists as failed and
    records no list seconds."""
    import time as clock

    from prometheus_client import REGISTRY

    from serving.api import OnDemandBatches

    def sample(name, **labels):
        return REGISTRY.get_sample_value(name, labels) or 0.0

    stages = ("queued", "computed", "logged", "total")
    before = {stage: (sample("streamrec_on_demand_seconds_count", stage=stage),
                      sample("streamrec_on_demand_seconds_sum", stage=stage)) for stage in stages}
    passes = sample("streamrec_on_demand_pass_lists_count")
    clocks = {clock: (sample("streamrec_on_demand_pass_seconds_count", clock=clock),
                      sample("streamrec_on_demand_pass_seconds_sum", clock=clock))
              for clock in ("wall", "cpu")}
    failed = {stage: sample("streamrec_on_demand_failed_total", stage=stage)
              for stage in ("compute", "log")}

    def compute(users, *_):
        if "bad" in users:
            raise ValueError("bad pass")
        clock.sleep(0.01)
        return [f"feed-{u}" for u in users]

    def log(feeds):
        if "feed-unlogged" in feeds:
            raise RuntimeError("impression log down")
        clock.sleep(0.02)

    batches = OnDemandBatches(compute, log)
    assert [batches.feed(f"u{n}", None) for n in range(3)] == ["feed-u0", "feed-u1", "feed-u2"]
    for user in ("bad", "unlogged"):
        with pytest.raises((ValueError, RuntimeError)):
            batches.feed(user, None)
    after = {stage: (sample("streamrec_on_demand_seconds_count", stage=stage),
                     sample("streamrec_on_demand_seconds_sum", stage=stage)) for stage in stages}
    spent = {stage: after[stage][1] - before[stage][1] for stage in stages}
    assert all(after[stage][0] - before[stage][0] == 3 for stage in stages)
    assert spent["computed"] >= 3 * 0.01 and spent["logged"] >= 3 * 0.02
    assert spent["queued"] + spent["computed"] + spent["logged"] == pytest.approx(spent["total"])
    assert sample("streamrec_on_demand_pass_lists_count") - passes == 5
    # passes computed (the unlogged one too): wall ≥ the 10 ms each slept, CPU far less
    timed = {clock: (sample("streamrec_on_demand_pass_seconds_count", clock=clock) - count,
                     sample("streamrec_on_demand_pass_seconds_sum", clock=clock) - total)
             for clock, (count, total) in clocks.items()}
    assert timed["wall"][0] == timed["cpu"][0] == 4
    assert timed["wall"][1] >= 4 * 0.01 > timed["cpu"][1]
    assert sample("streamrec_on_demand_failed_total", stage="compute") - failed["compute"] == 1
    assert sample("streamrec_on_demand_failed_total", stage="log") - failed["log"] == 1


def _mmr_reference(scores, is_head, similarity, lam, free, max_head, min_tail, head_count,
                   tail_count):
    """The greedy MMR step as array operations (the compiled loop's definition)."""
    max_sim, available, chosen = np.zeros(len(scores)), np.ones(len(scores), bool), []
    while available.any() and len(chosen) < free:
        eligible = available.copy()
        if (available & ~is_head).any() and (head_count >= max_head
                                             or min_tail - tail_count >= free - len(chosen)):
            eligible &= ~is_head
        if not eligible.any():
            break
        value = lam * scores - (1 - lam) * max_sim
        best = int(np.flatnonzero(eligible)[np.argmax(value[eligible])])
        available[best] = False
        chosen.append(best)
        max_sim = np.maximum(max_sim, similarity[best])
        head_count, tail_count = (head_count + 1, tail_count) if is_head[best] else (
            head_count, tail_count + 1)
    return chosen


@pytest.mark.parametrize("seed", range(40))
def test_compiled_mmr_matches_the_array_definition(seed):
    from serving.rerank import mmr_order

    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 60))
    scores = rng.random(n).round(1)  # ties: the first best wins in both
    is_head = rng.random(n) < rng.random()
    vectors = rng.normal(size=(n, 4)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    similarity = vectors @ vectors.T
    args = (scores, is_head, similarity, float(rng.random()), int(rng.integers(0, 25)),
            int(rng.integers(0, 15)), int(rng.integers(0, 8)), int(rng.integers(0, 3)),
            int(rng.integers(0, 3)))
    assert mmr_order(*args).tolist() == _mmr_reference(*args)


def test_the_asgi_front_takes_plain_lists_itself_and_leaves_the_rest_to_the_app():
    import asyncio

    from serving.api import FastPaths

    app_calls, list_calls = [], []

    async def app(scope, receive, send):
        app_calls.append(scope["path"] + "?" + scope["query_string"].decode())
        await send({"type": "http.response.start", "status": 299, "headers": []})
        await send({"type": "http.response.body", "body": b"app"})

    async def plain_list(user_id, k):
        list_calls.append((user_id, k))
        if user_id == "broken":
            raise RuntimeError("impression log down")
        return b'{"list": true}'

    front = FastPaths(app, "redis://unused", lambda u: u, frozenset({"key-000000000001"}),
                            plain_list)

    def get(path, query=b"", key=b"key-000000000001"):
        sent = []

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": "GET", "path": path, "query_string": query,
                 "headers": [(b"x-api-key", key)] if key else []}
        asyncio.run(front(scope, None, send))
        return sent[0]["status"], sent[1]["body"]

    lists = "/v1/users/u%2F1/recommendations"
    assert get(lists) == (200, b'{"list": true}')
    assert get(lists, b"k=3") == (200, b'{"list": true}')
    assert list_calls == [("u%2F1", 20), ("u%2F1", 3)]
    for query in (b"k=3&exclude=x", b"k=0", b"k=1001", b"k=x", b"pin=0:a"):
        assert get(lists, query) == (299, b"app"), query  # FastAPI validates and answers
    assert get(lists, key=b"wrong-key-0000001")[0] == 299  # 401 comes from the app
    assert get("/v1/users/broken/recommendations")[0] == 299  # errors: the app retries
    assert len(list_calls) == 3


def test_cooccurrence_candidates_say_which_recent_item_they_come_from():
    from online_models.session import SessionModel
    from online_models.signals import SignalMapper
    from schemas.events import Interaction
    from serving.recommender import Recommender, Request

    visits = [("s1", "a"), ("s1", "x"), ("s2", "a"), ("s2", "x"), ("s3", "b"), ("s3", "y"),
              ("s4", "b"), ("s4", "x")]
    model = SessionModel()
    model.learn(SignalMapper().map([
        Interaction(event_id=f"e{n}", user_id=s, item_id=i, type="click", timestamp=1e9 + n,
                    session_id=s) for n, (s, i) in enumerate(visits)]))
    [row] = Recommender(trending=lambda n: [], cooc=model).candidates([Request("u", ("a", "b"))])
    reasons = {item: reason for item, _, reason in row["cooc"]}
    # x: Jaccard(a, x) = 2/3 weighted 0.5 (a is older) against Jaccard(b, x) = 1/4 weighted 1
    assert reasons == {"x": "because you viewed a", "y": "because you viewed b"}


def test_trending_candidates_skip_what_a_request_blocks_and_keep_their_length():
    from serving.recommender import PipelineConfig, Recommender, Request

    top = [(f"t{n}", 100.0 - n) for n in range(30)]
    recommender = Recommender(trending=lambda n: top[:n],
                              config=PipelineConfig(candidates_per_source=5))
    blocked, fresh = recommender.candidates([
        Request("u", ("t1",), exclude=frozenset({"t3"})), Request("v", ("x",))])
    assert list(blocked["trending"]) == [(f"t{n}", 100.0 - n, "trending") for n in (0, 2, 4, 5, 6)]
    assert list(fresh["trending"]) == [(f"t{n}", 100.0 - n, "trending") for n in range(5)]


def test_the_user_pipeline_replays_the_returning_users_sources_under_their_live_names():
    import time

    from online_models.signals import SignalMapper
    from serving.blended import BlendedModel
    from serving.recommender import Request
    from stream.simulator import UserSimulator

    model = BlendedModel(long_term=True)
    assert set(model.recommender.model_sources) == {"history", "als", "ann_two_tower"}
    assert model.recommender.content is model.parts["content"]
    assert set(model.recommender.model_sources) <= set(RerankPolicy().source_weights)
    events = list(UserSimulator(40, 200, seed=3).events(1500, time.time() - 1500))
    for start in range(0, len(events), 500):
        model.learn(SignalMapper().map(events[start:start + 500]))
    assert model.parts["two_tower"].version >= 1  # the trainer's schedule, in event time
    user = events[-1].user_id
    history = tuple(e.item_id for e in events if e.user_id == user)[-10:]
    [row] = model.recommender.candidates([Request(user, history)])
    assert {"session", "history", "als", "ann_two_tower", "trending"} <= set(row)
    assert all(len(row[name]) for name in ("history", "als", "ann_two_tower"))
    [feed] = model.recommender.recommend([Request(user, history, k=10)])
    assert len(feed.items) == 10
    model.close()


def test_pins_that_would_leave_the_list_ambiguous_are_refused():
    from fastapi import HTTPException

    from serving.api import parse_pins

    assert parse_pins(["0:a", "3:b"], 5, frozenset({"x"})) == ((0, "a"), (3, "b"))
    for pins, k, exclude, says in ((["5:a"], 5, (), "past the list (k=5"),
                                   (["0:a", "0:b"], 5, (), "pinned twice"),
                                   (["0:a", "2:a"], 5, (), "pinned twice"),
                                   (["1:a"], 5, {"a"}, "also excluded"),
                                   (["a"], 5, (), "must be <position>:<item_id>"),
                                   (["-1:a"], 5, (), "must be <position>:<item_id>")):
        with pytest.raises(HTTPException) as refused:
            parse_pins(pins, k, frozenset(exclude))
        assert refused.value.status_code == 422 and says in refused.value.detail, pins


def test_on_demand_passes_linger_for_more_while_requests_come_fast():
    """Requests coming faster than one per linger: a pass waits until its oldest request is
    ``linger_s`` old, and a request that came meanwhile shares it."""
    import time as clock

    from serving.api import OnDemandBatches

    passes = []

    def compute(users, *_):
        passes.append(list(users))
        return [f"feed-{u}" for u in users]

    batches = OnDemandBatches(compute, lambda feeds: None, linger_s=0.5)
    burst = [batches.submit(f"u{n}", None) for n in range(20)]  # gaps of microseconds
    assert [f.result(10) for f in burst] == [f"feed-u{n}" for n in range(20)]
    asked = clock.perf_counter()
    first = batches.submit("a", None)
    clock.sleep(0.1)
    second = batches.submit("b", None)
    assert (first.result(10), second.result(10)) == ("feed-a", "feed-b")
    assert passes[-1] == ["a", "b"]  # one pass for both
    assert clock.perf_counter() - asked >= 0.45  # "a" waited for company


def test_on_demand_passes_do_not_linger_when_requests_come_slower_than_the_linger():
    import time as clock

    from serving.api import OnDemandBatches

    batches = OnDemandBatches(lambda users, *_: list(users), lambda feeds: None, linger_s=1.0)
    assert batches.feed("a", None) == "a"  # no gap known yet: no wait
    clock.sleep(1.2)
    asked = clock.perf_counter()
    assert batches.feed("b", None) == "b"
    assert clock.perf_counter() - asked < 0.5  # one request per 1.2 s: nothing to wait for


def test_an_on_demand_pass_stops_lingering_once_enough_requests_share_it():
    import time as clock

    from serving.api import OnDemandBatches

    passes = []

    def compute(users, *_):
        passes.append(list(users))
        return list(users)

    batches = OnDemandBatches(compute, lambda feeds: None, linger_s=2.0, enough=3)
    for n in range(3):  # gaps of microseconds: it lingers from now on
        assert batches.feed(f"warm{n}", None) == f"warm{n}"
    asked = clock.perf_counter()
    futures = [batches.submit(u, None) for u in ("a", "b", "c")]
    assert [f.result(10) for f in futures] == ["a", "b", "c"]
    assert clock.perf_counter() - asked < 1.0  # three are enough: no wait for the linger
    assert passes[-1] == ["a", "b", "c"]
