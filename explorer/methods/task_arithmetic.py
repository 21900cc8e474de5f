"""Generalized task arithmetic: task_arithmetic, ties and their DARE / breadcrumbs / DELLA variants.

Every variant is a setting of this one function (registered in ``task_vector_variants``):

    d_i  = sparsify(M_i - B, density_i)              thin each task vector (optional)
    e_i  = w_i * d_i                                  weight it
    mask = sign(e_i) == elected sign                  sign election (optional, "TIES")
    out  = lambda * sum_i mask_i e_i / divisor        disjoint sum, divided when normalize is on
    divisor = sum_i mask_i w_i (weights) or sum_i mask_i (count); sum_i w_i without election

Variants (mergekit 0.1.5 names and defaults): task_arithmetic, ties, dare_linear, dare_ties,
breadcrumbs, breadcrumbs_ties, della, della_linear. Where references disagree, mergekit's choice is the
default and the other a setting: ``election`` weighted (mergekit) / unweighted (PEFT ``merge_utils.ties``);
``divisor`` agreeing weights (mergekit) / agreeing count (PEFT ``disjoint_merge``); ``rescale`` l1
(mergekit) / inverse_density (DARE paper, PEFT); ``trim_scope`` tensor (mergekit) / model (TIES paper).
Papers: Task Arithmetic arXiv:2212.04089, TIES 2306.01708, DARE 2311.03099, Breadcrumbs 2312.06795,
DELLA 2406.11617.
"""

from __future__ import annotations

from typing import Optional, Union

import numpy as np
import torch

from explorer.choices import (
    Consensus,
    Divisor,
    Election,
    Rescale,
    Sparsification,
    TrimScope,
    parse_choice,
)
from explorer.methods.selection import MERGE_CHUNK, chunks
from explorer.methods.sparsify import sparsify
from explorer.methods.weighted_sum import weighted_sum


