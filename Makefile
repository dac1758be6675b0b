# MoCo v2 -> Detectron2. Every target that needs Python depends on the venv stamp,
# so `make test` / `make demo` work on a fresh clone and never reinstall twice.
SHELL := /bin/bash
PYTHON_BIN ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Detectron2 to install. Default: the sal-detectron2 wheel (pure-Python use, no CUDA ops needed for C4).
# Point it at another build, e.g. D2_SPEC='git+file:///path/to/detectron2' or D2_SPEC=/path/to/detectron2
D2_SPEC ?= sal-detectron2==0.7.2

# Training targets share these variables.
NGPUS ?= 1
NNODES ?= 1
NODE_RANK ?= 0
MASTER_ADDR ?= 127.0.0.1
MASTER_PORT ?= 29500
DATA ?= datasets/imagenet
OPTS ?=
TORCHRUN = $(PY) -m moco_d2.core.launch --nproc_per_node=$(NGPUS) --nnodes=$(NNODES) \
	--node_rank=$(NODE_RANK) --master_addr=$(MASTER_ADDR) --master_port=$(MASTER_PORT)

.PHONY: install photos test test-matrix lint pretrain lincls knn convert voc demo demo-data plot bench bench-gpu clean-venv

install: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	@test -x $(PY) || $(PYTHON_BIN) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip<26" 2>&1 | grep -v '^WARNING: Location' || true
	$(PY) -m pip install -q -r requirements.txt 2>&1 | grep -v '^WARNING: Location' ; test $${PIPESTATUS[0]} -eq 0
	@if [ "$(D2_SPEC)" = "sal-detectron2==0.7.2" ]; then \
	  SP=$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'); \
	  $(PY) -m pip install -q --no-deps --only-binary=:all: --python-version 3.10 --implementation cp \
	    --upgrade --target "$$SP" "$(D2_SPEC)" 2>&1 | grep -v '^WARNING' ; test $${PIPESTATUS[0]} -eq 0; \
	else \
	  $(PY) -m pip install -q --no-build-isolation "$(D2_SPEC)"; \
	fi
	$(PY) -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | grep -v '^WARNING: Location' ; test $${PIPESTATUS[0]} -eq 0
	cd / && $(abspath $(PY)) -c "import torch, torchvision, detectron2, pkg_resources, moco_d2.core, pretrain.train; print('env ok: torch', torch.__version__, 'detectron2', detectron2.__version__)"
	@touch $(STAMP)

clean-venv:
	rm -rf $(VENV)

# Real photos for the augmentation tests and bench_augment (moco_d2/core/debian.py: PHOTO_PACKAGE in
# PHOTO_DIR): installed when missing and allowed (root with apt-get, as the demo installs its data);
# otherwise the photo cases are skipped, with the reason printed.
photos: $(STAMP)
	@$(PY) -m moco_d2.core.debian photos

test: $(STAMP) photos
	$(PY) -m pytest -q tests

test-matrix: $(STAMP) photos  # the suite under every x86-64 kernel set, 1/default threads, and on a busy machine
	PY=$(PY) bash tests/run_matrix.sh

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

CONFIG ?= configs/pretrain/moco_v2_200ep.yaml
OUTPUT ?= output/pretrain
pretrain: $(STAMP)
	$(TORCHRUN) -m pretrain.train --config-file $(CONFIG) DATA.ROOT $(DATA) OUTPUT_DIR $(OUTPUT) $(OPTS)

LINCLS_CONFIG ?= configs/lincls/lincls_in1k.yaml
LINCLS_OUTPUT ?= output/lincls
lincls: $(STAMP)
	@test -n "$(CKPT)" || { echo "usage: make lincls CKPT=path/to/checkpoint.pth DATA=/path/to/imagenet [NGPUS=8]"; exit 2; }
	$(TORCHRUN) -m moco_d2.evaluation.lincls --config-file $(LINCLS_CONFIG) MODEL.WEIGHTS $(CKPT) DATA.ROOT $(DATA) OUTPUT_DIR $(LINCLS_OUTPUT) $(OPTS)

KNN_CONFIG ?= configs/lincls/knn_in1k.yaml
knn: $(STAMP)
	@test -n "$(CKPT)" || { echo "usage: make knn CKPT=path/to/checkpoint.pth DATA=/path/to/imagenet [NGPUS=8]"; exit 2; }
	$(TORCHRUN) -m moco_d2.evaluation.knn --config-file $(KNN_CONFIG) MODEL.WEIGHTS $(CKPT) DATA.ROOT $(DATA) $(OPTS)

convert: $(STAMP)
	@test -n "$(CKPT)" || { echo "usage: make convert CKPT=path/to/checkpoint.pth [OUT=path.pkl]"; exit 2; }
	$(PY) -m convert $(CKPT) $(if $(OUT),$(OUT),$(basename $(CKPT)).pkl)

TRIALS ?= 5
VOC_OUTPUT ?= output/voc
voc: $(STAMP)
	@test -n "$(WEIGHTS)" || { echo "usage: make voc WEIGHTS=path.pkl [TRIALS=5] [NGPUS=8]"; exit 2; }
	$(PY) -m detection.trials --config-file configs/voc_c4.yaml --weights $(WEIGHTS) --trials $(TRIALS) \
	  --num-gpus $(NGPUS) --output $(VOC_OUTPUT) $(OPTS)

demo-data: $(STAMP)
	$(PY) -m demo.data $(if $(QUICK),--quick,)

demo: $(STAMP)
	$(PY) -m demo.run $(if $(QUICK),--quick,)

RUNS ?= $(OUTPUT)
plot: $(STAMP)  # curves of one or more runs: make plot RUNS="output/pretrain output/moco800"
	$(PY) -m moco_d2.core.plot $(RUNS)

bench: $(STAMP) photos  # the CPU benches (bench/README.md); ~30 min on a loaded 2-core machine
	$(PY) -m bench.bench_augment --images 64 --rounds 5
	$(PY) -m bench.bench_step --device cpu --arch resnet18 --image-size 32 --batch-sizes 256 --K 4096 \
		--bn-splits 1 8 --steps 2 --rounds 3 --warmup 1 --bf16
	$(PY) -m bench.bench_step --device cpu --arch resnet50 --image-size 224 --batch-sizes 8 --K 4096 \
		--bn-splits 1 8 --steps 1 --rounds 3 --warmup 1 --bf16
	$(PY) -m bench.bench_loader --workers 0 1 2 --batch 32 --steps 6 --step-ms 100 --rounds 3
	$(PY) -m bench.bench_threads --images 512 --reps 3

# One CUDA GPU, one call <= 10 min (BUDGET): issue-18 rows, entry points, end to end (bench/README.md).
# On a machine whose python3 already has the requirements: make -o .venv/.installed PY=python3 bench-gpu
bench-gpu: $(STAMP)
	PYTHON=$(PY) bash bench/gpu_check.sh
