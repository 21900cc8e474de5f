"""Magnitude pruning, mask statistics and the sparsity-preserving soup."""

from __future__ import annotations

import pytest
import torch

from explorer import registry
from explorer.methods.sparse_soup import sparse_soup
from explorer.prune import (
    magnitude_prune,
    mask_agreement,
    prune_state_dict,
    soup_report,
    sparsity,
)
from tests.helpers import assert_expected


def _dense(n: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn((n, 10, 8), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("target", [0.0, 0.3, 0.9, 1.0])
def test_magnitude_prune_hits_the_sparsity_and_keeps_the_largest(target):
    t = _dense(1)[0]
    pruned = magnitude_prune(t, target)
    assert sparsity(pruned) == round(target * 80) / 80
    kept = pruned != 0
    if kept.any() and not kept.all():
        assert t[kept].abs().min() > t[~kept].abs().max()
    assert torch.equal(pruned[kept], t[kept])


def test_prune_state_dict_prunes_matrices_per_tensor_and_keeps_vectors():
    state = {"w": torch.randn(20, 5), "bias": torch.randn(5), "steps": torch.arange(4)}
    out = prune_state_dict(state, 0.5)
    assert sparsity(out["w"]) == 0.5
    assert out["bias"] is state["bias"] and out["steps"] is state["steps"]
    with pytest.raises(ValueError, match="sparsity"):
        magnitude_prune(state["w"], 1.5)


def test_shared_mask_soup_keeps_sparsity_and_averages():
    mask = magnitude_prune(_dense(1, seed=9)[0], 0.7) != 0
    x = _dense() * mask
    w = torch.tensor([1.0, 2.0, 1.0])
    for remask in ("intersection", "union"):
        out = sparse_soup(x, base=None, generator=None, weight=w, remask=remask)
        assert_expected(out, (x[0] + 2 * x[1] + x[2]) / 4)
        assert soup_report(x, out) == {"sparsity_before": [0.7] * 3, "sparsity_after": 0.7, "mask_jaccard": 1.0}


def test_different_masks_intersection_vs_union():
    x = torch.tensor([[1.0, 2.0, 0.0, 0.0], [3.0, 0.0, 4.0, 0.0]])
    ones = torch.ones(2)
    assert torch.equal(
        sparse_soup(x, base=None, generator=None, weight=ones, remask="intersection"),
        torch.tensor([2.0, 0.0, 0.0, 0.0]),
    )
    assert torch.equal(
        sparse_soup(x, base=None, generator=None, weight=ones, remask="union"), torch.tensor([2.0, 1.0, 2.0, 0.0])
    )
    assert mask_agreement(x) == pytest.approx(1 / 3)
    assert mask_agreement(torch.zeros(2, 3)) == 1.0
    assert sparsity(torch.empty(0)) == 0.0


def test_sparse_soup_identity_and_errors():
    x = _dense(1) * (torch.rand(10, 8, generator=torch.Generator().manual_seed(2)) > 0.5)
    assert torch.equal(sparse_soup(x, base=None, generator=None, weight=torch.ones(1)), x[0])
    with pytest.raises(ValueError, match="remask"):
        sparse_soup(x, base=None, generator=None, weight=torch.ones(1), remask="both")
    with pytest.raises(ValueError, match="sum to zero"):
        sparse_soup(_dense(2), base=None, generator=None, weight=torch.zeros(2))
    assert registry.get("sparse_soup").space == "weight"
