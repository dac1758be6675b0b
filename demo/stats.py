"""Is the gap between two detection rows more than their fine-tuning seeds alone produce?

Each row is fine-tuned with a few seeds, so its mean AP is uncertain by about s / sqrt(n) (s the sample
standard deviation over its n seeds). Two means differ beyond that noise when their gap exceeds
``t * sqrt(s_a^2 / n_a + s_b^2 / n_b)``: Welch's t-test, t the two-sided 95 % quantile of Student's t
with the Welch-Satterthwaite degrees of freedom. Pure Python (the environment has no SciPy); the t
quantile comes from Simpson's rule on the density and bisection, checked against tabulated values.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

CONFIDENCE = 0.95  # two-sided


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def sample_sd(values: Sequence[float]) -> float:
    """Standard deviation with the n - 1 denominator (0 for a single value)."""
    if len(values) < 2:
        return 0.0
    m = mean(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def t_cdf(x: float, df: float, steps: int = 2000) -> float:
    """P(T <= x) for Student's t with ``df`` degrees of freedom (x >= 0): 1/2 plus Simpson's rule on
    the density over [0, x]."""
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def pdf(t: float) -> float:
        return math.exp(log_norm - (df + 1) / 2 * math.log1p(t * t / df))

    h = x / steps
    odd = sum(pdf((2 * k - 1) * h) for k in range(1, steps // 2 + 1))
    even = sum(pdf(2 * k * h) for k in range(1, steps // 2))
    return 0.5 + h / 3 * (pdf(0.0) + 4 * odd + 2 * even + pdf(x))


def t_quantile(p: float, df: float) -> float:
    """The x with P(T <= x) = p (p in (0.5, 1)), by bisection on ``t_cdf``."""
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
    return (lo + hi) / 2


def welch_margin(sd_a: float, n_a: int, sd_b: float, n_b: int) -> float:
    """The smallest gap between two means (of n_a and n_b seeds, sample SDs sd_a, sd_b) that Welch's
    t-test calls a difference at ``CONFIDENCE``; 0 when neither mean varies."""
    va, vb = sd_a**2 / n_a, sd_b**2 / n_b
    if va + vb == 0.0:
        return 0.0
    df = (va + vb) ** 2 / (va**2 / max(n_a - 1, 1) + vb**2 / max(n_b - 1, 1))
    return t_quantile(1 - (1 - CONFIDENCE) / 2, df) * math.sqrt(va + vb)
