"""Speed benchmarks (scripts, not tests): each prints a table and one JSON line with its baseline."""
