"""Linear merge: weighted average of model weights (model soups, arXiv:2203.05482).

    out = sum_i w_i M_i / sum_i w_i    (normalize on; a zero sum raises)
    out = sum_i w_i M_i                (normalize off)

Matches mergekit 0.1.5 ``linear_merge``. One model with weight 1 returns it exactly.
"""

from __future__ import annotations

from typing import Optional

import torch

from explorer.choices import Space
from explorer.methods.stages import Stages
from explorer.methods.weighted_sum import weighted_sum
from explorer.registry import MethodSpec, Param, register


def linear(
    x: Optional[torch.Tensor],
    *,
    base: Optional[torch.Tensor],
    generator: Optional[torch.Generator],
    weight: torch.Tensor,
    normalize: bool = True,
    stages: Optional[Stages] = None,
) -> torch.Tensor:
    """Weighted sum of model weights ``x`` (N, *S) float32 -> (*S).

    weight: (N,) per-model weights, any real numbers. Raises ValueError when normalize is on and the
    weights sum to zero (mergekit would divide by zero and return inf/NaN). An in-memory session
    passes ``stages`` instead of ``x``: the weights are then read where the session holds them (no
    stacked copy; ``Stages.weights``).
    """
    models = (stages or Stages(x)).weights()
    w = weight.to(torch.float32)
    total = float(w.sum())
    if normalize and abs(total) < 1e-8:
        raise ValueError(
            f"linear: weights {w.tolist()} sum to zero with normalize on; change a weight or turn normalize off"
        )
    return weighted_sum(w, models, 1.0 / total if normalize else 1.0)


register(
    MethodSpec(
        name="linear",
        pretty_name="Linear (weighted average / model soup)",
        paper_url="https://arxiv.org/abs/2203.05482",
        space=Space.weight,
        fn=linear,
        params=(
            Param(
                "weight",
                1.0,
                "Weight of this model in the average.",
                per_model=True,
                low=-2.0,
                high=2.0,
                step=0.05,
                slider_only=True,
            ),
            Param("normalize", True, "Divide by the sum of weights."),
        ),
        summary="sum_i w_i M_i / sum_i w_i",
    )
)
