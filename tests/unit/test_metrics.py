import math

import numpy as np
import pytest

from replay.metrics import ListMetrics, gini, ranking_metrics
from replay.protocols import session_queries, run
from schemas.events import Interaction


def test_single_target_metrics_by_hand():
    m = ranking_metrics(["x", "y", "t", "z"], {"t"}, k=3)
    assert m == pytest.approx({"HR": 1.0, "MRR": 1 / 3, "NDCG": 1 / math.log2(4),
                               "Precision": 1 / 3, "Recall": 1.0, "MAP": 1 / 3})
    assert ranking_metrics(["x", "y", "t"], {"t"}, k=2) == dict.fromkeys(m, 0.0)


def test_multi_target_metrics_by_hand():
    m = ranking_metrics(["a", "x", "b", "y"], {"a", "b", "c"}, k=4)
    assert m["Precision"] == pytest.approx(2 / 4)
    assert m["Recall"] == pytest.approx(2 / 3)
    assert m["MAP"] == pytest.approx((1 / 1 + 2 / 3) / 3)
    ideal = 1 + 1 / math.log2(3) + 1 / math.log2(4)
    assert m["NDCG"] == pytest.approx((1 + 1 / math.log2(4)) / ideal)


def test_gini_extremes():
    assert gini(np.array([5, 5, 5, 5])) == pytest.approx(0.0)
    assert gini(np.array([0, 0, 0, 10])) == pytest.approx(0.75)


def test_list_metrics_by_hand():
    lm = ListMetrics([["a", "b"], ["a", "b"], ["a", "c"], ["d"]], ["a", "b", "c", "d", "e"])
    out = lm.summarise([["a", "b"], ["c", "d"]])
    assert out["coverage"] == pytest.approx(4 / 5)
    assert out["head_share"] == pytest.approx(1 / 4)  # head = top 20 % of 5 items = {"a"}
    # ILD: sim(a,b) = 2/sqrt(3*2); sim(c,d) = 0
    assert out["ILD"] == pytest.approx(np.mean([1 - 2 / np.sqrt(6), 1.0]))
    assert out["ARP"] == pytest.approx((3 + 2 + 1 + 1) / 4)


def test_session_queries_follow_the_protocol():
    evs = [Interaction(event_id=str(n), user_id=s, item_id=i, type="click",
                       timestamp=1.7e9 + n, session_id=s)
           for n, (s, i) in enumerate([("s1", "a"), ("s2", "x"), ("s1", "b"), ("s1", "a")])]
    preds = session_queries(evs)
    assert [(p.query.session_items, p.target) for p in preds] == [(("a",), "b"),
                                                                  (("a", "b"), "a")]


def hand_written_replay(model, evs, preds, chunk: int, k: int) -> tuple[int, int]:
    """(hits, predictions) of a plain predict-then-learn loop: the oracle of the runner."""
    from online_models.signals import SignalMapper

    mapper, hits, n = SignalMapper(), 0, 0
    for start in range(0, len(evs), chunk):
        batch = [p for p in preds if start <= p.position < start + chunk]
        for p, rec in zip(batch, model.recommend([p.query for p in batch], k)):
            assert not set(rec.items) & p.query.exclude
            hits += p.target in rec.items
            n += 1
        model.learn(mapper.map(evs[start:start + chunk]))
    return hits, n


def test_replay_equals_a_hand_written_predict_then_learn_loop():
    """The prequential runner is exactly test-then-train (river progressive-validation style)."""
    from online_models.popularity import PopularityModel
    from stream.simulator import UserSimulator

    evs = list(UserSimulator(30, 80, seed=4).events(1200, 1.7e9))
    [result] = run("prequential", evs, [], ["popularity"], ks=(5,), chunk=100, progress=False)
    hits, n = hand_written_replay(PopularityModel(), evs, session_queries(evs), 100, 5)
    assert result.metrics["HR@5"] == pytest.approx(hits / n)
    assert result.metrics["predictions"] == n


def _rating(n: int, user: str, item: str, kind: str) -> Interaction:
    return Interaction(event_id=str(n), user_id=user, item_id=item, type=kind,
                       timestamp=1.7e9 + n)


def test_user_queries_follow_the_protocol():
    from replay.protocols import user_queries

    log = [("u1", "a", "like"), ("u1", "b", "view"), ("u2", "a", "like"), ("u1", "c", "like"),
           ("u1", "a", "like"), ("u1", "d", "dislike"), ("u1", "e", "like")]
    evs = [_rating(n, *row) for n, row in enumerate(log)]
    preds = user_queries(evs, history=2, warmup=0.0)
    # every like is a target unless the user touched its item before (u1's second "a")
    assert [(p.query.user_id, p.target) for p in preds] == [
        ("u1", "a"), ("u2", "a"), ("u1", "c"), ("u1", "e")]
    last = preds[-1].query
    assert last.session_items == ("c", "a")  # the last 2 positives, oldest first
    assert last.exclude == {"a", "b", "c", "d"}  # everything touched, views and dislikes too
    assert [p.cold for p in preds] == [True, True, True, True]
    assert len(user_queries(evs, warmup=0.5)) == 2  # the first half replayed, not scored


def test_user_protocol_equals_a_hand_written_predict_then_learn_loop():
    from online_models.popularity import PopularityModel
    from replay.protocols import user_queries

    rng = np.random.default_rng(3)
    evs = [_rating(n, f"u{rng.integers(20)}", f"i{min(rng.zipf(1.3), 60)}",
                   str(rng.choice(["like", "like", "view", "dislike"]))) for n in range(1500)]
    [result] = run("user", evs, [], ["popularity"], ks=(10,), chunk=50, progress=False)
    hits, n = hand_written_replay(PopularityModel(), evs, user_queries(evs), 50, 10)
    assert n == result.metrics["predictions"] > 100
    assert result.metrics["HR@10"] == pytest.approx(hits / n)
    assert 0 < result.metrics["predictions_cold"] < n
