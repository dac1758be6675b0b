#!/usr/bin/env bash
# Single-GPU check for a lent accelerator machine, <= 10 minutes in one call (PARTS=... for a subset).
#   bash bench/gpu_check.sh PYTHON=python3           (from the repository root; PYTHON=... picks the interpreter;
#                                                      or: make -o .venv/.installed PY=python3 bench-gpu)
#   bash bench/gpu_check.sh PARTS="entrypoints issue18"
#   DEVICE=cpu bash bench/gpu_check.sh PARTS=entrypoints   (the entry-point sequence on the CPU, toy scale:
#                                                        what tests/bench/test_gpu_check.py runs)
# Parts, in this order: issue18 (1 GPU global batch 256 with 8 BN splits, then batch 32/GPU eager + compile
# reduce-overhead with the CUDA-graph check, each vs the official step measured in the same run; the
# 200-epoch projection), entrypoints (make pretrain via the launcher + NCCL, kill + RESUME auto, lincls,
# knn, convert, detection/train_net.py on a toy VOC), end_to_end (loader + real step, batches 32 and 256),
# and the older step, compile, gpu_augment, end_to_end_b128. Default: issue18 entrypoints end_to_end.
# Writes each part's output to $OUT (or bench/results/) and prints it. Every part has its own timeout,
# capped by what is left of BUDGET seconds for the whole call (default 570: the lent machine runs one
# command for at most 600 s), so one failing or slow part cannot eat the others' time and the call always
# ends in time; a part with under 30 s left is skipped. Exit status: 1 if a part failed or was skipped.
set -u
cd "$(dirname "$0")/.."
for arg in "$@"; do  # KEY=VALUE arguments, as environment variables
    case $arg in
        PARTS=* | DEVICE=* | PYTHON=* | OUT=* | BUDGET=*) export "${arg?}" ;;
        *) echo "usage: bash bench/gpu_check.sh [PARTS=\"...\"] [DEVICE=cuda|cpu] [PYTHON=...] [OUT=dir] [BUDGET=s]" >&2; exit 2 ;;
    esac
done
DEVICE="${DEVICE:-cuda}"
BUDGET="${BUDGET:-570}"
FAILED=0
SUMMARY=()
OUT_DIR="${OUT:-bench/results}"
mkdir -p "$OUT_DIR"
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

part() {  # part NAME SECONDS CMD...: run with a timeout, tee to $OUT_DIR/NAME.txt, report the status
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET - SECONDS - 15))  # 15 s: timeout's kill grace (10 s) and the summary
    if ((left < 30)); then
        echo "=== $name: SKIPPED, ${left}s of the ${BUDGET}s budget left" | tee "$OUT_DIR/$name.txt"
        FAILED=1
        SUMMARY+=("$name: skipped (budget)")
        return
    fi
    ((limit > left)) && limit=$left
    echo "=== $name (timeout ${limit}s, at ${SECONDS}s of ${BUDGET}s): $*"
    local start=$SECONDS
    timeout -k 10 "$limit" "$@" 2>&1 | tee "$OUT_DIR/$name.txt"
    local rc=${PIPESTATUS[0]}
    [[ $rc == 0 ]] || FAILED=1
    echo "=== $name: exit $rc after $((SECONDS - start))s" | tee -a "$OUT_DIR/$name.txt"
    SUMMARY+=("$name: exit $rc$([[ $rc == 124 || $rc == 137 ]] && echo ' (timed out)') after $((SECONDS - start))s")
}
finish() {  # one line per part, then the exit status
    echo "=== summary after ${SECONDS}s (budget ${BUDGET}s):"
    printf '    %s\n' "${SUMMARY[@]}"
    echo "results in $OUT_DIR"
    exit $FAILED
}

if ! "$PY" -c 'import torch' 2>/dev/null; then
    echo "error: '$PY -c \"import torch\"' failed; set PYTHON to an interpreter with torch" | tee "$OUT_DIR/error.txt"
    exit 1
