"""The one list of detector tensors that a pretrained backbone cannot provide: they are trained from scratch.

Used by the converter's validation (``convert/validate.py``), the fine-tuning checkpointer's load report
(``detection/checkpoint.py``) and the demo's transfer check. Light on purpose: no Detectron2 import.
"""

from __future__ import annotations

# name -> parameter-name prefix in the C4 detectors (Faster R-CNN and Mask R-CNN).
FRESH_HEADS: dict[str, str] = {
    "RPN": "proposal_generator.",
    "box predictor": "roi_heads.box_predictor.",
    "mask head": "roi_heads.mask_head.",
    "res5 extra norm": "roi_heads.res5.norm.",
}
FRESH_PREFIXES = tuple(FRESH_HEADS.values())
BN_COUNTER = "BN step counters"  # ``*.num_batches_tracked``: never compared, never required


def fresh_category(model_key: str) -> str | None:
    """The fresh head (or BN counter) a detector tensor belongs to, None for a pretrainable tensor."""
    if model_key.endswith(".num_batches_tracked"):
        return BN_COUNTER
    return next((name for name, prefix in FRESH_HEADS.items() if model_key.startswith(prefix)), None)
