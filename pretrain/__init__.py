"""MoCo v2 pretraining: the algorithm (``moco``), data (``data``, ``augment``) and the loop (``train``)."""

from moco_d2.core.threads import apply_policy

apply_policy()  # before anything imports torch: OpenMP reads its settings when torch loads
