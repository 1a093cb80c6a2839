"""Uncertainty of replay and off-policy figures: percentile bootstrap intervals, and a paired
bootstrap test of one model against another on the same queries (seeded, so a report is
reproducible). Resamples are drawn in chunks: memory stays bounded for long logs."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Index cells (resamples × rows) drawn at once: ~40 MB of int64.
MAX_CELLS = 5_000_000


@dataclass(frozen=True)
class Estimate:
    value: float
    ci_low: float
    ci_high: float

    def covers(self, value: float) -> bool:
        return self.ci_low <= value <= self.ci_high


def bootstrap_draws(statistic, columns: list[np.ndarray], n_boot: int, seed: int) -> np.ndarray:
    """``statistic`` (rows of resampled ``columns`` → one value per row) over ``n_boot``
    resamples of the rows, with replacement."""
    rng = np.random.default_rng(seed)
    n = len(columns[0])
    per_chunk = max(1, MAX_CELLS // max(n, 1))
    draws = []
    for start in range(0, n_boot, per_chunk):
        idx = rng.integers(n, size=(min(per_chunk, n_boot - start), n))
        draws.append(statistic(*(c[idx] for c in columns)))
    return np.concatenate(draws)


def bootstrap(statistic, columns: list[np.ndarray], n_boot: int = 1000, seed: int = 0,
              level: float = 0.95) -> Estimate:
    """The statistic on all rows, with its percentile interval at ``level``."""
    draws = bootstrap_draws(statistic, columns, n_boot, seed)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(draws, [tail, 100 - tail])
    return Estimate(float(statistic(*(c[None, :] for c in columns))[0]), float(low), float(high))


def _mean(values: np.ndarray) -> np.ndarray:
    return values.mean(axis=1)


def mean_ci(values, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> Estimate:
    """The mean with its bootstrap interval."""
    return bootstrap(_mean, [np.asarray(values, float)], n_boot, seed, level)


@dataclass(frozen=True)
class PairedDifference:
    """mean(a) − mean(b) over the same queries, its interval and a two-sided p-value (the
    share of resampled differences on the other side of zero, doubled)."""

    difference: float
    ci_low: float
    ci_high: float
    p_value: float


def paired_difference(a, b, n_boot: int = 1000, seed: int = 0,
                      level: float = 0.95) -> PairedDifference:
    diff = np.asarray(a, float) - np.asarray(b, float)
    draws = bootstrap_draws(_mean, [diff], n_boot, seed)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(draws, [tail, 100 - tail])
    other_side = min(np.mean(draws <= 0), np.mean(draws >= 0))
    p_value = min(1.0, max(2 * other_side, 1.0 / n_boot))
    return PairedDifference(float(diff.mean()), float(low), float(high), float(p_value))
