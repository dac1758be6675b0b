"""moco-d2 shared code: ``core`` (errors, config, I/O, distributed, metrics, images, backbone) and
``evaluation`` (kNN and linear classification on frozen features)."""
