"""Off-policy estimators (IPS, SNIPS, DR) with bootstrap confidence intervals, and the Open
Bandit Dataset check: estimate one logged policy's CTR from the other policy's log.

For logged rounds ``i`` with reward ``r_i``, logging propensity ``p_i = π₀(a_i)`` and target
probability ``π(a_i)``, the importance weight is ``w_i = π(a_i) / p_i``:

* IPS   ``V = mean(w · r)`` — unbiased when ``p_i > 0`` wherever ``π > 0``;
* SNIPS ``V = Σ w·r / Σ w`` — self-normalised: a little bias, much less variance;
* DR    ``V = mean(q̂_π + w · (r − q̂(a_i)))`` with a reward model ``q̂`` and its value under the
  target policy ``q̂_π = Σ_a π(a) q̂(a)`` — unbiased if either the weights or ``q̂`` are right.

Intervals are percentile bootstraps over rounds (seeded).
"""

from __future__ import annotations

import csv
from dataclasses import asdict
from pathlib import Path

import numpy as np

from replay.stats import Estimate, bootstrap


def ips(rewards, target_prob, logging_prob, n_boot=1000, seed=0, level=0.95) -> Estimate:
    w = np.asarray(target_prob, float) / np.asarray(logging_prob, float)
    return bootstrap(lambda r, w: (w * r).mean(axis=1), [np.asarray(rewards, float), w],
                      n_boot, seed, level)


def snips(rewards, target_prob, logging_prob, n_boot=1000, seed=0, level=0.95) -> Estimate:
    w = np.asarray(target_prob, float) / np.asarray(logging_prob, float)
    return bootstrap(lambda r, w: (w * r).sum(axis=1) / np.maximum(w.sum(axis=1), 1e-300),
                      [np.asarray(rewards, float), w], n_boot, seed, level)


def dr(rewards, target_prob, logging_prob, q_logged, q_target, n_boot=1000, seed=0,
       level=0.95) -> Estimate:
    """``q_logged``: q̂ of the logged action per round; ``q_target``: Σ_a π(a) q̂(a) per round."""
    w = np.asarray(target_prob, float) / np.asarray(logging_prob, float)
    terms = np.asarray(q_target, float) + w * (np.asarray(rewards, float)
                                               - np.asarray(q_logged, float))
    return bootstrap(lambda t: t.mean(axis=1), [terms], n_boot, seed, level)


# --- Open Bandit Dataset ---------------------------------------------------------------------
def load_open_bandit(path: str | Path) -> dict[str, np.ndarray]:
    """item_id, position, click, propensity_score columns of an OBD csv."""
    cols: dict[str, list] = {"item_id": [], "position": [], "click": [], "propensity_score": []}
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            for name in cols:
                cols[name].append(row[name])
    return {"item_id": np.asarray(cols["item_id"], np.int64),
            "position": np.asarray(cols["position"], np.int64),
            "click": np.asarray(cols["click"], np.float64),
            "propensity_score": np.asarray(cols["propensity_score"], np.float64)}


def action_distribution(log: dict[str, np.ndarray], n_items: int, n_positions: int
                        ) -> np.ndarray:
    """Empirical ``P(item | position)`` of a context-free policy from its own log."""
    counts = np.zeros((n_positions, n_items))
    np.add.at(counts, (log["position"] - 1, log["item_id"]), 1.0)
    return counts / np.maximum(counts.sum(axis=1, keepdims=True), 1.0)


def open_bandit_check(data_dir: str | Path, campaign: str = "all", n_boot: int = 1000,
                      seed: int = 0) -> dict:
    """Estimate the Bernoulli-TS policy's CTR from the uniform-random log (IPS, SNIPS, DR) and
    compare with the CTR observed in the TS log itself (the on-policy truth).

    The TS policy of this dataset is context-free, so its action distribution per position is
    its empirical one over the TS log. DR's reward model: per (position, item) CTR of the
    random log, shrunk to the position's mean (cross-fitted on two halves).
    """
    data_dir = Path(data_dir)
    random_log = load_open_bandit(data_dir / "random" / campaign / f"{campaign}.csv")
    bts_log = load_open_bandit(data_dir / "bts" / campaign / f"{campaign}.csv")
    n_items = int(max(random_log["item_id"].max(), bts_log["item_id"].max())) + 1
    n_positions = int(max(random_log["position"].max(), bts_log["position"].max()))
    target = action_distribution(bts_log, n_items, n_positions)
    pos, item = random_log["position"] - 1, random_log["item_id"]
    target_prob = target[pos, item]
    q = _cross_fitted_ctr(random_log, n_items, n_positions, seed)
    q_logged = q[np.arange(len(pos)), item]
    q_target = (q * target[pos]).sum(axis=1)
    args = (random_log["click"], target_prob, random_log["propensity_score"])
    truth = bootstrap(lambda r: r.mean(axis=1), [bts_log["click"]], n_boot, seed, 0.95)
    estimates = {"ips": ips(*args, n_boot=n_boot, seed=seed),
                 "snips": snips(*args, n_boot=n_boot, seed=seed),
                 "dr": dr(*args, q_logged, q_target, n_boot=n_boot, seed=seed)}
    return {"campaign": campaign, "rounds_random": len(pos), "rounds_bts": len(bts_log["click"]),
            "bts_observed_ctr": asdict(truth),
            "random_observed_ctr": float(random_log["click"].mean()),
            **{name: {**asdict(e), "relative_error": abs(e.value - truth.value) / truth.value,
                      "covers_observed": e.covers(truth.value)}
               for name, e in estimates.items()}}


def _cross_fitted_ctr(log, n_items: int, n_positions: int, seed: int,
                      prior_strength: float = 50.0) -> np.ndarray:
    """Per-round q̂(position, ·) over all items, each round's row fitted on the other half."""
    rng = np.random.default_rng(seed)
    fold = rng.integers(2, size=len(log["click"]))
    out = np.zeros((len(fold), n_items))
    for f in (0, 1):
        train = fold != f
        clicks = np.zeros((n_positions, n_items))
        shows = np.zeros((n_positions, n_items))
        np.add.at(clicks, (log["position"][train] - 1, log["item_id"][train]),
                  log["click"][train])
        np.add.at(shows, (log["position"][train] - 1, log["item_id"][train]), 1.0)
        prior = clicks.sum(axis=1, keepdims=True) / np.maximum(shows.sum(axis=1, keepdims=True), 1)
        ctr = (clicks + prior_strength * prior) / (shows + prior_strength)
        out[fold == f] = ctr[log["position"][fold == f] - 1]
    return out