def generalized_task_arithmetic(
    x: torch.Tensor,
    *,
    base: Optional[torch.Tensor],
    generator: Optional[torch.Generator],
    weight: torch.Tensor,
    density: Optional[torch.Tensor] = None,
    lambda_: float = 1.0,
    normalize: bool = False,
    sparsification: Sparsification | str = Sparsification.none,
    rescale: Rescale | str = Rescale.none,
    consensus: Consensus | str = Consensus.none,
    election: Election | str = Election.weighted,
    divisor: Divisor | str = Divisor.weights,
    gamma: Union[float, torch.Tensor] = 0.01,
    epsilon: Union[float, torch.Tensor] = 0.15,
    trim_scope: TrimScope | str = TrimScope.tensor,
    bands: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Merge task vectors ``x`` (N, *S) float32 into one task vector (*S); ``x`` is overwritten.

    The executor passes a fresh ``x`` per call (see ``explorer.registry``), so thinning and weighting
    happen in place: peak memory is about N/4 + 1.5 tensors of size S beyond ``x`` (the trim's
    ``topk_mask`` needs only S/4 bytes at a time).

    weight, density: (N,) per-model; density in [0, 1] is the fraction of each task vector kept
    (None keeps everything). gamma, epsilon: (N,) per-model or one float (see ``sparsify``).
    lambda_: global scale of the merged task vector. normalize: divide by the divisor above.
    consensus: "none" | "sum" (TIES sign election by total mass) | "count" (by majority of signs).
    election: "weighted" elects on w_i d_i (mergekit) | "unweighted" on d_i (PEFT).
    divisor: "weights" (mergekit) | "count" (PEFT disjoint mean); a zero divisor counts as 1.
    trim_scope: "tensor" ranks magnitudes within this tensor (mergekit) | "model" over the whole task
    vector (TIES paper); "model" needs ``bands`` (N, 2), the (low, high) magnitude thresholds of each
    model from ``trim_scope.model_bands`` (the spec's ``prepare`` hook), else raises ValueError.
    The string settings are ``explorer.choices`` members or their values; any other value raises
    ValueError (suggesting the closest value).
    Never returns NaN for finite inputs: density 0 yields zeros; weights summing to zero divide by 1.
    """
    method = parse_choice(Sparsification, sparsification, "sparsification")
    rescale = parse_choice(Rescale, rescale, "rescale")
    consensus = parse_choice(Consensus, consensus, "consensus")
    election = parse_choice(Election, election, "election")
    divisor = parse_choice(Divisor, divisor, "divisor")
    if parse_choice(TrimScope, trim_scope, "trim_scope") == TrimScope.model and bands is None:
        raise ValueError(
            "trim_scope='model' needs the whole-model pre-pass: pass bands=spec.prepare(params, items)['bands']"
        )
    n = x.shape[0]
    density, gamma, epsilon = (per_model_floats(v, n) for v in (1.0 if density is None else density, gamma, epsilon))
    deltas = x
    if method != Sparsification.none and min(density) < 1:
        for i in range(n):
            band = None if bands is None else (float(bands[i, 0]), float(bands[i, 1]))
            sparsify(deltas[i], density[i], method, rescale, generator, gamma[i], epsilon[i], band, inplace=True)
    if consensus == Consensus.none:
        total = float(weight.sum())
        return weighted_sum(weight, deltas, lambda_ / (total if normalize and abs(total) >= 1e-8 else 1.0))
    mixed = disjoint_sum_(deltas, weight.tolist(), consensus, election, divisor if normalize else None)
    return mixed.mul_(lambda_)


def disjoint_sum_(
    deltas: torch.Tensor, weights: list[float], consensus: Consensus, election: Election, divisor: Optional[Divisor]
) -> torch.Tensor:
    """TIES sign election and disjoint sum of (thinned) task vectors ``deltas`` (N, *S), overwritten.

    The elected sign per entry is that of sum_i v_i ("sum") or of sum_i sign(v_i) ("count"), with
    v_i = w_i d_i ("weighted") or d_i ("unweighted"); zero votes elect +. Entry i agrees when v_i has
    the elected sign (zeros never agree). Returns sum_i [agree_i] w_i d_i, divided, when ``divisor``
    is "weights" or "count", by sum_i [agree_i] w_i or sum_i [agree_i] (a zero divisor counts as 1).
    Works model by model with boolean masks: about N/4 + 1.5 tensors of size S beyond ``deltas``.
    Raises ValueError on another consensus (including "none"), election or divisor.
    """
    consensus = parse_choice(Consensus, consensus, "consensus")
    if consensus == Consensus.none:
        raise ValueError("disjoint_sum_ elects signs: consensus must be 'sum' or 'count'")
    election = parse_choice(Election, election, "election")
    divisor = None if divisor is None else parse_choice(Divisor, divisor, "divisor")
    scale = torch.tensor(weights, dtype=deltas.dtype).reshape(-1, *([1] * (deltas.dim() - 1)))
    if election == Election.weighted:
        deltas.mul_(scale)
    votes = deltas.sum(dim=0) if consensus == Consensus.sum else sum(d.sign() for d in deltas)
    positive = votes >= 0
    del votes
    agree = torch.empty(deltas.shape, dtype=torch.bool)
    for d, a in zip(deltas, agree, strict=True):
        torch.where(positive, torch.gt(d, 0, out=a), d < 0, out=a)
    del positive
    if election == Election.unweighted:
        deltas.mul_(scale)
    mixed = torch.zeros_like(deltas[0])
    for d, a in zip(deltas, agree, strict=True):
        mixed.add_(d.masked_fill_(~a, 0))  # masked_fill_: multiplying by a bool tensor copies it to float
    if divisor is None:
        return mixed
    total = deltas[0].zero_()  # the task vectors are spent: reuse their memory for the divisor
    add_masks_(total, agree, weights if divisor == Divisor.weights else [1.0] * len(weights))
    return mixed.div_(total.masked_fill_(total == 0, 1))


def add_masks_(out: torch.Tensor, masks: torch.Tensor, weights: list[float]) -> torch.Tensor:
    """out (*S) += sum_i weights[i] * masks[i] for bool ``masks`` (N, *S), chunk by chunk.

    Adding a whole bool tensor to a float one would first copy it to float (S x 4 bytes).
    """
    flat, rows = out.view(-1), masks.view(len(weights), -1)
    for a, b in chunks(flat.numel(), MERGE_CHUNK):
        for w, row in zip(weights, rows, strict=True):
            flat[a:b].add_(row[a:b], alpha=w)
    return out


def per_model_floats(value: Union[float, torch.Tensor], n: int) -> list[float]:
    """A per-model setting as n Python floats: a (N,) tensor element-wise, a scalar repeated.

    Per-model params arrive as float32; each becomes the shortest decimal that float32 value stands for
    (0.9, not 0.8999999762), so counts such as int(density * numel) agree with mergekit's float64 ones.
    """
    if isinstance(value, torch.Tensor):
        return [float(str(np.float32(v))) for v in value.tolist()]
    return [float(value)] * n