fi
part versions 60 "$PY" - <<'PYEOF'
import importlib, os, platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "cudnn", torch.backends.cudnn.version(), "cpus", os.cpu_count())
print("cuda available", torch.cuda.is_available(), "bf16", torch.cuda.is_available() and torch.cuda.is_bf16_supported())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, f"{p.total_memory / 2**30:.0f} GiB", "sm", f"{p.major}.{p.minor}")
for mod in ("torchvision", "PIL", "numpy", "cv2", "fvcore", "yacs", "detectron2"):
    try:
        print(mod, getattr(importlib.import_module(mod), "__version__", "present"))
    except Exception as exc:  # report, don't stop: later parts say what they need
        print(mod, "MISSING", exc)
PYEOF
PARTS="${PARTS:-issue18 entrypoints end_to_end}"  # a subset, e.g. PARTS=end_to_end, when device time is short
want() { [[ " $PARTS " == *" $1 "* ]]; }
SPEED=1  # the speed parts need CUDA; the entry points run on any DEVICE
if [[ $DEVICE != cuda ]]; then
    echo "DEVICE=$DEVICE: speed parts skipped (CUDA only)"
    SPEED=0
elif ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "error: no CUDA device visible to torch; nothing to benchmark" | tee "$OUT_DIR/error.txt"
    exit 1
fi
# Issue 18 rows, each next to the official step measured in the same run, whether the compiled row really
# ran CUDA graphs, and the 200-epoch projection computed from the rates. split8 first: it needs no compile.
((SPEED)) && want issue18 && part issue18 300 "$PY" -m bench.bench_issue18 --device cuda --arch resnet50 \
    --image-size 224 --K 65536 --rows split8 b32 --split-batch 256 --splits 8 --batch 32 \
    --compile-mode reduce-overhead --steps 10 --rounds 5 --warmup 5
# The real entry points, a few iterations each (bench/entrypoints.sh; on CUDA the launcher uses NCCL).
want entrypoints && part entrypoints 180 env DEVICE="$DEVICE" PYTHON="$PY" WORK="$OUT_DIR/entrypoints_work" \
    bash bench/entrypoints.sh
((SPEED)) || finish
want step && part step_resnet50 240 "$PY" -m bench.bench_step --device cuda --arch resnet50 \
    --batch-sizes 32 64 128 --steps 5 --rounds 3 --warmup 3
want compile && part step_compile 300 "$PY" -m bench.bench_step --device cuda --arch resnet50 \
    --batch-sizes 128 --steps 5 --rounds 3 --warmup 3 --compile
want gpu_augment && part gpu_augment 90 "$PY" -m bench.bench_augment --gpu-only --device cuda --gpu-batch 256 --gpu-repeats 20
# Loader-inclusive: all workers the machine has (minus the main process and one spare), and half of them.
WORKERS=$(( $(nproc) > 2 ? $(nproc) - 2 : 1 ))
# Batch 32 = the 8-GPU recipe's per-GPU work; 256 = one GPU with the whole global batch. 256 distinct JPEGs
# (the rest hard links: decoding costs the same) keep the set-up short.
for E2E_BATCH in 32 256; do
    want end_to_end && part "end_to_end_b$E2E_BATCH" $((E2E_BATCH == 32 ? 100 : 180)) "$PY" -m bench.bench_loader \
        --real-step resnet50 --device cuda --workers "$WORKERS" --batch "$E2E_BATCH" --steps 20 --prefetch 2 \
        --unique-images 256 --impls reference fast gpu
done
want end_to_end_b128 && part end_to_end 300 "$PY" -m bench.bench_loader --real-step resnet50 --device cuda \
    --workers "$WORKERS" "$(( WORKERS / 2 > 0 ? WORKERS / 2 : 1 ))" --batch 128 --steps 30 --prefetch 2 \
    --impls reference fast-hostnorm fast gpu
finish
