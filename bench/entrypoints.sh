#!/usr/bin/env bash
# The real entry points, a few iterations each, at toy scale, on DEVICE (cuda: NCCL through the launcher;
# cpu: gloo) -- the "entrypoints" part of bench/gpu_check.sh, and what tests/bench/test_gpu_check.py runs
# on the CPU so the sequence cannot rot:
#   make pretrain (launcher) -> killed at MAX_ITERS with a checkpoint -> make pretrain RESUME auto (kNN
#   monitor) -> make lincls -> make knn -> make convert -> detection/train_net.py (train + VOC eval, toy VOC)
#   DEVICE=cpu WORK=/tmp/x PYTHON=python bash bench/entrypoints.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE="${DEVICE:-cuda}"
PY="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
WORK="${WORK:-bench/results/entrypoints}"
rm -rf "$WORK" && mkdir -p "$WORK"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# The Makefile's venv stamp is taken as up to date: this runs with the interpreter given, installs nothing.
MAKE=(make --no-print-directory -o "$VENV/.installed" PY="$PY" NGPUS=1 MASTER_PORT="${MASTER_PORT:-29531}")
step() { echo "--- entrypoints (${SECONDS}s): $*"; }

step "toy data in $WORK"
"$PY" - "$WORK" <<'PYEOF'
import sys
from pathlib import Path
sys.path.insert(0, "tests")
from pretrain_utils import make_image_folder
from toy_data import write_toy_voc
work = Path(sys.argv[1])
for split, seed in (("train", 0), ("val", 1)):
    make_image_folder(work / "imgs" / split, classes=2, per_class=8, size=40, seed=seed)
write_toy_voc(str(work / "voc"), {"trainval": 4, "test": 2}, seed=0)
PYEOF

IMGS="$WORK/imgs"
PRE=(MODEL.ARCH resnet18 MODEL.K 64 MODEL.BN_SPLITS 2 SOLVER.BATCH_SIZE 8 SOLVER.EPOCHS 1 AUG.SIZE 32
     DATA.NUM_WORKERS 1 DATA.PREFETCH_FACTOR 2 TRAIN.DEVICE "$DEVICE" LOG.PERIOD 1 LOG.TENSORBOARD False
     CHECKPOINT.PERIOD_ITERS 1 KNN.EVAL_PERIOD 1 KNN.TRAIN_ROOT "$IMGS/train" KNN.VAL_ROOT "$IMGS/val"
     KNN.K 5 KNN.RESIZE 32 KNN.CROP_SIZE 32 KNN.BATCH_SIZE 16 RESUME auto)
step "make pretrain, stopped after 1 iteration (a kill)"
"${MAKE[@]}" pretrain DATA="$IMGS" OUTPUT="$WORK/pretrain" OPTS="${PRE[*]} TRAIN.MAX_ITERS 1"
ls "$WORK/pretrain"/checkpoint_*.pth >/dev/null
step "make pretrain again: RESUME auto continues from that checkpoint to the end (kNN monitor each epoch)"
"${MAKE[@]}" pretrain DATA="$IMGS" OUTPUT="$WORK/pretrain" OPTS="${PRE[*]}" 2>&1 | tee "$WORK/resume.log"
grep -q "resumed from" "$WORK/resume.log" || { echo "entrypoints: the second run did not resume"; exit 1; }
CKPT="$WORK/pretrain/model_final.pth"
test -s "$CKPT"

step "make lincls (a few iterations)"
"${MAKE[@]}" lincls CKPT="$CKPT" DATA="$IMGS" LINCLS_OUTPUT="$WORK/lincls" OPTS="MODEL.ARCH resnet18 \
DATA.CROP_SIZE 32 DATA.RESIZE 32 DATA.NUM_WORKERS 1 SOLVER.EPOCHS 1 SOLVER.BATCH_SIZE 8 TRAIN.MAX_ITERS 2 \
TRAIN.DEVICE $DEVICE"
step "make knn"
"${MAKE[@]}" knn CKPT="$CKPT" DATA="$IMGS" OPTS="OUTPUT_DIR $WORK/knn DATA.CROP_SIZE 32 DATA.RESIZE 32 \
DATA.BATCH_SIZE 16 DATA.NUM_WORKERS 1 KNN.K 5"
step "make convert"
"${MAKE[@]}" convert CKPT="$CKPT" OUT="$WORK/moco.pkl"
test -s "$WORK/moco.pkl"

step "detection/train_net.py: fine-tune a few iterations on a toy VOC, then evaluate"
SPECS="[{'name': 'toy_trainval', 'root': '$WORK/voc', 'split': 'trainval', 'classes': ['red', 'green', 'blue']}, \
{'name': 'toy_test', 'root': '$WORK/voc', 'split': 'test', 'classes': ['red', 'green', 'blue']}]"
"$PY" detection/train_net.py --config-file configs/voc_c4.yaml \
    MODEL.DEVICE "$DEVICE" MODEL.WEIGHTS "$WORK/moco.pkl" OUTPUT_DIR "$WORK/voc_out" \
    MODEL.RESNETS.DEPTH 18 MODEL.RESNETS.RES2_OUT_CHANNELS 64 MODEL.ROI_HEADS.NUM_CLASSES 3 \
    DATASETS.VOC_CUSTOM "$SPECS" DATASETS.TRAIN "('toy_trainval',)" DATASETS.TEST "('toy_test',)" \
    INPUT.MIN_SIZE_TRAIN "(64, 96)" INPUT.MAX_SIZE_TRAIN 160 INPUT.MIN_SIZE_TEST 80 INPUT.MAX_SIZE_TEST 160 \
    SOLVER.IMS_PER_BATCH 2 SOLVER.MAX_ITER 2 SOLVER.STEPS "(1,)" SOLVER.WARMUP_ITERS 1 SOLVER.BASE_LR 0.01 \
    MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE 8 MODEL.RPN.BATCH_SIZE_PER_IMAGE 32 MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION 8 \
    MODEL.RPN.PRE_NMS_TOPK_TRAIN 200 MODEL.RPN.POST_NMS_TOPK_TRAIN 50 MODEL.RPN.PRE_NMS_TOPK_TEST 200 \
    MODEL.RPN.POST_NMS_TOPK_TEST 10 TEST.PRECISE_BN.NUM_ITER 1 TEST.VIS_NUM_IMAGES 2 DATALOADER.NUM_WORKERS 0
test -s "$WORK/voc_out/metrics.json"
step "all entry points ran on $DEVICE"
