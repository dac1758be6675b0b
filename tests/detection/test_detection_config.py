"""Detection configs, the res5 head, VOC AP maths, and one R50-C4 training step on the CPU."""

from __future__ import annotations

import importlib
import os

import numpy as np
import pytest
import torch
from detectron2.evaluation.pascal_voc_evaluation import voc_eval
from detectron2.modeling import build_model
from detectron2.modeling.backbone.resnet import BasicBlock, BottleneckBlock
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage
from toy_data import TOY_CLASSES, write_toy_voc

import detection  # noqa: F401  (registers Res5ROIHeadsExtraNorm)
from detection.config import load_detection_config
from detection.evaluation import class_ap, read_voc_ground_truth
from moco_d2.core.errors import UserError

VOC_TRAIN_SIZES = (480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800)


def cfg_of(name: str, *opts: str):
    return load_detection_config(os.path.join("configs", name), list(opts))


def test_voc_c4_holds_every_protocol_value():
    c = cfg_of("voc_c4.yaml")
    m = c.MODEL
    assert m.META_ARCHITECTURE == "GeneralizedRCNN" and not m.MASK_ON
    assert m.BACKBONE.NAME == "build_resnet_backbone" and m.BACKBONE.FREEZE_AT == 0
    assert m.RESNETS.DEPTH == 50 and m.RESNETS.NORM == "naiveSyncBN" and m.RESNETS.STRIDE_IN_1X1 is False
    assert list(m.RESNETS.OUT_FEATURES) == ["res4"] and list(m.ROI_HEADS.IN_FEATURES) == ["res4"]
    assert m.ROI_HEADS.NAME == "Res5ROIHeadsExtraNorm" and m.ROI_HEADS.NUM_CLASSES == 20
    assert list(m.PIXEL_MEAN) == [123.675, 116.280, 103.530] and list(m.PIXEL_STD) == [58.395, 57.120, 57.375]
    assert c.INPUT.FORMAT == "RGB"
    assert tuple(c.INPUT.MIN_SIZE_TRAIN) == VOC_TRAIN_SIZES == tuple(range(480, 801, 32))
    assert c.INPUT.MIN_SIZE_TRAIN_SAMPLING == "choice" and c.INPUT.MIN_SIZE_TEST == 800
    assert tuple(c.DATASETS.TRAIN) == ("voc_2007_trainval", "voc_2012_trainval")
    assert tuple(c.DATASETS.TEST) == ("voc_2007_test",)
    s = c.SOLVER
    assert (s.IMS_PER_BATCH, s.BASE_LR, s.MAX_ITER, tuple(s.STEPS), s.WARMUP_ITERS) == (
        16,
        0.02,
        24000,
        (18000, 22000),
        100,
    )
    assert (m.RPN.PRE_NMS_TOPK_TEST, m.RPN.POST_NMS_TOPK_TEST) == (6000, 1000)
    assert c.TEST.PRECISE_BN.ENABLED is True
    assert m.RANDOM_INIT is False and m.WEIGHTS == ""


def test_coco_and_baseline_configs():
    coco = cfg_of("coco_c4.yaml")
    assert coco.MODEL.MASK_ON and coco.MODEL.ROI_HEADS.NAME == "Res5ROIHeadsExtraNorm"
    assert (coco.SOLVER.MAX_ITER, tuple(coco.SOLVER.STEPS)) == (180000, (120000, 160000))
    assert tuple(coco.INPUT.MIN_SIZE_TRAIN) == tuple(range(640, 801, 32))
    voc = cfg_of("voc_c4.yaml")
    for key in ("PIXEL_MEAN", "PIXEL_STD"):
        assert list(coco.MODEL[key]) == list(voc.MODEL[key])
    assert coco.INPUT.FORMAT == "RGB" and coco.MODEL.RESNETS.STRIDE_IN_1X1 is False
    assert coco.MODEL.RESNETS.NORM == "naiveSyncBN" and coco.MODEL.BACKBONE.FREEZE_AT == 0
    # The baselines change only what they are about (weights, output), nothing of the protocol.
    for name, weights, random_init in [
        ("voc_c4_random_init.yaml", "", True),
        ("voc_c4_supervised.yaml", "output/resnet50_supervised.pkl", False),
    ]:
        b = cfg_of(name)
        assert (weights, random_init) == (b.MODEL.WEIGHTS, b.MODEL.RANDOM_INIT)
        b.defrost()
        b.MODEL.WEIGHTS, b.MODEL.RANDOM_INIT, b.OUTPUT_DIR = voc.MODEL.WEIGHTS, False, voc.OUTPUT_DIR
        assert b.dump() == voc.dump()


def test_config_errors_are_user_errors():
    with pytest.raises(UserError, match="does not exist"):
        cfg_of("no_such.yaml")
    with pytest.raises(UserError, match="unknown key"):
        cfg_of("voc_c4.yaml", "MODEL.NO_SUCH_KEY", "1")


