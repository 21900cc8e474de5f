"""Weighted averages with weights from data: FedAvg, metric-weighted averaging (MWA), WiSE-FT.

Each is the linear merge (``explorer.methods.linear``) with weights computed from its own inputs; the
weights functions are public so the UI can show them before merging.
"""

from __future__ import annotations

from typing import Optional

import torch

from explorer.choices import MetricKind, Space, parse_choice
from explorer.methods.linear import linear
from explorer.registry import MethodSpec, Param, register


def fedavg(
    x: torch.Tensor, *, base: Optional[torch.Tensor], generator: Optional[torch.Generator], examples: torch.Tensor
) -> torch.Tensor:
    """FedAvg (McMahan et al., arXiv:1602.05629): out = sum_i n_i M_i / sum_i n_i.

    x: (N, *S) model weights; examples: (N,) n_i >= 0, the number of training examples behind each
    model. Equal counts give the uniform average. Raises ValueError when the counts sum to zero.
    """
    return linear(x, base=base, generator=generator, weight=examples, normalize=True)


def mwa_weights(metric: torch.Tensor, p: float, kind: MetricKind | str = MetricKind.loss) -> torch.Tensor:
    """Metric-weighted averaging weights (MWA, arXiv:2504.18580), this project's parametrization.

        loss: w_i = m_i^(-p) / sum_j m_j^(-p)     (lower loss, more weight; needs m_i > 0)
        step: w_i = m_i^(+p) / sum_j m_j^(+p)     (later step, more weight; needs m_i >= 0)

    metric: (N,) values m_i; p >= 0 the penalty factor: p = 0 is the uniform average, p -> inf picks
    the best checkpoint. The weights do not change when all m_i are scaled by one factor. Computed as a
    softmax of +/- p log m_i (no overflow). Returns (N,) float32 summing to 1. Raises ValueError on a
    metric outside its domain or an unknown kind.
    """
    m = metric.to(torch.float32)
    loss = parse_choice(MetricKind, kind, "mwa: metric_kind") == MetricKind.loss
    if (loss and bool((m <= 0).any())) or bool((m < 0).any()) or not bool(m.isfinite().all()):
        raise ValueError(f"mwa: {kind} values {m.tolist()} must be finite and {'> 0' if loss else '>= 0'}")
    if p == 0:
        return torch.full_like(m, 1 / m.numel())
    if not loss and bool((m == 0).all()):
        raise ValueError("mwa: every step is 0, so every weight is 0; give the checkpoints' steps")
    return torch.softmax((-p if loss else p) * m.log(), dim=0)


def mwa(
    x: torch.Tensor,
    *,
    base: Optional[torch.Tensor],
    generator: Optional[torch.Generator],
    metric: torch.Tensor,
    p: float,
    metric_kind: MetricKind | str = MetricKind.loss,
) -> torch.Tensor:
    """Metric-weighted average of checkpoints x (N, *S): sum_i w_i M_i with w = ``mwa_weights``."""
    return linear(x, base=base, generator=generator, weight=mwa_weights(metric, p, metric_kind), normalize=False)


def wise_ft(
    x: torch.Tensor, *, base: Optional[torch.Tensor], generator: Optional[torch.Generator], alpha: float
) -> torch.Tensor:
    """WiSE-FT (Wortsman et al., arXiv:2109.01903): out = (1 - alpha) B + alpha M.

    x: (1, *S) the one fine-tuned model M; base (*S) the zero-shot/pre-trained model B. alpha in [0, 1]:
    0 returns B and 1 returns M, both exactly. Raises ValueError unless there is a base and N == 1.
    """
    if base is None or x.shape[0] != 1:
        raise ValueError(
            f"wise_ft interpolates a base with exactly one fine-tuned model; got base={base is not None}, {x.shape[0]} models"
        )
    return (1 - alpha) * base + alpha * x[0]


register(
    MethodSpec(
        name="fedavg",
        pretty_name="FedAvg (example-weighted average)",
        paper_url="https://arxiv.org/abs/1602.05629",
        space=Space.weight,
        fn=fedavg,
        summary="sum_i n_i M_i / sum_i n_i",
        params=(
            Param("examples", 1.0, "Training examples behind this model (n_i).", per_model=True, low=0.0, step=1.0),
        ),
    )
)
register(
    MethodSpec(
        name="mwa",
        pretty_name="Metric-weighted averaging (MWA)",
        paper_url="https://arxiv.org/abs/2504.18580",
        space=Space.weight,
        fn=mwa,
        summary="w_i ∝ loss_i^-p or step_i^p; p = 0 is uniform",
        params=(
            Param("metric", 1.0, "This checkpoint's loss (> 0) or step (>= 0).", per_model=True, low=0.0),
            Param(
                "p",
                1.0,
                "Penalty factor: 0 is uniform, larger favours the best checkpoint.",
                low=0.0,
                high=20.0,
                step=0.1,
            ),
            Param(
                "metric_kind",
                MetricKind.loss,
                "What metric holds: loss (lower is better) or step (later is better).",
                enum=MetricKind,
            ),
        ),
    )
)
register(
    MethodSpec(
        name="wise_ft",
        pretty_name="WiSE-FT (weight-space ensemble)",
        paper_url="https://arxiv.org/abs/2109.01903",
        space=Space.weight,
        fn=wise_ft,
        needs_base=True,
        max_models=1,
        summary="(1 - alpha) B + alpha M",
        params=(
            Param(
                "alpha", 0.5, "Mixing coefficient: 0 is the base, 1 the fine-tuned model.", low=0.0, high=1.0, step=0.01
            ),
        ),
    )
)
