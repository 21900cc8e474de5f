"""Exact top-k masks (``explorer.methods.selection``) against torch.kthvalue and torch.topk.

With ties, tiny and half-precision tensors.
"""

from __future__ import annotations

import pytest
import torch

from explorer.methods.selection import topk_mask
from explorer.methods.sparsify import outlier_mask


@pytest.mark.parametrize("k", [0, 1, 7, 5_000, 29_999, 30_000])
def test_topk_mask_equals_torch_topk_on_distinct_values(k):
    t = torch.randn(100, 300, generator=torch.Generator().manual_seed(k))
    expected = torch.zeros(t.numel(), dtype=torch.bool)
    expected[torch.topk(t.abs().reshape(-1), k).indices] = True
    got = topk_mask(t, k)
    assert got.shape == t.shape and got.dtype == torch.bool
    assert torch.equal(got, expected.reshape(t.shape))


def test_topk_mask_breaks_ties_by_index():
    """Exactly k kept: every |t| above the k-th largest, then the earliest entries tied with it."""
    t = torch.tensor([0.5, -2.0, 1.0, -1.0, 3.0, 1.0, 0.0, -1.0, 0.0])
    assert topk_mask(t, 4).tolist() == [False, True, True, True, True, False, False, False, False]
    assert topk_mask(t, 8).tolist() == [True] * 7 + [True, False]
    zeros = torch.zeros(10_000)  # all tied (a frozen tensor's task vector)
    assert topk_mask(zeros, 2_500).nonzero().squeeze(1).tolist() == list(range(2_500))


def test_topk_mask_on_many_ties_from_half_precision():
    """Task vectors of float16 models hold many equal magnitudes: still exactly k kept.

    And a superset of every entry strictly above the k-th largest.
    """
    g = torch.Generator().manual_seed(3)
    a, b = (0.02 * torch.randn(200_000, generator=g)).half(), (0.02 * torch.randn(200_000, generator=g)).half()
    delta = a.float() - b.float()
    for t in (delta, delta.half()):
        k = 60_000
        mask = topk_mask(t, k)
        kth = torch.kthvalue(t.float().abs(), t.numel() - k + 1).values
        assert int(mask.sum()) == k
        assert bool(mask[t.float().abs() > kth].all()) and not bool(mask[t.float().abs() < kth].any())


def test_topk_mask_leaves_input_unchanged():
    t = torch.randn(5000)
    before = t.clone()
    topk_mask(t, 100)
    assert torch.equal(t, before)


@pytest.mark.parametrize("density, gamma", [(0.3, 0.01), (0.5, 0.1), (0.995, 0.01), (0.0001, 0.0)])
def test_outlier_mask_is_mergekits_sorted_slice(density, gamma):
    """Breadcrumbs keeps ascending-order positions [n - keep - top, n - keep), start clamped at 0."""
    t = torch.randn(40, 250, generator=torch.Generator().manual_seed(5))
    n = t.numel()
    keep, top = int(density * n), int(gamma * n)
    start = max(0, n - keep - top)
    expected = torch.zeros(n, dtype=torch.bool)
    expected[torch.argsort(t.abs().reshape(-1))[start : start + keep]] = True
    assert torch.equal(outlier_mask(t, density, None, gamma, 0.0).reshape(-1), expected)
