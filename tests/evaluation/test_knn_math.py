"""kNN math: hand-computed votes, chunked == dense reference, separable data -> 100 %, shuffled -> chance."""

import math

import pytest
import torch
import torch.nn.functional as F

from moco_d2.evaluation.features import topk_correct
from moco_d2.evaluation.knn import knn_class_scores

pytestmark = pytest.mark.usefixtures("one_thread")


def dense_reference(queries, bank, labels, num_classes, k, t):
    """Straightforward InstDisc-style kNN: full similarity matrix, one-hot votes weighted by exp(s/T)."""
    sim = queries @ bank.T
    top_sim, top_idx = sim.topk(k, dim=1)
    one_hot = F.one_hot(labels[top_idx], num_classes).float()  # M x k x C
    return (one_hot * (top_sim / t).exp().unsqueeze(-1)).sum(dim=1)


def test_hand_computed_votes():
    # Bank on the unit circle; the query is (1, 0).
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.6, 0.8]])
    labels = torch.tensor([0, 1, 1, 1])
    q = torch.tensor([[1.0, 0.0]])
    scores = knn_class_scores(q, bank, labels, num_classes=2, k=2, t=0.5)
    # Two nearest: sim 1.0 (class 0) and sim 0.6 (class 1).
    expected = torch.tensor([[math.exp(1.0 / 0.5), math.exp(0.6 / 0.5)]])
    torch.testing.assert_close(scores, expected)
    # k larger than the bank: all four vote; class 1 gets exp(0)+exp(-2)+exp(1.2).
    scores = knn_class_scores(q, bank, labels, num_classes=2, k=10, t=0.5)
    expected = torch.tensor([[math.exp(2.0), math.exp(0.0) + math.exp(-2.0) + math.exp(1.2)]])
    torch.testing.assert_close(scores, expected)


@pytest.mark.parametrize("query_chunk,bank_chunk,k", [(7, 13, 20), (1, 5, 5), (64, 1000, 200), (10, 3, 50)])
def test_chunked_equals_dense(query_chunk, bank_chunk, k):
    g = torch.Generator().manual_seed(0)
    bank = F.normalize(torch.randn(301, 16, generator=g), dim=1)
    labels = torch.randint(0, 7, (301,), generator=g)
    queries = F.normalize(torch.randn(45, 16, generator=g), dim=1)
    got = knn_class_scores(
        queries, bank, labels, 7, k=k, t=0.07, query_chunk=query_chunk, bank_chunk=bank_chunk
    )
    want = dense_reference(queries, bank, labels, 7, k=min(k, 301), t=0.07)
    # knn_class_scores works in float32: a 16-dim dot product of unit vectors is exact to D * 2^-24 ~ 1e-6
    # whatever the summation order, and exp(sim / t) turns that into a relative error of 1e-6 / t = 1.4e-5
    torch.testing.assert_close(got, want, rtol=2e-5, atol=0)


def _clustered(n_per_class, num_classes, dim, noise, g):
    centers = F.normalize(torch.randn(num_classes, dim, generator=g), dim=1)
    labels = torch.arange(num_classes).repeat_interleave(n_per_class)
    feats = centers[labels] + noise * torch.randn(len(labels), dim, generator=g)
    return F.normalize(feats, dim=1), labels


def test_separable_classes_give_100_percent_and_shuffled_labels_give_chance():
    g = torch.Generator().manual_seed(1)
    num_classes = 10
    train_x, train_y = _clustered(60, num_classes, 64, 0.05, g)
    val_x, val_y = _clustered(30, num_classes, 64, 0.05, g)
    # Same centers for train and val: re-draw val around the train centers.
    centers = F.normalize(torch.stack([train_x[train_y == c].mean(0) for c in range(num_classes)]), dim=1)
    val_x = F.normalize(centers[val_y] + 0.05 * torch.randn(len(val_y), 64, generator=g), dim=1)

    hits = topk_correct(knn_class_scores(val_x, train_x, train_y, num_classes, k=200, t=0.07), val_y)
    assert hits[:, 0].mean().item() == 1.0
    assert hits[:, 1].mean().item() == 1.0

    # Shuffle train and val labels independently: labels no longer depend on the features.
    train_s = train_y[torch.randperm(len(train_y), generator=g)]
    val_s = val_y[torch.randperm(len(val_y), generator=g)]
    hits = topk_correct(knn_class_scores(val_x, train_x, train_s, num_classes, k=200, t=0.07), val_s)
    # Chance is 1/10 (top-5: 1/2); 300 val samples -> std ~1.7 % (top-5 ~2.9 %).
    assert 0.02 < hits[:, 0].mean().item() < 0.2
    assert 0.35 < hits[:, 1].mean().item() < 0.65


def test_topk_correct():
    scores = torch.tensor([[0.1, 0.9, 0.0], [0.5, 0.2, 0.3], [0.2, 0.3, 0.5]])
    labels = torch.tensor([1, 2, 1])
    hits = topk_correct(scores, labels, ks=(1, 2, 5))
    torch.testing.assert_close(hits, torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 1.0], [0.0, 1.0, 1.0]]))


def test_fp16_storage_keeps_scores_within_one_percent():
    g = torch.Generator().manual_seed(3)
    bank = F.normalize(torch.randn(500, 128, generator=g), dim=1)
    labels = torch.randint(0, 5, (500,), generator=g)
    q = F.normalize(bank[:40] + 0.3 * torch.randn(40, 128, generator=g), dim=1)
    full = knn_class_scores(q, bank, labels, 5, k=50, t=0.07)
    half = knn_class_scores(q.half(), bank.half(), labels, 5, k=50, t=0.07)
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, full, rtol=1e-2, atol=1e-3 * full.max().item())
