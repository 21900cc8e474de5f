"""Passthrough: one model's tensor, unchanged (or scaled); with ``slices`` it stacks layers (frankenmerges).

Follows mergekit 0.1.5 ``merge_methods/passthrough.py``: exactly one input per tensor and an optional
per-model ``scale``. Which model and which of its layers feed each output layer is the recipe's
``slices`` (``explorer.recipe_layout``), not this function.
"""

from __future__ import annotations

from typing import Optional

import torch

from explorer.choices import Space
from explorer.registry import MethodSpec, Param, register


def passthrough(
    x: torch.Tensor, *, base: Optional[torch.Tensor], generator: Optional[torch.Generator], scale: torch.Tensor
) -> torch.Tensor:
    """The one model's tensor ``x[0]`` (*S), times ``scale[0]`` unless that is 1.

    x: (1, *S) weights; scale: (1,) float32, any finite number. Raises ValueError for more than one model.
    """
    if x.shape[0] != 1:
        raise ValueError(f"passthrough takes exactly one model per tensor; got {x.shape[0]}")
    return x[0] if float(scale[0]) == 1.0 else x[0] * scale[0]


register(
    MethodSpec(
        name="passthrough",
        pretty_name="Passthrough",
        paper_url="https://github.com/arcee-ai/mergekit#passthrough",
        space=Space.weight,
        fn=passthrough,
        params=(
            Param(
                "scale",
                1.0,
                "Factor applied to this model's tensors.",
                per_model=True,
                low=0.0,
                high=2.0,
                step=0.05,
                slider_only=True,
            ),
        ),
        max_models=1,
        summary="One model's tensors as they are; with slices, layers stacked from several models.",
    )
)
