"""Generalized task arithmetic: task_arithmetic, ties and their DARE / breadcrumbs / DELLA variants.

Every variant is a setting of one function, ``generalized_task_arithmetic``:

    d_i  = sparsify(M_i - B, density_i)              thin each task vector (optional)
    e_i  = w_i * d_i                                  weight it
    mask = sign(e_i) == elected sign                  sign election (optional, "TIES")
    out  = lambda * sum_i mask_i e_i / divisor        disjoint sum, divided when normalize is on
    divisor = sum_i mask_i w_i (weights) or sum_i mask_i (count); sum_i w_i without election

Defaults reproduce mergekit 0.1.5 ``generalized_task_arithmetic.py``; the settings where the papers or
PEFT differ are parameters: ``election`` (elect on weighted deltas like mergekit, or unweighted like
PEFT ``merge_utils.ties``) and ``divisor`` (agreeing weights like mergekit, agreeing count like PEFT
``disjoint_merge``). References: Task Arithmetic arXiv:2212.04089; TIES arXiv:2306.01708.
"""

from __future__ import annotations

from functools import partial
from typing import Optional

import torch

from explorer.methods.sparsify import Rescale, Sparsification, sparsify
from explorer.registry import MethodSpec, Param, register


def generalized_task_arithmetic(
    x: torch.Tensor,
    *,
    base: Optional[torch.Tensor],
    generator: Optional[torch.Generator],
    weight: torch.Tensor,
    density: Optional[torch.Tensor] = None,
    lambda_: float = 1.0,
    normalize: bool = False,
    sparsification: str = "none",
    rescale: str = "none",
    consensus: str = "none",
    election: str = "weighted",
    divisor: str = "weights",
    gamma: float = 0.01,
    epsilon: float = 0.15,
) -> torch.Tensor:
    """Merge task vectors ``x`` (N, *S) float32 into one task vector (*S).

    weight, density: (N,) per-model; density in [0, 1] is the fraction of each task vector kept
    (None keeps everything).
    lambda_: global scale of the merged task vector. normalize: divide by the divisor above.
    consensus: "none" | "sum" (TIES sign election by total mass) | "count" (by majority of signs).
    election: "weighted" elects on w_i d_i (mergekit) | "unweighted" on d_i (PEFT).
    divisor: "weights" (mergekit) | "count" (PEFT disjoint mean); a zero divisor counts as 1.
    Never returns NaN for finite inputs: density 0 yields zeros; weights summing to zero divide by 1.
    """
    method = Sparsification(sparsification)
    if density is None:
        density = torch.ones(x.shape[0])
    deltas = torch.stack(
        [sparsify(d, float(p), method, Rescale(rescale), generator, gamma, epsilon) for d, p in zip(x, density)]
    )
    w = weight.to(deltas.dtype).reshape(-1, *([1] * (deltas.dim() - 1)))
    weighted = deltas * w
    if consensus == "none":
        mixed = weighted.sum(dim=0)
        total = w.sum(dim=0).expand_as(mixed).clone()
        total[total.abs() < 1e-8] = 1
    else:
        mask = _agreement_mask(weighted if election == "weighted" else deltas, consensus)
        mixed = (weighted * mask).sum(dim=0)
        total = ((w if divisor == "weights" else torch.ones_like(w)) * mask).sum(dim=0)
        total[total == 0] = 1
    if normalize:
        mixed = mixed / total
    return mixed * lambda_


def _agreement_mask(deltas: torch.Tensor, consensus: str) -> torch.Tensor:
    """(N, *S) 1.0 where an entry's sign equals the elected sign (ties elect +), else 0.0."""
    signs = deltas.sign()
    votes = deltas.sum(dim=0) if consensus == "sum" else signs.sum(dim=0)
    elected = torch.where(votes >= 0, 1.0, -1.0)
    return (signs == elected).to(deltas.dtype)


def _params(sparsification: str, consensus: str, normalize: bool, rescale: str) -> tuple[Param, ...]:
    """The params of one variant: the shared ones plus its defaults for the variant settings."""
    params = [
        Param("weight", 1.0, "Scale of this model's task vector.", per_model=True, low=-2.0, high=2.0, step=0.05),
        Param("lambda", 1.0, "Scale of the merged task vector.", low=0.0, high=3.0, step=0.05),
        Param("normalize", normalize, "Divide by the (agreeing) weights."),
    ]
    if sparsification != "none":
        params.append(Param("density", 1.0 if sparsification == "random" else 0.5, "Fraction of task-vector entries kept.", per_model=True, low=0.0, high=1.0, step=0.01))
        params.append(Param("rescale", rescale, "Rescale kept entries: l1 norm (mergekit) or 1/density (DARE paper).", choices=tuple(r.value for r in Rescale)))
    if sparsification == "magnitude_outliers":
        params.append(Param("gamma", 0.01, "Fraction of largest-magnitude entries dropped as outliers.", per_model=False, low=0.0, high=0.5, step=0.005))
    if sparsification == "della_magprune":
        params.append(Param("epsilon", 0.15, "Spread of keep probabilities around density.", low=0.0, high=0.5, step=0.01))
    if consensus != "none":
        params.append(Param("election", "weighted", "Elect signs on weighted deltas (mergekit) or unweighted ones (PEFT).", choices=("weighted", "unweighted")))
        params.append(Param("divisor", "weights", "Disjoint-mean divisor: agreeing weights (mergekit) or agreeing count (PEFT).", choices=("weights", "count")))
    return tuple(params)


def _variant(name: str, pretty: str, url: str, sparsification: str, consensus: str, normalize: bool, rescale: str, summary: str) -> None:
    """Register one variant: the generalized method with ``sparsification`` and ``consensus`` fixed."""
    register(
        MethodSpec(
            name=name,
            pretty_name=pretty,
            paper_url=url,
            space="delta",
            fn=partial(generalized_task_arithmetic, sparsification=sparsification, consensus=consensus),
            params=_params(sparsification, consensus, normalize, rescale),
            needs_base=True,
            random=sparsification in ("random", "della_magprune"),
            summary=summary,
        )
    )


_variant("task_arithmetic", "Task Arithmetic", "https://arxiv.org/abs/2212.04089", "none", "none", False, "none",
         "B + lambda * sum_i w_i (M_i - B)")
_variant("ties", "TIES", "https://arxiv.org/abs/2306.01708", "magnitude", "sum", True, "none",
         "Trim each task vector to its top-density magnitudes, elect signs, average the agreeing entries.")
