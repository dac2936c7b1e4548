"""Order statistics over repeated timings, and ratios between two backends measured in one run.

Percentiles use linear interpolation between order statistics (numpy's default), so a report can be
checked by hand against the raw samples stored in the JSON.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

from radtrt.errors import fail


# fewer samples than these, and p90 / p95 are only interpolations towards the maximum: n/a in the Markdown, null in
# the JSON (the raw samples are there for whoever wants to interpolate anyway)
MIN_SAMPLES_P90, MIN_SAMPLES_P95 = 10, 20


@dataclass(frozen=True)
class Summary:
    """min / median / p90 / p95 / max (and mean) of one quantity over the measured runs."""

    n: int
    min: float
    median: float
    p90: float
    p95: float
    max: float
    mean: float

    def to_json(self) -> dict[str, float | None]:
        out: dict[str, float | None] = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items()}
        if self.n < MIN_SAMPLES_P90:  # the Markdown's n/a: a JSON reader took a 3-sample value for a p90
            out["p90"] = None
        if self.n < MIN_SAMPLES_P95:
            out["p95"] = None
        return out


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) of already sorted values, interpolating linearly."""
    if not sorted_values:
        fail("no samples to summarize")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile {q} outside 0..100")
    return float(np.percentile(sorted_values, q))


def summarize(values: Sequence[float]) -> Summary:
    """Summary of the samples; the caller decides which runs count (warmup excluded)."""
    ordered = sorted(float(v) for v in values)
    if not ordered:
        fail("no samples to summarize")
    return Summary(n=len(ordered), min=ordered[0], median=percentile(ordered, 50), p90=percentile(ordered, 90),
                   p95=percentile(ordered, 95), max=ordered[-1], mean=sum(ordered) / len(ordered))


def rates(ms: Sequence[float]) -> Summary:
    """The same timings (ms each) as a rate per second: each statistic is 1e3 over the timings' matching one
    (median over median, p90 over the 10th percentile, mean over mean), so one measurement gives one speed-up.
    A median of per-run reciprocals is not the reciprocal of the median whenever the count is even: the
    tokens/s ratio then disagreed with the decode-ms ratio printed beside it."""
    ordered = sorted(float(v) for v in ms)
    if not ordered:
        fail("no samples to summarize")
    if ordered[0] <= 0:
        fail("a rate needs timings above zero")
    return Summary(n=len(ordered), min=1e3 / ordered[-1], median=1e3 / percentile(ordered, 50),
                   p90=1e3 / percentile(ordered, 10), p95=1e3 / percentile(ordered, 5), max=1e3 / ordered[0],
                   mean=1e3 / (sum(ordered) / len(ordered)))


def ratio(other: float | None, reference: float | None) -> float | None:
    """``other / reference``; None when either is missing or the reference is zero (nothing to compare)."""
    if other is None or reference is None or reference == 0:
        return None
    return other / reference
