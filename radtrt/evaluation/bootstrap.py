"""Seeded percentile bootstrap for report-level metrics and paired differences.

Every number radtrt reports for a metric comes with a 95% interval from the same recipe (500 resamples of
the reports, a fixed seed) so that two runs on the same predictions give identical reports, and so that a
parity verdict is reproducible. The point value is the statistic on all reports; the released LLaVA-Rad
evaluator prints the bootstrap median for some metrics instead, which differs from it only by resampling
noise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np

from radtrt.errors import fail

# A statistic over resamples: takes an index array (n_resamples, n) and returns one value per resample.
BatchStatistic = Callable[[np.ndarray], np.ndarray]
# Indices drawn and scored at a time (32 MB of int64, a few times that in a statistic's temporaries): the whole
# (resamples x reports) matrix, 100 000 resamples of 20 000 reports, was a MemoryError traceback.
CHUNK_ELEMENTS = 1 << 22
# Fewest reports for an interval: every resample of one report draws that report, so its "95% CI" was the value
# itself ([85.7, 85.7]), a certainty one study cannot give. Below it an estimate has no interval (JSON null, "n/a").
MIN_INTERVAL_N = 2
NO_INTERVAL_REASON = (f"no interval from fewer than {MIN_INTERVAL_N} reports: every resample of one report is that "
                      f"report, so the interval would be the value itself")
# Fewest reports for an interval to be read without a caveat: the floor under which the CheXprompt parity verdict
# (parity.MIN_PAIRED_STUDIES) refuses to decide, for the same reason: a percentile bootstrap over fewer reports is
# too narrow, and has zero width whenever they all score alike. Summaries say so beside such intervals.
ROUGH_INTERVAL_N = 30


@dataclass(frozen=True)
class BootstrapConfig:
    """How intervals are drawn; the defaults follow the released evaluator (500 resamples, seed 3)."""

    n_resamples: int = 500
    seed: int = 3
    level: float = 0.95

    def __post_init__(self) -> None:
        if self.n_resamples < 1:
            fail("the bootstrap needs at least one resample")
        if self.seed < 0:
            fail(f"the bootstrap seed must be at least 0, got {self.seed}")
        if not 0.0 < self.level < 1.0:
            fail("the confidence level must lie strictly between 0 and 1")


@dataclass(frozen=True)
class Estimate:
    """A statistic on all reports with its bootstrap interval."""

    value: float
    ci_low: float
    ci_high: float
    n: int

    @property
    def has_interval(self) -> bool:
        """Whether the interval means anything (:data:`MIN_INTERVAL_N`); ``ci_low``/``ci_high`` hold the
        resampling's (the value itself) either way, so that callers comparing bounds keep working."""
        return self.n >= MIN_INTERVAL_N

    def to_json(self) -> dict[str, Any]:
        if not self.has_interval:
            return {"value": self.value, "ci_low": None, "ci_high": None, "ci_reason": NO_INTERVAL_REASON,
                    "n": self.n}
        return {"value": self.value, "ci_low": self.ci_low, "ci_high": self.ci_high, "n": self.n}


def resample_indices(n: int, cfg: BootstrapConfig) -> np.ndarray:
    """Index matrix (n_resamples, n); the same seed and n always give the same matrix."""
    return np.concatenate(list(resample_chunks(n, cfg)))


def resample_chunks(n: int, cfg: BootstrapConfig) -> Iterator[np.ndarray]:
    """The rows of ``resample_indices``, a block of at most ``CHUNK_ELEMENTS`` indices (at least one row) at a time.

    One generator draws the blocks in turn: numpy's bounded integers come off the bit stream in order, so the
    rows are those of the single (n_resamples, n) draw and intervals do not change with the block size."""
    rng = np.random.default_rng(cfg.seed)
    rows = max(1, CHUNK_ELEMENTS // n)
    for start in range(0, cfg.n_resamples, rows):
        yield rng.integers(0, n, size=(min(rows, cfg.n_resamples - start), n))


def resampled_sums(idx: np.ndarray, per_report: np.ndarray) -> np.ndarray:
    """Column sums of ``per_report`` (n, k) for every resample in ``idx`` (R, n), as an (R, k) array.

    Counting how often each report is drawn and multiplying keeps memory at R x n instead of R x n x k,
    which matters for corpus statistics (BLEU n-gram counts, per-finding confusion counts).
    """
    n_resamples, n = idx.shape
    offsets = (idx + np.arange(n_resamples)[:, None] * n).ravel()
    weights = np.bincount(offsets, minlength=n_resamples * n).reshape(n_resamples, n)
    return weights @ per_report


def bootstrap(point: float, n: int, statistic: BatchStatistic, cfg: BootstrapConfig) -> Estimate:
    """Percentile interval of ``statistic`` over resampled report indices."""
    if n < 1:
        fail("cannot compute a metric over zero reports")
    samples = np.concatenate([np.asarray(statistic(idx), dtype=np.float64) for idx in resample_chunks(n, cfg)])
    alpha = (1.0 - cfg.level) / 2.0
    low, high = np.quantile(samples, [alpha, 1.0 - alpha])
    return Estimate(value=float(point), ci_low=float(low), ci_high=float(high), n=n)


def bootstrap_mean(values: np.ndarray | list[float], cfg: BootstrapConfig) -> Estimate:
    """Mean of per-report values with its interval (ROUGE-L, judge error counts, paired differences)."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        fail("bootstrap_mean takes one value per report")
    return bootstrap(float(arr.mean()) if arr.size else 0.0, arr.size, lambda idx: arr[idx].mean(axis=1), cfg)


def wilson_interval(successes: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval of a proportion.

    Why not the bootstrap: resampling n identical outcomes (2 of 2 identical reports) gives a zero-width
    interval, as if two studies proved a 100% rate; Wilson's interval stays honest at 0/n and n/n."""
    from statistics import NormalDist

    if n < 1 or not 0 <= successes <= n:
        fail(f"a proportion needs 0 <= successes <= n and n >= 1, got {successes} of {n}")
    z = NormalDist().inv_cdf((1 + level) / 2)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)
