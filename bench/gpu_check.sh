#!/usr/bin/env bash
# Single-GPU check for a lent accelerator machine, <= 10 minutes in one call (PARTS=... for a subset).
#   bash bench/gpu_check.sh                          (from the repository root; PYTHON=... picks the interpreter)
#   bash bench/gpu_check.sh PARTS="entrypoints issue18"
#   DEVICE=cpu bash bench/gpu_check.sh PARTS=entrypoints   (the entry-point sequence on the CPU, toy scale:
#                                                        what tests/bench/test_gpu_check.py runs)
# Parts: entrypoints (make pretrain via the launcher + NCCL, kill + RESUME auto, lincls, knn, convert,
# detection/train_net.py on a toy VOC), issue18 (batch 32/GPU eager + compile reduce-overhead, 1 GPU batch
# 256 with 8 BN splits, each vs its same-run baseline, 200-epoch projection), end_to_end (loader + real
# step, batches 32 and 256), and the older step, compile, gpu_augment. Default: entrypoints issue18 end_to_end.
# Writes each part's output to $OUT (or bench/results/) and prints it. Every part has its own timeout,
# so one failing or slow part cannot eat the others' time. Exit status: 1 if a part failed.
set -u
cd "$(dirname "$0")/.."
for arg in "$@"; do  # KEY=VALUE arguments, as environment variables
    case $arg in
        PARTS=* | DEVICE=* | PYTHON=* | OUT=*) export "${arg?}" ;;
        *) echo "usage: bash bench/gpu_check.sh [PARTS=\"...\"] [DEVICE=cuda|cpu] [PYTHON=...] [OUT=dir]" >&2; exit 2 ;;
    esac
done
DEVICE="${DEVICE:-cuda}"
FAILED=0
OUT_DIR="${OUT:-bench/results}"
mkdir -p "$OUT_DIR"
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

part() {  # part NAME SECONDS CMD...: run with a timeout, tee to $OUT_DIR/NAME.txt, report the status
    local name=$1 limit=$2
    shift 2
    echo "=== $name (timeout ${limit}s): $*"
    local start=$SECONDS
    timeout -k 10 "$limit" "$@" 2>&1 | tee "$OUT_DIR/$name.txt"
    local rc=${PIPESTATUS[0]}
    [[ $rc == 0 ]] || FAILED=1
    echo "=== $name: exit $rc after $((SECONDS - start))s" | tee -a "$OUT_DIR/$name.txt"
}

if ! "$PY" -c 'import torch' 2>/dev/null; then
    echo "error: '$PY -c \"import torch\"' failed; set PYTHON to an interpreter with torch" | tee "$OUT_DIR/error.txt"
    exit 1
fi
part versions 60 "$PY" - <<'PYEOF'
import importlib, platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
print("cuda available", torch.cuda.is_available(), "bf16", torch.cuda.is_available() and torch.cuda.is_bf16_supported())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, f"{p.total_memory / 2**30:.0f} GiB", "sm", f"{p.major}.{p.minor}")
for mod in ("torchvision", "PIL", "numpy", "cv2"):
    try:
        print(mod, importlib.import_module(mod).__version__)
    except Exception as exc:  # report, don't stop: later parts say what they need
        print(mod, "MISSING", exc)
PYEOF
PARTS="${PARTS:-entrypoints issue18 end_to_end}"  # a subset, e.g. PARTS=end_to_end, when device time is short
want() { [[ " $PARTS " == *" $1 "* ]]; }
# The real entry points, a few iterations each (bench/entrypoints.sh; on CUDA the launcher uses NCCL).
want entrypoints && part entrypoints 180 env DEVICE="$DEVICE" PYTHON="$PY" WORK="$OUT_DIR/entrypoints_work" \
    bash bench/entrypoints.sh
if [[ $DEVICE != cuda ]]; then
    echo "DEVICE=$DEVICE: speed parts skipped (CUDA only)"
    exit $FAILED
fi
if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "error: no CUDA device visible to torch; nothing to benchmark" | tee "$OUT_DIR/error.txt"
    exit 1
fi
# Issue 18 rows, each next to its same-run baseline, and the 200-epoch projection computed from them.
want issue18 && part issue18 240 "$PY" -m bench.bench_issue18 --device cuda --arch resnet50 \
    --rows b32 split8 --compile-mode reduce-overhead --steps 5 --rounds 3 --warmup 3
want step && part step_resnet50 240 "$PY" -m bench.bench_step --device cuda --arch resnet50 \
    --batch-sizes 32 64 128 --steps 5 --rounds 3 --warmup 3
want compile && part step_compile 300 "$PY" -m bench.bench_step --device cuda --arch resnet50 \
    --batch-sizes 128 --steps 5 --rounds 3 --warmup 3 --compile
want gpu_augment && part gpu_augment 90 "$PY" -m bench.bench_augment --gpu-only --device cuda --gpu-batch 256 --gpu-repeats 20
# Loader-inclusive: all workers the machine has (minus the main process and one spare), and half of them.
WORKERS=$(( $(nproc) > 2 ? $(nproc) - 2 : 1 ))
# Batch 32 = the 8-GPU recipe's per-GPU work; 256 = one GPU with the whole global batch.
for E2E_BATCH in 32 256; do
    want end_to_end && part "end_to_end_b$E2E_BATCH" 120 "$PY" -m bench.bench_loader --real-step resnet50 \
        --device cuda --workers "$WORKERS" --batch "$E2E_BATCH" --steps 20 --prefetch 2 --impls reference fast gpu
done
want end_to_end_b128 && part end_to_end 300 "$PY" -m bench.bench_loader --real-step resnet50 --device cuda \
    --workers "$WORKERS" "$(( WORKERS / 2 > 0 ? WORKERS / 2 : 1 ))" --batch 128 --steps 30 --prefetch 2 \
    --impls reference fast-hostnorm fast gpu
echo "results in $OUT_DIR"
exit $FAILED
