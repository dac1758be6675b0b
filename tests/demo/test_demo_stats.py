"""demo.stats: Student's t quantiles against tabulated values, Welch's margin against hand computation."""

from __future__ import annotations

import math

import pytest

from demo.stats import sample_sd, t_quantile, welch_margin


@pytest.mark.parametrize(
    "df, t975", [(1, 12.7062), (2, 4.3027), (3, 3.1824), (6, 2.4469), (10, 2.2281), (30, 2.0423)]
)
def test_t_quantile_matches_the_tables(df, t975):
    assert t_quantile(0.975, df) == pytest.approx(t975, abs=1e-4)


def test_t_quantile_tends_to_the_normal_one():
    assert t_quantile(0.975, 1e6) == pytest.approx(1.95996, abs=1e-4)
    assert t_quantile(0.95, 5) == pytest.approx(2.0150, abs=1e-4)


def test_sample_sd_uses_n_minus_one():
    assert sample_sd([1.0, 2.0, 3.0, 4.0]) == pytest.approx(math.sqrt(5 / 3))
    assert sample_sd([7.0]) == 0.0


def test_welch_margin_by_hand():
    # equal sds and counts: df = 2 (n - 1) = 6, margin t(0.975, 6) * sd * sqrt(2 / n)
    assert welch_margin(1.0, 4, 1.0, 4) == pytest.approx(2.4469 * math.sqrt(0.5), abs=1e-4)
    # one side without noise: df = n - 1 of the other, margin t * sd / sqrt(n)
    assert welch_margin(2.0, 3, 0.0, 2) == pytest.approx(4.3027 * 2.0 / math.sqrt(3), abs=1e-4)
    assert welch_margin(0.0, 4, 0.0, 4) == 0.0
