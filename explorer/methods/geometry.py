"""Geometric merges in weight space: SLERP between the base and one model, and Model Stock.

Both follow mergekit 0.1.5 (``merge_methods/slerp.py``, ``merge_methods/model_stock.py``) and keep its
guards, so an expert equal to the base (zero task vector) returns a finite result, never NaN.
"""

from __future__ import annotations

import itertools
from typing import Optional

import torch

from explorer.choices import Space
from explorer.registry import MethodSpec, Param, register


def slerp(
    x: torch.Tensor, *, base: Optional[torch.Tensor], generator: Optional[torch.Generator], t: float
) -> torch.Tensor:
    """Spherical interpolation from ``base`` (*S) (t = 0) to the one model ``x[0]`` (t = 1).

    With a = base, b = x[0] flattened, dot = <a/|a|, b/|b|> clamped to [-1, 1] (a norm <= 1e-8 counts
    as 1) and theta = acos(dot):
        out = sin((1 - t) theta) / sin(theta) * a + sin(t theta) / sin(theta) * b
    and out = (1 - t) a + t b when |dot| > 0.9995 (nearly colinear or antipodal, mergekit's fallback).
    t in [0, 1]. Raises ValueError unless x holds exactly one model and base is given.
    Reference: Shoemake 1985; mergekit ``slerp``.
    """
    if base is None or x.shape[0] != 1:
        raise ValueError(
            f"slerp needs a base and exactly one other model; got base={base is not None}, {x.shape[0]} models"
        )
    a, b = base.reshape(-1), x[0].reshape(-1)
    if a.numel() == 0:
        return base.clone()
    # norms summed in float64, then float32: torch's float32 norm is off by 0.17% at 28 M entries
    norms = (torch.linalg.vector_norm(v, dtype=torch.float64).float() for v in (a, b))
    norm_a, norm_b = (torch.where(n > 1e-8, n, torch.ones_like(n)) for n in norms)
    dot = ((a / norm_a) * (b / norm_b)).sum().clamp(-1, 1)
    if dot.abs() > 0.9995:
        return ((1 - t) * a + t * b).reshape(base.shape)
    theta = torch.acos(dot)
    sin_theta = torch.sin(theta)
    out = torch.sin((1 - t) * theta) / sin_theta * a + torch.sin(t * theta) / sin_theta * b
    return out.reshape(base.shape)


def model_stock(
    x: torch.Tensor, *, base: Optional[torch.Tensor], generator: Optional[torch.Generator], filter_wise: bool = False
) -> torch.Tensor:
    """Model Stock (arXiv:2403.19522): move from the base toward the models' average by their angle.

    x: (N, *S) fine-tuned weights, N >= 2; base (*S) the pre-trained weights. With offsets d_i = x_i - base
    and cos = mean over pairs i < j of <d_i, d_j> / max(|d_i||d_j|, 1e-6) (clamped to [-1, 1]):
        t   = N cos / (1 + (N - 1) cos)         (t = 0, i.e. the base, where |1 + (N - 1) cos| < 1e-6)
        out = t * mean_i x_i + (1 - t) * base
    filter_wise: one cos per row of the last dimension (a 1-D tensor is one row) instead of one per
    tensor. Zero offsets give cos = 0, t = 0: the base. Raises ValueError for N < 2 or no base.
    Reference: mergekit ``model_stock_merge_method``.
    """
    if base is None or x.shape[0] < 2:
        raise ValueError(
            f"model_stock needs a base and at least 2 other models; got base={base is not None}, {x.shape[0]} models"
        )
    n = x.shape[0]
    if filter_wise:
        offsets = (x - base).reshape(n, 1, -1) if base.dim() <= 1 else x - base
    else:
        offsets = (x - base).reshape(n, -1)
    cosines = [
        ((offsets[i] * offsets[j]).sum(-1) / (offsets[i].norm(dim=-1) * offsets[j].norm(dim=-1)).clamp(min=1e-6)).clamp(
            -1, 1
        )
        for i, j in itertools.combinations(range(n), 2)
    ]
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < 1e-6
    t = torch.where(
        singular, torch.zeros_like(cos), n * cos / torch.where(singular, torch.ones_like(denominator), denominator)
    )
    flat_shape = offsets.shape[1:]
    average, anchor = x.mean(dim=0).reshape(flat_shape), base.reshape(flat_shape)
    return (t * average + (1 - t) * anchor).reshape(base.shape)


register(
    MethodSpec(
        name="slerp",
        pretty_name="SLERP",
        paper_url="https://en.wikipedia.org/wiki/Slerp",
        space=Space.weight,
        fn=slerp,
        params=(
            Param(
                "t",
                0.5,
                "Position on the arc from the base (0) to the model (1).",
                low=0.0,
                high=1.0,
                step=0.01,
                slider_only=True,
            ),
        ),
        needs_base=True,
        min_models=1,
        max_models=1,
        summary="Spherical interpolation between the base and one model.",
    )
)
register(
    MethodSpec(
        name="model_stock",
        pretty_name="Model Stock",
        paper_url="https://arxiv.org/abs/2403.19522",
        space=Space.weight,
        fn=model_stock,
        params=(Param("filter_wise", False, "One interpolation ratio per row instead of per tensor."),),
        needs_base=True,
        min_models=2,
        summary="t * average + (1 - t) * base, t from the mean angle between the task vectors.",
    )
)
