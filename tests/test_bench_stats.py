"""Order statistics and ratios of the latency bench, checked against numpy on fixed numbers."""

from __future__ import annotations

import numpy as np
import pytest

from radtrt.benchmarks.stats import percentile, rates, ratio, summarize
from radtrt.errors import RadtrtError


@pytest.mark.parametrize("values", [[5.0], [3.0, 1.0], [10, 20, 30, 40, 50, 60, 70, 80, 90, 100, 7.5],
                                    list(np.random.default_rng(0).exponential(3.0, size=37))])
def test_summary_matches_numpy_linear_percentiles(values: list[float]) -> None:
    s = summarize(values)
    arr = np.asarray(values, dtype=float)
    assert s.n == len(values)
    assert s.min == arr.min() and s.max == arr.max()
    for got, q in ((s.median, 50), (s.p90, 90), (s.p95, 95)):
        assert got == pytest.approx(np.percentile(arr, q))
    assert s.mean == pytest.approx(arr.mean())
    assert s.min <= s.median <= s.p90 <= s.p95 <= s.max


def test_percentile_interpolates_between_order_statistics() -> None:
    assert percentile([0.0, 10.0], 95) == pytest.approx(9.5)
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == pytest.approx(2.5)
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_empty_samples_are_a_user_error() -> None:
    with pytest.raises(RadtrtError):
        summarize([])


def test_ratio_is_other_over_reference_and_none_when_undefined() -> None:
    assert ratio(1.82, 1.93) == pytest.approx(0.943, abs=1e-3)
    assert ratio(None, 1.0) is None and ratio(1.0, None) is None and ratio(1.0, 0.0) is None


def test_summary_json_is_rounded_plain_numbers() -> None:
    data = summarize([1.23456789, 2.0]).to_json()
    assert data["min"] == 1.2346 and data["n"] == 2


def test_summary_json_withholds_percentiles_the_markdown_calls_n_a() -> None:
    """From 3 samples the JSON gave a p90 and p95 the Markdown beside it shows as n/a: two reports of one run."""
    assert (lambda d: (d["p90"], d["p95"]))(summarize([1.0, 2.0, 3.0]).to_json()) == (None, None)
    ten = [float(v) for v in range(10)]
    data = summarize(ten).to_json()
    assert data["p90"] == pytest.approx(np.percentile(ten, 90)) and data["p95"] is None
    assert summarize([float(v) for v in range(20)]).to_json()["p95"] == pytest.approx(np.percentile(range(20), 95))


def test_rates_are_the_reciprocals_of_the_timings_statistics() -> None:
    """Two runs at 20 and 30 ms per token: 40 tokens/s (1000 / the 25 ms median printed beside it), not the
    median of 50 and 33.3 tokens/s (41.7), which gave a second, different speed-up for one measurement."""
    ms = [20.0, 30.0, 25.0, 40.0]
    r, t = rates(ms), summarize(ms)
    assert r.n == 4 and r.median == pytest.approx(1e3 / t.median) and r.mean == pytest.approx(1e3 / t.mean)
    assert r.min == pytest.approx(1e3 / t.max) and r.max == pytest.approx(1e3 / t.min)
    assert r.p90 == pytest.approx(1e3 / np.percentile(ms, 10)) and r.p95 == pytest.approx(1e3 / np.percentile(ms, 5))
    assert r.min <= r.median <= r.p90 <= r.p95 <= r.max
    with pytest.raises(RadtrtError):
        rates([])
