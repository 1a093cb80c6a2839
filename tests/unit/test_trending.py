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
