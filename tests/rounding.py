"""Checks of numbers that a bench prints rounded: the tolerance is the rounding's, never the machine's speed.

A bench prints rates to 1 decimal and ratios to 2 or 3; a slow or loaded CPU gives small rates, where the
rounding of each rate moves their ratio by more than any fixed tolerance tuned on a fast machine."""

from __future__ import annotations


def ratio_within_rounding(
    printed: float, num: float, den: float, rate_decimals: int = 1, ratio_decimals: int = 2
) -> bool:
    """Whether ``printed`` (a ratio rounded to ``ratio_decimals``) can be the ratio of two rates that were
    printed as ``num`` and ``den`` (rounded to ``rate_decimals``)."""
    e, r = 0.5 * 10.0**-rate_decimals, 0.5 * 10.0**-ratio_decimals
    lo = (num - e) / (den + e) - r
    hi = (num + e) / (den - e) + r if den > e else float("inf")
    return lo - 1e-9 <= printed <= hi + 1e-9
