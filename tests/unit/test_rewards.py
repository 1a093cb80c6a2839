"""Served lists → impression log → events with recommendation ids → rewards → IPS."""

import numpy as np
import pytest

from replay.ope import ips, snips
from replay.rewards import join_rewards
from schemas.events import Interaction
from schemas.impressions import ImpressionLog, LoggedItem
from serving.explore import EpsilonGreedy


def test_logged_propensities_and_joined_rewards_give_unbiased_estimates():
    rng = np.random.default_rng(0)
    ctr = {"a": 0.05, "b": 0.05, "c": 0.05, "p": 0.30, "q": 0.10, "r": 0.02}
    policy = EpsilonGreedy(epsilon=0.5, reserved=(2,), seed=1)
    logs, events = [], []
    for n in range(20000):
        slots = policy.apply(["a", "b", "c"], ["p", "q", "r"])
        rec_id = f"r{n}"
        logs.append(ImpressionLog(rec_id, f"u{n % 50}", policy.name, "v1", 1.7e9 + n,
                                  [LoggedItem(s.item_id, s.position, s.propensity, 1.0, "x")
                                   for s in slots]))
        for s in slots:
            if rng.random() < ctr[s.item_id]:
                events.append(Interaction(event_id=f"e{n}-{s.position}", user_id=f"u{n % 50}",
                                          item_id=s.item_id, type="click",
                                          timestamp=1.7e9 + n, recommendation_id=rec_id,
                                          position=s.position))
    events.append(Interaction(event_id="skip", user_id="u0", item_id="a", type="skip",
                              timestamp=1.7e9, recommendation_id="r0", position=0))
    rounds = [r for r in join_rewards(logs, events) if r.position == 2]
    assert len(rounds) == 20000
    assert sum(r.reward for r in rounds) == sum(1 for e in events if e.position == 2)
    shown = np.array([r.item_id for r in rounds])
    rewards = np.array([r.reward for r in rounds])
    logging_p = np.array([r.propensity for r in rounds])
    for target in ("p", "c"):  # "always show `target` at position 2"
        target_p = (shown == target).astype(float)
        for estimator in (ips, snips):
            estimate = estimator(rewards, target_p, logging_p, n_boot=200)
            assert estimate.value == pytest.approx(ctr[target], abs=0.03), (target, estimate)
            assert estimate.covers(ctr[target])
