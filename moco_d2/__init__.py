"""moco-d2 shared code: ``core`` (errors, config, I/O, distributed, metrics, images, backbone) and
``evaluation`` (kNN and linear classification on frozen features)."""

from moco_d2.core.threads import apply_policy

apply_policy()  # before anything imports torch: OpenMP reads its settings when torch loads
