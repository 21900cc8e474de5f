"""Magnitude pruning and mask statistics, for making and inspecting sparse variants of a model.

Pure functions over tensors. A "mask" is where a tensor is nonzero; the statistics feed the sparse
soup (``explorer.methods.sparse_soup``, Sparse Model Soups, arXiv:2306.16788), whose ingredients share
one pruning mask: agreement 1 means the soup stays exactly as sparse as its ingredients.
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch

from explorer.selection import topk_mask


def magnitude_prune(t: torch.Tensor, sparsity: float) -> torch.Tensor:
    """``t`` (*S) with its round(sparsity * numel) smallest-|t| entries set to 0 (a new tensor).

    sparsity: fraction of entries zeroed, in [0, 1]; raises ValueError outside. Magnitude pruning as
    in Han et al. 2015 (arXiv:1506.02626), one tensor at a time.
    """
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    keep = t.numel() - round(sparsity * t.numel())
    return t * topk_mask(t, keep)


def prune_state_dict(
    state: Mapping[str, torch.Tensor],
    sparsity: float,
    select: Callable[[str, torch.Tensor], bool] = lambda name, t: t.is_floating_point() and t.dim() >= 2,
) -> dict[str, torch.Tensor]:
    """Every selected tensor magnitude-pruned to ``sparsity`` per tensor; the others returned as they are.

    select(name, tensor): default prunes floating matrices (weights) and keeps vectors (biases, norms).
    """
    return {name: magnitude_prune(t, sparsity) if select(name, t) else t for name, t in state.items()}


def sparsity(t: torch.Tensor) -> float:
    """Fraction of exact zeros in ``t``, in [0, 1] (0.0 for an empty tensor)."""
    return float((t == 0).sum()) / t.numel() if t.numel() else 0.0


def mask_agreement(x: torch.Tensor) -> float:
    """Jaccard index of the N nonzero masks of x (N, *S): |intersection| / |union|, in [0, 1].

    1.0 when all masks are equal (also when every entry is zero: no disagreement).
    """
    nonzero = x.reshape(x.shape[0], -1) != 0
    union = int(nonzero.any(dim=0).sum())
    return int(nonzero.all(dim=0).sum()) / union if union else 1.0


def soup_report(x: torch.Tensor, merged: torch.Tensor) -> dict[str, object]:
    """Sparsity of each ingredient x (N, *S) and of the soup ``merged`` (*S), and the masks' agreement."""
    return {
        "sparsity_before": [sparsity(m) for m in x],
        "sparsity_after": sparsity(merged),
        "mask_jaccard": mask_agreement(x),
    }
