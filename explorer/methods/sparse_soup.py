"""Sparsity-preserving soup (Sparse Model Soups, Zimmer et al., arXiv:2306.16788).

Models pruned with one shared mask and then fine-tuned (or retrained) differently are averaged; the
average keeps their sparsity because every model is zero in the same places. When masks differ, the
soup is re-masked:

    out = (sum_i w_i M_i / sum_i w_i) * mask
    mask = AND_i (M_i != 0)   remask="intersection"  (the soup is at least as sparse as every model)
    mask = OR_i  (M_i != 0)   remask="union"         (the plain average; sparsity can drop)

``explorer.prune.soup_report`` gives the masks' agreement (Jaccard) and the sparsity before and after.
"""

from __future__ import annotations

from typing import Optional

import torch

from explorer.choices import Remask, Space, parse_choice
from explorer.methods.linear import linear
from explorer.registry import MethodSpec, Param, register


def sparse_soup(
    x: torch.Tensor,
    *,
    base: Optional[torch.Tensor],
    generator: Optional[torch.Generator],
    weight: torch.Tensor,
    remask: Remask | str = Remask.intersection,
) -> torch.Tensor:
    """Weighted average of sparse models x (N, *S) -> (*S), re-masked as above.

    weight: (N,) per-model weights (normalized; a zero sum raises ValueError, as in ``linear``).
    remask: "intersection" | "union" (``Remask``); any other value raises ValueError. With one shared
    mask both give the plain average.
    """
    remask = parse_choice(Remask, remask, "sparse_soup: remask")
    nonzero = x != 0
    mask = nonzero.all(dim=0) if remask == Remask.intersection else nonzero.any(dim=0)
    return linear(x, base=base, generator=generator, weight=weight, normalize=True) * mask


register(
    MethodSpec(
        name="sparse_soup",
        pretty_name="Sparse model soup",
        paper_url="https://arxiv.org/abs/2306.16788",
        space=Space.weight,
        fn=sparse_soup,
        summary="average of models sharing a pruning mask, re-masked",
        params=(
            Param("weight", 1.0, "Weight of this model in the average.", per_model=True, low=0.0, high=2.0, step=0.05),
            Param(
                "remask",
                Remask.intersection,
                "Keep entries nonzero in every model (intersection) or in any (union).",
                enum=Remask,
            ),
        ),
    )
)
