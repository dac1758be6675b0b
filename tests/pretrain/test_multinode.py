"""Two "nodes" on localhost through the launcher ``make pretrain`` runs == one process, same global batch."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pretrain_utils import free_port, make_image_folder
from test_pretrain import TINY

from moco_d2.core.config import load_config, pretrain_defaults
from moco_d2.core.distributed import init_distributed
from moco_d2.core.io import load_checkpoint
from moco_d2.core.metrics import read_metrics
from pretrain.train import train

ROOT = Path(__file__).resolve().parents[2]
CONFIG = "configs/pretrain/moco_v2_200ep.yaml"  # make pretrain's default
# AUG.IMPL reference: its views follow the default dtype (float64 here)
OPTS = [*TINY, "SOLVER.BATCH_SIZE", "8", "AUG.SIZE", "64", "TRAIN.DEVICE", "cpu", "SOLVER.EPOCHS", "1"]
OPTS += ["AUG.IMPL", "reference"]


def makefile_command(data: Path, out: Path, node_rank: int, port: int) -> list[str]:
    """The exact command ``make pretrain NNODES=2 NODE_RANK=<i> ...`` runs (read with ``make -n``)."""
    variables = {
        "NGPUS": "1", "NNODES": "2", "NODE_RANK": str(node_rank), "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port), "DATA": str(data), "OUTPUT": str(out), "PY": sys.executable,
        "CONFIG": CONFIG, "OPTS": shlex.join(OPTS),
    }  # fmt: skip
    dry = subprocess.run(
        ["make", "-s", "-n", "-o", ".venv/.installed", "pretrain", *(f"{k}={v}" for k, v in variables.items())],
        cwd=ROOT, capture_output=True, text=True, check=True,
    )  # fmt: skip
    argv = shlex.split(dry.stdout.strip().splitlines()[-1])
    at = argv.index("pretrain.train")  # run that module in float64: "-m pretrain.train" -> run_float64.py
    assert argv[at - 1] == "-m" and "moco_d2.core.launch" in argv and f"--node_rank={node_rank}" in argv
    return [*argv[: at - 1], str(ROOT / "tests" / "run_float64.py"), *argv[at:]]


def test_two_nodes_through_the_launcher_match_one_process(tmp_path):
    data = make_image_folder(tmp_path / "data" / "train", classes=2, per_class=8, size=72).parent
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    nodes = [
        subprocess.Popen(
            makefile_command(data, tmp_path / "two", rank, port),
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for rank in (0, 1)
    ]
    logs = [node.communicate(timeout=1800)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(log[-2000:] for log in logs)

    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        # one process, MODEL.BN_SPLITS 2: the same two BN groups
        opts = [*OPTS, "DATA.ROOT", str(data), "OUTPUT_DIR", str(tmp_path / "one")]
        train(load_config(pretrain_defaults(), str(ROOT / CONFIG), opts), init_distributed("cpu"))
    finally:
        torch.set_default_dtype(default_dtype)

    one = read_metrics(tmp_path / "one" / "metrics.jsonl")
    two = read_metrics(tmp_path / "two" / "metrics.jsonl")
    assert [r["step"] for r in two] == [r["step"] for r in one] == [1, 2]
    # logged through float32: equal float64 losses may round one float32 ulp apart
    assert [r["train/loss"] for r in two] == pytest.approx([r["train/loss"] for r in one], rel=2.5e-7)
    a = load_checkpoint(tmp_path / "one" / "model_final.pth")["state_dict"]
    b = load_checkpoint(tmp_path / "two" / "model_final.pth")["state_dict"]
    assert a.keys() == b.keys() and torch.equal(a["module.queue_ptr"], b["module.queue_ptr"])
    for k in a:
        if "running" not in k and "num_batches" not in k:  # BN running stats: rank 0's group vs the mean
            assert a[k].dtype in (torch.float64, torch.int64), k
            torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-9, msg=k)
