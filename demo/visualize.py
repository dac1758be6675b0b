"""Draw test scenes with a fine-tuned detector's boxes (predictions solid, ground truth dashed)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def scene_grid(
    config_file: str,
    opts: list[str],
    weights: str,
    voc_root: Path,
    out_png: Path,
    n: int = 8,
    thresh: float = 0.5,
) -> int:
    """Run the detector on the first ``n`` test scenes and save a grid; returns the boxes drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.data import MetadataCatalog
    from detectron2.modeling import build_model

    import detection  # noqa: F401  (registers the project's ROI heads)
    from detection.config import load_detection_config
    from detection.datasets import register_custom_datasets

    cfg = load_detection_config(config_file, [*opts, "MODEL.WEIGHTS", weights, "MODEL.DEVICE", "cpu"])
    register_custom_datasets(cfg)
    classes = MetadataCatalog.get(cfg.DATASETS.TEST[0]).thing_classes
    model = build_model(cfg).eval()
    DetectionCheckpointer(model).load(weights)
    ids = (voc_root / "ImageSets" / "Main" / "test.txt").read_text().split()[:n]
    cols = min(4, len(ids))
    rows = (len(ids) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.4 * rows), squeeze=False)
    drawn = 0
    for ax, image_id in zip(axes.flat, ids):
        rgb = np.asarray(Image.open(voc_root / "JPEGImages" / f"{image_id}.jpg").convert("RGB"))
        h, w = rgb.shape[:2]
        # The model was built for RGB input (INPUT.FORMAT); resizing happens inside like at test time.
        from detectron2.data import transforms as T

        aug = T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)
        img = aug.get_transform(rgb).apply_image(rgb)
        with torch.no_grad():
            inst = model(
                [{"image": torch.as_tensor(img.transpose(2, 0, 1).copy()), "height": h, "width": w}]
            )[0]["instances"]
        ax.imshow(rgb)
        for obj in ET.parse(voc_root / "Annotations" / f"{image_id}.xml").findall("object"):
            b = [float(obj.find("bndbox").findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")]
            ax.add_patch(
                plt.Rectangle(
                    (b[0] - 1, b[1] - 1),
                    b[2] - b[0] + 1,
                    b[3] - b[1] + 1,
                    fill=False,
                    ec="white",
                    ls="--",
                    lw=1,
                )
            )
        keep = inst.scores >= thresh
        for box, score, cls in zip(inst.pred_boxes.tensor[keep], inst.scores[keep], inst.pred_classes[keep]):
            x0, y0, x1, y1 = box.tolist()
            ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec="red", lw=1.5))
            ax.text(x0, y0, f"{classes[int(cls)]} {score:.2f}", color="yellow", fontsize=6, va="bottom",
                    bbox={"facecolor": "black", "alpha": 0.5, "pad": 0.5, "lw": 0})  # fmt: skip
            drawn += 1
        ax.set_title(image_id, fontsize=7)
        ax.axis("off")
    for ax in list(axes.flat)[len(ids) :]:
        ax.axis("off")
    fig.suptitle(f"predictions (red, score >= {thresh}) and ground truth (white, dashed)", fontsize=9)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return drawn
