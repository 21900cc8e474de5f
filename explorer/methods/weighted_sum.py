"""The one reduction most methods share: sum_i w_i x_i over stacked tensors, in one pass per input."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from explorer.methods import kernels


def weighted_sum(
    weights: torch.Tensor,
    x: torch.Tensor | Sequence[torch.Tensor],
    scale: float = 1.0,
    minus: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """scale * sum_i weights[i] * (x[i] - minus): weights (N,), x (N, *S) float32 (or N tensors (*S)) -> new (*S).

    minus: (*S) float32 subtracted from each x[i] first (task vectors formed on the fly from model
    weights and the base, equal bit for bit to summing stored task vectors), or None. The coefficients
    scale * w_i are rounded to float32 once; one pass over the inputs (``kernels.weighted_sum``).
    """
    coefficients = (weights.double() * scale).tolist()
    rows = list(x.unbind(0)) if isinstance(x, torch.Tensor) else list(x)
    return kernels.weighted_sum([r.contiguous() for r in rows], coefficients, minus)
