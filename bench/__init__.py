"""Speed benchmarks (scripts, not tests): each prints a table and one JSON line with its baseline."""

from moco_d2.core.threads import apply_policy

apply_policy()  # before anything imports torch: OpenMP reads its settings when torch loads
