"""knn_evaluate: feature extraction path, sharding without duplicates, and 2-process == 1-process."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.utils.data import TensorDataset

from moco_d2.evaluation.features import (
    ResNetTrunk,
    ShardSampler,
    make_eval_loader,
    split_features,
    topk_correct,
)
from moco_d2.evaluation.knn import knn_class_scores, knn_evaluate, knn_on_features

pytestmark = pytest.mark.usefixtures("one_thread")


def _data(seed: int = 0, n_train: int = 37, n_val: int = 11, dim: int = 6, classes: int = 4):
    g = torch.Generator().manual_seed(seed)
    train = TensorDataset(
        torch.randn(n_train, dim, generator=g), torch.randint(0, classes, (n_train,), generator=g)
    )
    val = TensorDataset(
        torch.randn(n_val, dim, generator=g), torch.randint(0, classes, (n_val,), generator=g)
    )
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(dim, 5), nn.BatchNorm1d(5))
    with torch.no_grad():  # non-trivial running stats, so train-mode BN would give other features
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    return train, val, model


def _expected(train, val, model, classes, k, t):
    model.eval()
    with torch.no_grad():
        bank = F.normalize(model(train.tensors[0]), dim=1)
        q = F.normalize(model(val.tensors[0]), dim=1)
    hits = topk_correct(knn_class_scores(q, bank, train.tensors[1], classes, k=k, t=t), val.tensors[1])
    return 100 * hits[:, 0].mean().item(), 100 * hits[:, 1].mean().item()


def test_knn_evaluate_matches_direct_computation_and_restores_mode():
    train, val, model = _data()
    model.train()
    res = knn_evaluate(model, make_eval_loader(train, 8, 0), make_eval_loader(val, 3, 0), 4, k=10, t=0.1)
    assert model.training  # mode restored
    top1, top5 = _expected(train, val, model, 4, 10, 0.1)
    assert res["top1"] == pytest.approx(top1)
    assert res["top5"] == pytest.approx(top5)
    assert (res["num_train"], res["num_val"], res["k"]) == (37, 11, 10)


def test_shard_sampler_covers_every_index_once():
    data = list(range(10))
    shards = [list(ShardSampler(data, r, 3)) for r in range(3)]
    assert sorted(i for s in shards for i in s) == data
    assert [len(ShardSampler(data, r, 3)) for r in range(3)] == [4, 3, 3]


def test_resnet_trunk_equals_resnet_without_fc():
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=3).eval()
    x = torch.randn(2, 3, 32, 32)
    trunk = ResNetTrunk(net)
    ref = nn.Sequential(*list(net.children())[:-1])
    torch.testing.assert_close(trunk(x), ref(x).flatten(1))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    os.environ["LOCAL_RANK"] = str(rank)
    torch.set_num_threads(1)
    from moco_d2.core.distributed import cleanup, init_distributed
    from moco_d2.evaluation.features import gather_uneven

    init_distributed("cpu")
    train, val, model = _data()
    res = knn_evaluate(model, make_eval_loader(train, 8, 0), make_eval_loader(val, 3, 0), 4, k=10, t=0.1)
    rows = gather_uneven(torch.arange(rank * 10, rank * 10 + rank + 1))  # rank r has r + 1 rows
    res["gathered"] = rows.tolist()
    # Extracted once over both ranks into a cache, then read from it: each rank scores its share of the queries.
    splits, cache = {"train": train, "val": val}, Path(out, "features.pt")
    for run in ("extracted", "cached"):
        feats = split_features(model.eval(), splits, 3, 0, False, torch.device("cpu"), cache=cache, key="k")
        res[run] = knn_on_features(feats, 4, k=10, t=0.1)
        res[run]["shapes"] = [list(feats["train"].shape), list(feats["val"].shape)]
    Path(out, f"rank{rank}.json").write_text(json.dumps(res))
    cleanup()


def test_two_processes_equal_one_process(tmp_path: Path):
    mp.start_processes(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    train, val, model = _data()
    top1, top5 = _expected(train, val, model, 4, 10, 0.1)
    for rank in range(2):
        res = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert res["top1"] == pytest.approx(top1)
        assert res["top5"] == pytest.approx(top5)
        assert (res["num_train"], res["num_val"]) == (37, 11)
        assert res["gathered"] == [0, 10, 11]
        for run in ("extracted", "cached"):
            assert res[run]["top1"] == pytest.approx(top1) and res[run]["top5"] == pytest.approx(top5)
            assert (res[run]["num_train"], res[run]["num_val"]) == (37, 11)
            assert res[run]["shapes"] == [[37, 5], [11, 5]]