@pytest.mark.parametrize(
    ("depth", "res2", "block", "n_blocks", "in_ch", "out_ch"),
    [(18, 64, BasicBlock, 2, 256, 512), (50, 256, BottleneckBlock, 3, 1024, 2048)],
)
def test_res5_head_matches_backbone_block(depth, res2, block, n_blocks, in_ch, out_ch):
    cfg = cfg_of("voc_c4.yaml", "MODEL.DEVICE", "cpu", "MODEL.RESNETS.DEPTH", str(depth))
    cfg.defrost()
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = res2
    model = build_model(cfg)
    res5 = model.roi_heads.res5
    blocks = [m for name, m in res5.named_children() if name != "norm"]
    assert len(blocks) == n_blocks and all(type(b) is block for b in blocks)
    assert (blocks[0].in_channels, blocks[-1].out_channels) == (in_ch, out_ch)
    assert model.backbone.output_shape()["res4"].channels == in_ch  # res5 continues where res4 ends
    assert list(res5.named_children())[-1][0] == "norm" and res5.norm.num_features == out_ch
    assert type(res5.norm).__name__ == "NaiveSyncBatchNorm"
    assert {"roi_heads.res5.norm.weight", "roi_heads.res5.norm.running_var"} <= set(model.state_dict())
    assert model.roi_heads.box_predictor.cls_score.in_features == out_ch
    if depth == 50:  # torchvision layout: stride in the 3x3 conv
        assert blocks[0].conv1.stride == (1, 1) and blocks[0].conv2.stride == (2, 2)


