import numpy as np
import pytest

from online_models.trending import TRENDING_WEIGHTS, batch_deltas, decayed


def brute_force(items, ts, weights, now, half_life):
    scores: dict[str, float] = {}
    for item, t, w in zip(items, ts, weights):
        scores[item] = scores.get(item, 0.0) + w * 0.5 ** ((now - t) / half_life)
    return scores


@pytest.mark.parametrize("seed", range(5))
def test_forward_decay_equals_direct_decay(seed):
    rng = np.random.default_rng(seed)
    n, half_life = 500, 900.0
    items = rng.choice([f"i{k}" for k in range(40)], size=n).astype(object)
    ts = 1.7e9 + np.sort(rng.uniform(0, 7200, n))
    weights = rng.choice([0.0, 0.5, 1.0, 5.0], size=n)
    landmark = 1.7e9 - 3600
    # two batches against one landmark, as the Redis script accumulates them
    totals: dict[str, float] = {}
    for part in (slice(0, 200), slice(200, n)):
        ref = ts[part].max()
        uniq, deltas = batch_deltas(items[part], ts[part], weights[part], ref, half_life)
        for item, delta in zip(uniq, deltas):
            totals[item] = totals.get(item, 0.0) + delta * 2 ** ((ref - landmark) / half_life)
    now = ts.max() + 60
    expected = brute_force(items, ts, weights, now, half_life)
    for item, score in totals.items():
        assert decayed(score, landmark, now, half_life) == pytest.approx(expected[item], rel=1e-9)
    assert set(totals) == {i for i, w in zip(items, weights) if w} 


def test_half_life_halves():
    assert decayed(8.0, 0.0, 3 * 60.0, 60.0) == pytest.approx(1.0)


def test_zero_weight_events_dropped_and_weights_ordered():
    uniq, deltas = batch_deltas(np.array(["a"], dtype=object), np.array([0.0]), np.array([0.0]),
                                0.0, 60.0)
    assert len(uniq) == 0 and len(deltas) == 0
    assert TRENDING_WEIGHTS["purchase"] > TRENDING_WEIGHTS["add_to_cart"] > \
        TRENDING_WEIGHTS["click"] > TRENDING_WEIGHTS["impression"] == 0


def test_trending_rebases_over_decades_like_live():
    """22 years of events with a 1-hour half-life: finite scores, newest activity first (the
    landmark is rebased, as the live trending script does), and no overflow warning."""
    import warnings

    from online_models.base import Query
    from online_models.trending import TrendingModel
    from online_models.signals import SignalMapper
    from schemas.events import validate_event

    start, hour = 830_000_000.0, 3600.0  # 1996
    years = [start + y * 365 * 86400 for y in range(23)]
    events = []
    for n, t in enumerate(years):  # "old" is busy early, "new" only in the last hours
        events += [validate_event({"event_id": f"o{n}:{k}", "user_id": "u", "item_id": "old",
                                   "type": "click", "timestamp": t + k}) for k in range(20)]
    last = years[-1]
    events += [validate_event({"event_id": f"n{k}", "user_id": "u", "item_id": "new",
                               "type": "click", "timestamp": last + hour * (k / 40)})
               for k in range(40)]
    model = TrendingModel(half_life_s=hour)
    mapper = SignalMapper()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an overflow in exp2 would raise here
        for a in range(0, len(events), 50):
            model.learn(mapper.map(events[a:a + 50]))
    row = model.store.get_rows("pop", ["all"])[0]
    assert all(np.isfinite(v) for v in row.values())
    landmark = model.store.get_rows("meta", ["landmark"])[0]["t"]
    now = last + hour
    assert decayed(row["new"], landmark, now, hour) > decayed(row["old"], landmark, now, hour)
    # "old"'s last burst, 20 events an hour before "new"'s 40: brute force agrees
    expected = brute_force(["old"] * 20, [years[-1] + k for k in range(20)], [1.0] * 20, now,
                           hour)["old"]
    assert decayed(row["old"], landmark, now, hour) == pytest.approx(expected, rel=1e-6)
    [rec] = model.recommend([Query("u", ())], 2)
    assert rec.items == ["new", "old"]


@pytest.mark.parametrize("landmark, reference, expected", [
    (None, 50.0, (50.0, 1.0, 1.0)),
    (0.0, 10.0, (0.0, 1.0, 2.0)),  # one half-life past the landmark: deltas count double
    (0.0, 65 * 10.0, (650.0, 2.0 ** -65, 1.0)),  # rebased: old scores shrink, deltas as given
    (1000.0, 0.0, (1000.0, 1.0, 0.0)),  # 100 half-lives older than the landmark: nothing
])
def test_advance_landmark(landmark, reference, expected):
    from online_models.trending import advance_landmark

    assert advance_landmark(landmark, reference, 10.0) == pytest.approx(expected)
