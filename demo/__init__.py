"""The CPU-only end-to-end demo (``make demo``).

``demo.data`` turns Debian's Fashion-MNIST package into an ImageNet-style ImageFolder and a
Pascal-VOC-style detection dataset; ``demo.run`` drives the project's real command-line entry
points (pretraining, kNN, linear evaluation, conversion, detection) with the small-scale configs
in ``configs/demo/``; ``demo.report`` writes ``results/demo/report.md``.
"""

from moco_d2.core.threads import apply_policy

apply_policy()  # before anything imports torch: OpenMP reads its settings when torch loads
