"""pretrain/data.py: bad-data errors, skipping corrupt files, seeded views, sampler, worker independence."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from pretrain_utils import TinyTwoViews, make_image_folder
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder

from moco_d2.core.errors import UserError
from moco_d2.core.images import BadDataError, SafeImageFolder, seeded_rng
from pretrain.data import BadImageTracker, EpochBatchSampler, PretrainDataset


def test_matches_torchvision_imagefolder(tmp_path):
    make_image_folder(tmp_path, classes=3, per_class=3)
    ours, ref = SafeImageFolder(tmp_path), ImageFolder(str(tmp_path))
    assert ours.classes == ref.classes and ours.class_to_idx == ref.class_to_idx
    assert ours.samples == ref.samples and ours.targets == ref.targets
    img, target = ours[4]
    assert img.mode == "RGB" and target == ref[4][1]
    assert ours[1][0].mode == "RGB"  # grayscale file replicated to RGB


def test_bad_data_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        SafeImageFolder(tmp_path / "missing")
    (tmp_path / "empty_root").mkdir()
    with pytest.raises(UserError, match="no class folders"):
        SafeImageFolder(tmp_path / "empty_root")
    make_image_folder(tmp_path / "data", classes=2, per_class=2)
    (tmp_path / "data" / "class_9").mkdir()
    (tmp_path / "data" / "class_9" / "notes.txt").write_text("not an image")
    with pytest.raises(UserError, match=r"class folder .*class_9.* has no images"):
        SafeImageFolder(tmp_path / "data")


def test_corrupt_files_skipped_counted_and_limited(tmp_path, caplog):
    make_image_folder(tmp_path, classes=2, per_class=5)
    bad1 = tmp_path / "class_0" / "img_2.png"
    bad1.write_bytes(bad1.read_bytes()[:60])  # truncated
    (tmp_path / "class_1" / "img_0.png").write_bytes(b"garbage, not a png")
    ds = SafeImageFolder(tmp_path, max_bad_fraction=0.25, report_bad=True)
    img, target, skipped = ds[2]
    assert skipped == str(bad1)
    assert np.array_equal(np.asarray(img), np.asarray(ds[3][0]))  # the next valid index substitutes
    assert "skipping unreadable image" in caplog.text and "img_2.png" in caplog.text
    ds[5]  # second bad file: 2/10 <= 0.25
    strict = SafeImageFolder(tmp_path, max_bad_fraction=0.1)
    strict[2]
    with pytest.raises(BadDataError, match=r"2 of 10 images .* DATA.MAX_BAD_FRACTION=0.1"):
        strict[5]
    tracker = BadImageTracker(total=10, max_fraction=0.1, root=str(tmp_path))
    tracker.update(["", str(bad1)])
    tracker.update([str(bad1)])  # the same file again does not count twice
    with pytest.raises(BadDataError, match="3 of 10"):
        tracker.update(["", "a\nb"])


def test_bad_fraction_error_from_worker_is_one_line(tmp_path):
    make_image_folder(tmp_path, classes=1, per_class=4)
    for j in range(4):
        (tmp_path / "class_0" / f"img_{j}.png").write_bytes(b"xx")
    loader = DataLoader(SafeImageFolder(tmp_path, transform=np.asarray), num_workers=1, batch_size=1)
    with pytest.raises(BadDataError) as info:
        next(iter(loader))
    assert "\n" not in str(info.value) and "are unreadable" in str(info.value)


def test_seeded_rng_is_pure_and_restores_global_state():
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    before = (random.random(), np.random.rand(), torch.rand(()).item())
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    draws = []
    for _ in range(2):
        with seeded_rng(123):
            draws.append((random.random(), np.random.rand(), torch.rand(()).item()))
    assert draws[0] == draws[1]
    assert (random.random(), np.random.rand(), torch.rand(()).item()) == before


def test_seeded_rng_without_restore_draws_the_same():
    """The loader workers' form: the same draws, the seeded states left in place."""
    with seeded_rng(123):
        restored = (random.random(), np.random.rand(), torch.rand(()).item())
    with seeded_rng(123, restore=False):
        kept = (random.random(), np.random.rand(), torch.rand(()).item())
    after = (random.random(), np.random.rand(), torch.rand(()).item())
    with seeded_rng(123):
        expected_after = [(random.random(), np.random.rand(), torch.rand(()).item()) for _ in range(2)][1]
    assert kept == restored and after == expected_after


def test_views_depend_only_on_seed_epoch_index(tmp_path):
    make_image_folder(tmp_path, classes=2, per_class=4)
    ds = PretrainDataset(SafeImageFolder(tmp_path), TinyTwoViews(32), seed=3)
    a = ds[(0, 5)]
    torch.manual_seed(99)
    random.seed(99)
    b = ds[(0, 5)]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], a[1])  # two independent views
    assert not torch.equal(a[0], ds[(1, 5)][0])  # new epoch, new views
    assert not torch.equal(a[0], PretrainDataset(ds.images, ds.transform, seed=4)[(0, 5)][0])


def test_sampler_slices_global_batches_and_resumes_mid_epoch():
    full = EpochBatchSampler(num_samples=22, global_batch=4, rank=0, world_size=1, seed=1)
    assert len(full) == 5
    full.set_epoch(2)
    batches = list(full)
    flat = [i for b in batches for (_, i) in b]
    assert len(set(flat)) == 20 and all(e == 2 for b in batches for (e, _) in b)
    ranks = [EpochBatchSampler(22, 4, r, 2, seed=1) for r in range(2)]
    for s in ranks:
        s.set_epoch(2)
    for step, (b0, b1) in enumerate(zip(*ranks)):
        assert b0 + b1 == batches[step]  # the global batch is the same for any number of processes
    full.set_epoch(2, start_step=3)
    assert len(full) == 2 and list(full) == batches[3:]
    full.set_epoch(3)
    assert [i for b in full for (_, i) in b] != flat
    with pytest.raises(UserError, match="divisible"):
        EpochBatchSampler(22, 6, 0, 4, seed=1)
    with pytest.raises(UserError, match="fewer than one global batch"):
        EpochBatchSampler(3, 4, 0, 1, seed=1)


def test_worker_count_does_not_change_batches(tmp_path):
    make_image_folder(tmp_path, classes=2, per_class=6)
    ds = PretrainDataset(SafeImageFolder(tmp_path), TinyTwoViews(32), seed=0)
    firsts = []
    for workers in (0, 2):
        sampler = EpochBatchSampler(len(ds), 4, 0, 1, seed=0)
        sampler.set_epoch(1)
        loader = DataLoader(ds, batch_sampler=sampler, num_workers=workers)
        firsts.append(next(iter(loader)))
        batches = list(loader)
        firsts.append(batches[2])
    (a0, a2, b0, b2) = firsts
    for x, y in ((a0, b0), (a2, b2)):
        assert torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) and x[2] == y[2]
