"""Shuffle-BN across processes == split BN in one process: two gloo ranks with B/2 each vs one with B."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.multiprocessing as mp
from pretrain_utils import free_port

from moco_d2.core.config import load_config, pretrain_defaults
from moco_d2.core.distributed import cleanup, init_distributed
from pretrain.train import build_model, build_optimizer, train_step, wrap_ddp

BATCH, STEPS, SIZE = 8, 3, 16  # K = 16: the queue pointer wraps around at step 2

CFG = [
    "MODEL.ARCH", "resnet18", "MODEL.DIM", "16", "MODEL.K", "16", "MODEL.M", "0.9", "MODEL.BN_SPLITS", "2",
    "SOLVER.BATCH_SIZE", str(BATCH), "SOLVER.BASE_LR", "0.3",  # lr 0.01: weights move visibly
]  # fmt: skip


def run_steps(rank: int, world: int) -> dict:
    """STEPS training steps on fixed global batches; rank r gets the r-th contiguous slice.

    In float64: the two setups compute the same function, and float32 rounding differences would be
    amplified by batch norm over 4-sample groups at 1x1 resolution (layer4) into ~1e-3 after 3 steps.
    """
    old_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        return _run_steps(rank, world)
    finally:
        torch.set_default_dtype(old_dtype)


def _run_steps(rank: int, world: int) -> dict:
    cfg = load_config(pretrain_defaults(), None, CFG)
    torch.manual_seed(0)
    moco = build_model(cfg, world)  # BN_SPLITS=2 split BN on one process, plain BN on each of two
    optimizer = build_optimizer(cfg, moco, torch.device("cpu"))
    model = wrap_ddp(moco, torch.device("cpu")) if world > 1 else moco
    local = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    stats, queues = [], []
    for step in range(STEPS):
        g = torch.Generator().manual_seed(1000 + step)
        im_q, im_k = torch.randn(2, BATCH, 3, SIZE, SIZE, generator=g)
        shuffle = torch.Generator().manual_seed(step)  # the same permutation in both setups
        stats.append(train_step(model, optimizer, im_q[local], im_k[local], shuffle))
        queues.append(moco.queue.clone())
    params = {n: p.detach().clone() for n, p in moco.named_parameters()}
    return {
        "stats": torch.stack(stats),
        "queues": torch.stack(queues),
        "params": params,
        "ptr": moco.queue_ptr,
    }


def _rank_main(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(world),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    init_distributed("cpu")
    try:
        torch.save(run_steps(rank, world), Path(out) / f"rank{rank}.pt")
    finally:
        cleanup()


def test_two_gloo_processes_match_one_process_with_split_bn(tmp_path):
    mp.spawn(_rank_main, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    single = run_steps(0, 1)
    # both ranks hold identical queues after every step, and the same averaged loss/accuracy
    assert torch.equal(ranks[0]["queues"], ranks[1]["queues"])
    assert torch.equal(ranks[0]["stats"], ranks[1]["stats"])
    # ... equal to one process with batch B and 2-way split BN
    torch.testing.assert_close(ranks[0]["stats"], single["stats"], rtol=0, atol=1e-9)
    torch.testing.assert_close(ranks[0]["queues"], single["queues"], rtol=0, atol=1e-9)
    assert ranks[0]["ptr"].item() == single["ptr"].item() == STEPS * BATCH % 16
    moved = 0.0
    torch.manual_seed(0)
    init = {
        k: v.double()
        for k, v in build_model(load_config(pretrain_defaults(), None, CFG), 1).state_dict().items()
    }
    for name, p in single["params"].items():
        for r in range(2):
            torch.testing.assert_close(ranks[r]["params"][name], p, rtol=0, atol=1e-9, msg=name)
        moved = max(moved, (p - init[name]).abs().max().item())
    assert moved > 1e-3  # the comparison is not between untouched weights