def test_r50_c4_trains_one_step_on_cpu_with_torchvision_ops(monkeypatch):
    """Faster R-CNN R50-C4 from configs/voc_c4.yaml: one SGD step, with RoIAlign and NMS from torchvision."""
    d2_nms = importlib.import_module("detectron2.layers.nms")
    d2_roi_align = importlib.import_module("detectron2.layers.roi_align")
    # Detectron2's C4 path calls these two names; both are torchvision's compiled ops, not detectron2._C.
    assert d2_roi_align.roi_align.__module__.startswith("torchvision")
    assert d2_nms.box_ops.batched_nms.__module__.startswith("torchvision")

    calls = {"roi_align": 0, "batched_nms": 0}

    def counting(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(d2_roi_align, "roi_align", counting("roi_align", d2_roi_align.roi_align))
    monkeypatch.setattr(d2_nms.box_ops, "batched_nms", counting("batched_nms", d2_nms.box_ops.batched_nms))
    torch.manual_seed(0)
    cfg = cfg_of(
        "voc_c4.yaml",
        "MODEL.DEVICE",
        "cpu",
        "MODEL.RPN.POST_NMS_TOPK_TRAIN",
        "64",
        "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE",
        "16",
    )
    model = build_model(cfg)
    model.train()
    image = torch.randint(0, 255, (3, 64, 80), dtype=torch.uint8).float()
    gt = Instances(
        (64, 80), gt_boxes=Boxes(torch.tensor([[8.0, 8.0, 40.0, 50.0]])), gt_classes=torch.tensor([3])
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    before = model.backbone.stem.conv1.weight.detach().clone()
    with EventStorage():
        losses = model([{"image": image, "instances": gt}])
        total = sum(losses.values())
        total.backward()
        optimizer.step()
    assert set(losses) == {"loss_cls", "loss_box_reg", "loss_rpn_cls", "loss_rpn_loc"}
    assert torch.isfinite(total)
    assert not torch.equal(before, model.backbone.stem.conv1.weight)  # FREEZE_AT 0: the stem trains
    assert model.roi_heads.res5.norm.weight.grad is not None
    assert calls["roi_align"] > 0 and calls["batched_nms"] > 0


def test_class_ap_hand_computed():
    # Image a: two boxes; image b: one box and one difficult box (ignored).
    gt = {
        "a": (np.array([[1, 1, 10, 10], [21, 21, 30, 30]], float), np.array([False, False])),
        "b": (np.array([[1, 1, 10, 10], [41, 41, 50, 50]], float), np.array([False, True])),
    }
    dets = [
        ("a", 0.9, np.array([1, 1, 10, 10.0])),  # TP
        ("b", 0.85, np.array([41, 41, 50, 50.0])),  # matches the difficult box: neither TP nor FP
        ("b", 0.8, np.array([60, 60, 70, 70.0])),  # FP
        ("a", 0.7, np.array([21, 21, 30, 30.0])),  # TP
        ("a", 0.6, np.array([1, 1, 10, 10.0])),  # duplicate: FP
    ]
    # precision 1, 1/2, 2/3, 1/2 at recall 1/3, 1/3, 2/3, 2/3 (3 non-difficult positives)
    assert class_ap(gt, dets, 0.5, use_07_metric=True) == pytest.approx((4 * 1.0 + 3 * 2 / 3) / 11)
    assert class_ap(gt, dets, 0.5, use_07_metric=False) == pytest.approx(1 / 3 + 1 / 3 * 2 / 3)
    assert class_ap({"a": (np.zeros((0, 4)), np.zeros(0, bool))}, dets[:1], 0.5, True) is None


def test_per_class_ap_equals_detectron2_voc_eval(tmp_path):
    """Our AP and Detectron2's reference voc_eval agree on every class, IoU and metric."""
    root = str(tmp_path / "voc")
    write_toy_voc(root, {"test": 6}, seed=3)
    gt = read_voc_ground_truth(root, "test", list(TOY_CLASSES))
    rng = np.random.default_rng(0)
    det_template = str(tmp_path / "{}.txt")
    for c, name in enumerate(TOY_CLASSES):
        dets = []
        for image_id, (boxes, _) in gt[c].items():
            for box in boxes:  # jittered true boxes plus a random false one per image
                dets.append((image_id, float(rng.random()), box + rng.normal(0, 2.5, 4)))
            x, y = rng.uniform(1, 60, 2)
            dets.append((image_id, float(rng.random()), np.array([x, y, x + 20, y + 15])))
        with open(det_template.format(name), "w") as f:
            f.write("\n".join(f"{i} {s!r} " + " ".join(repr(float(v)) for v in b) for i, s, b in dets))
        for thr in (0.5, 0.75):
            for use_07 in (True, False):
                _, _, ref = voc_eval(
                    det_template,
                    os.path.join(root, "Annotations", "{}.xml"),
                    os.path.join(root, "ImageSets", "Main", "test.txt"),
                    name,
                    ovthresh=thr,
                    use_07_metric=use_07,
                )
                assert class_ap(gt[c], dets, thr, use_07) == pytest.approx(ref, abs=1e-12)


def test_small_image_resnet_c4_trains_one_step_at_the_right_strides():
    """resnet18_small through the registered backbone: res4 at stride 8 feeds the RPN and a 1/8 ROI pooler,
    BasicBlock res5 (64 -> 128 channels) in the box head, one SGD step changes the 3x3 stem."""
    from detection.backbone import apply_arch

    torch.manual_seed(0)
    cfg = cfg_of("voc_c4.yaml", "MODEL.DEVICE", "cpu", "MODEL.RPN.POST_NMS_TOPK_TRAIN", "64")
    cfg.defrost()
    apply_arch(cfg, "resnet18_small")
    cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 16
    model = build_model(cfg)
    model.train()
    assert model.backbone.output_shape()["res4"].stride == 8
    assert model.backbone.output_shape()["res4"].channels == 64
    assert model.proposal_generator.anchor_generator.strides == [8]
    assert model.roi_heads.pooler.level_poolers[0].spatial_scale == 1 / 8
    blocks = [m for name, m in model.roi_heads.res5.named_children() if name != "norm"]
    assert [type(b) for b in blocks] == [BasicBlock, BasicBlock] and blocks[-1].out_channels == 128
    image = torch.randint(0, 255, (3, 64, 80), dtype=torch.uint8).float()
    feats = model.backbone(model.preprocess_image([{"image": image}]).tensor)
    assert feats["res4"].shape[-2:] == (8, 10)  # 64x80 input (no padding: divisibility 0) / 8
    gt = Instances(
        (64, 80), gt_boxes=Boxes(torch.tensor([[8.0, 8.0, 40.0, 50.0]])), gt_classes=torch.tensor([3])
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    before = model.backbone.stem.conv1.weight.detach().clone()
    assert before.shape == (16, 3, 3, 3)
    with EventStorage():
        losses = model([{"image": image, "instances": gt}])
        total = sum(losses.values())
        total.backward()
        optimizer.step()
    assert set(losses) == {"loss_cls", "loss_box_reg", "loss_rpn_cls", "loss_rpn_loc"}
    assert torch.isfinite(total)
    assert not torch.equal(before, model.backbone.stem.conv1.weight)
    assert model.roi_heads.res5.norm.weight.grad is not None


@pytest.mark.parametrize("preset", ["", "quick/", "smoke/"])
def test_demo_detection_configs_build_the_demo_arch(preset):
    """configs/demo/**/voc_c4*.yaml spell exactly the keys apply_arch derives from the pretraining arch."""
    from detection.backbone import arch_cfg_values
    from moco_d2.core.config import load_config, pretrain_defaults

    arch = load_config(pretrain_defaults(), f"configs/demo/{preset}moco_v2.yaml").MODEL.ARCH
    for name in ("voc_c4.yaml", "voc_c4_random_init.yaml"):
        cfg = cfg_of(f"demo/{preset}{name}")
        for key, value in arch_cfg_values(arch).items():
            node = cfg
            for part in key.split("."):
                node = node[part]
            assert node == value, (name, key)
