"""Averaging the checkpoints of one training run: last k, every k-th, exponential moving average.

The selection helpers are pure functions from the number of checkpoints n (ordered oldest first) to
n per-model weights summing to 1, ready for the ``linear`` merge (weight 0 leaves a checkpoint out).
``ema`` is also registered as a method over checkpoints given oldest first. ``explorer.run_average``
builds the recipes over a Trainer run (``python -m explorer average-run RUN --last-k K``). References: checkpoint
averaging in NMT (Vaswani et al. 2017, arXiv:1706.03762; Gao et al. 2022, arXiv:2210.11803); Polyak
averaging / EMA of weights (Polyak & Juditsky 1992).
"""

from __future__ import annotations

from typing import Optional

import torch

from explorer.choices import Space
from explorer.methods.linear import linear
from explorer.registry import MethodSpec, Param, register


def last_k_weights(n: int, k: int) -> list[float]:
    """Uniform weights 1/k on the last k of n checkpoints, 0 before. Raises ValueError unless 1 <= k <= n."""
    _check(n, k)
    return [0.0] * (n - k) + [1.0 / k] * k


def every_kth_weights(n: int, k: int) -> list[float]:
    """Uniform weights on every k-th checkpoint counted back from the last (n-1, n-1-k, ...), 0 elsewhere.

    Counting from the newest keeps the final checkpoint in. Raises ValueError unless 1 <= k <= n.
    """
    _check(n, k)
    chosen = set(range(n - 1, -1, -k))
    return [1.0 / len(chosen) if i in chosen else 0.0 for i in range(n)]


def ema_weights(n: int, decay: float) -> list[float]:
    """Weights of an exponential moving average over n checkpoints, oldest first.

    e_1 = M_1, e_j = decay * e_{j-1} + (1 - decay) * M_j, so e_n = sum_j w_j M_j with
        w_1 = decay^(n-1),  w_j = (1 - decay) * decay^(n-j) for j >= 2     (sum = 1).
    decay in [0, 1]: 0 returns the last checkpoint, 1 the first. Raises ValueError outside that range.
    """
    if n < 1 or not 0.0 <= decay <= 1.0:
        raise ValueError(f"ema needs n >= 1 checkpoints and decay in [0, 1]; got n={n}, decay={decay}")
    return [decay ** (n - 1)] + [(1.0 - decay) * decay ** (n - j) for j in range(2, n + 1)]


def ema(
    x: torch.Tensor, *, base: Optional[torch.Tensor], generator: Optional[torch.Generator], decay: float
) -> torch.Tensor:
    """EMA of checkpoints x (N, *S) given oldest first: sum_j w_j M_j with w = ``ema_weights(N, decay)``."""
    weight = torch.tensor(ema_weights(x.shape[0], decay), dtype=torch.float32)
    return linear(x, base=base, generator=generator, weight=weight, normalize=False)


def _check(n: int, k: int) -> None:
    if not 1 <= k <= n:
        raise ValueError(f"k={k} must be between 1 and the number of checkpoints, {n}")


register(
    MethodSpec(
        name="ema",
        pretty_name="EMA of checkpoints",
        paper_url="https://doi.org/10.1137/0330046",
        space=Space.weight,
        fn=ema,
        summary="e_j = decay e_(j-1) + (1 - decay) M_j over checkpoints, oldest first",
        params=(
            Param(
                "decay",
                0.9,
                "EMA decay: 0 keeps the last checkpoint, near 1 averages far back.",
                low=0.0,
                high=1.0,
                step=0.01,
            ),
        ),
    )
)
