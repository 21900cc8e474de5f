"""Fisher-weighted averaging (Matena & Raffel, arXiv:2111.09832; reference code ``fisher_merging``).

    out = sum_i c_i (F_i + eps) M_i / sum_i c_i (F_i + eps)     element-wise, per parameter

F_i is the diagonal Fisher of model i (estimated by ``explorer.fisher``), c_i >= 0 its weight and eps
a floor that keeps parameters nobody is sure about at the weighted average. The executor passes the
Fisher of each model for this tensor as ``fisher`` (N, *S); the estimation settings are ``setup``
params the executor's setup (``explorer.fisher.fisher_extras``) reads, not arguments of the merge.
"""

from __future__ import annotations

from typing import Optional

import torch

from explorer.choices import FisherLabels, Space
from explorer.registry import MethodSpec, Param, register


def fisher_merge(
    x: torch.Tensor,
    *,
    base: Optional[torch.Tensor],
    generator: Optional[torch.Generator],
    weight: torch.Tensor,
    epsilon: float = 1e-6,
    normalize_fisher: bool = False,
    fisher: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Fisher-weighted average of model weights x (N, *S) -> (*S).

    weight: (N,) c_i >= 0. epsilon >= 0: the floor added to every Fisher entry. fisher: (N, *S) F_i >= 0
    (squared log-likelihood gradients per token), or None for a tensor without one (e.g. a buffer),
    which then gets the c-weighted average. normalize_fisher: divide each F_i by its L2 norm over this
    tensor first (a zero F_i stays zero), so every model has the same total say in this tensor.
    Raises ValueError on a Fisher of another shape, negative entries, or weights whose
    c_i (F_i + eps) sum to zero somewhere (all c_i = 0, or eps = 0 where every F_i is 0).
    """
    f = torch.ones_like(x) if fisher is None else fisher.to(x.device, x.dtype)  # estimated in RAM
    if f.shape != x.shape:
        raise ValueError(f"fisher_merge: Fisher shape {tuple(f.shape)} does not match the weights' {tuple(x.shape)}")
    if bool((f < 0).any()):
        raise ValueError("fisher_merge: a Fisher has negative entries; it must be a sum of squares")
    if normalize_fisher and fisher is not None:
        norms = f.reshape(f.shape[0], -1).norm(dim=1).clamp(min=1e-30)
        f = f / norms.reshape(-1, *([1] * (f.dim() - 1)))
    c = weight.to(x.device, x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
    importance = c * (f + epsilon)
    total = importance.sum(dim=0)
    if bool((total <= 0).any()):
        raise ValueError(
            f"fisher_merge: weights {weight.tolist()} times (Fisher + {epsilon}) sum to zero; raise a weight or epsilon"
        )
    return ((importance / total) * x).sum(dim=0)


register(
    MethodSpec(
        name="fisher",
        pretty_name="Fisher-weighted averaging",
        paper_url="https://arxiv.org/abs/2111.09832",
        space=Space.weight,
        fn=fisher_merge,
        needs_fisher=True,
        summary="sum_i c_i F_i M_i / sum_i c_i F_i per parameter, diagonal Fisher on local text",
        params=(
            Param("weight", 1.0, "Weight c_i of this model.", per_model=True, low=0.0, high=2.0, step=0.05),
            Param("epsilon", 1e-6, "Floor added to every Fisher entry.", low=0.0, high=1.0),
            Param("normalize_fisher", False, "Divide each model's Fisher by its norm (per tensor)."),
            Param(
                "fisher_examples", 64, "Text chunks the Fisher is estimated on.", low=1, high=4096, step=1, setup=True
            ),
            Param("fisher_batch_size", 4, "Chunks per backward pass.", low=1, high=256, step=1, setup=True),
            Param("fisher_max_length", 128, "Tokens per chunk.", low=2, high=4096, step=1, setup=True),
            Param(
                "fisher_labels",
                FisherLabels.sampled,
                "Labels: sampled from the model (true Fisher) or the text's tokens (empirical).",
                enum=FisherLabels,
                setup=True,
            ),
        ),
    )
)
