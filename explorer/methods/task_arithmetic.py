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

from typing import Callable, Optional, Sequence, Union

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
from explorer.methods.kernels import Finished, finish, keep_all, keep_none, magnitude_cut, ties_merge
from explorer.methods.sparsify import magnitude_count, sparsify
from explorer.methods.stages import Stages
from explorer.methods.weighted_sum import weighted_sum


def generalized_task_arithmetic(
    x: Optional[torch.Tensor],
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
    stages: Optional[Stages] = None,
    with_base: bool = False,
) -> torch.Tensor | Finished:
    """Merge task vectors ``x`` (N, *S) float32 into one task vector (*S); ``x`` may be overwritten.

    The executor passes a fresh ``x`` per call (see ``explorer.registry``), so thinning happens in
    place: peak memory is about 1.5 tensors of size S beyond ``x``. An in-memory session passes
    ``stages`` instead (``x`` None): its cache of this tensor's task vectors, trims and election, so
    a slider move recomputes only the stages downstream of the parameter that moved, with the same
    operations (results equal bit for bit to a merge from scratch; ``explorer.stage_cache``).

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
    with_base: return ``kernels.Finished``, base + the merged task vector (the merged weights) and its
    peak, written by the merge's last pass (the executor asks for this: no pass of its own to add the
    base and check the range), instead of the task vector; ``base`` must then be given.
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
    stages = stages or Stages(x)
    n = stages.n
    density, gamma, epsilon = (per_model_floats(v, n) for v in (1.0 if density is None else density, gamma, epsilon))
    weights, divisor = weight.tolist(), divisor if normalize else None
    how, added = (consensus, election, divisor), base if with_base else None
    if consensus != Consensus.none and method == Sparsification.magnitude and rescale == Rescale.none and bands is None:
        # TIES: the trim is a threshold per task vector, applied inside the election pass
        cuts = tuple(
            stages.memo(f"cut{i}", density[i], lambda _, i=i: trim_cut(stages.task_vectors()[i], density[i]))
            for i in range(n)
        )
        key = (cuts, tuple(weights), *how)
        return _scaled_election(stages, key, stages.task_vectors, cuts, weights, how, lambda_, added)
    drawn = generator is not None and method in (Sparsification.random, Sparsification.della_magprune)
    seed = generator.initial_seed() if generator is not None else None
    row_params = [
        (method, rescale, seed, density[i], gamma[i], epsilon[i], None if bands is None else tuple(bands[i].tolist()))
        for i in range(n)
    ]
    # a random thinning continues the generator's stream where the previous task vector left it
    keys = [tuple(row_params[: i + 1]) if drawn else row_params[i] for i in range(n)]

    def thin(i: int, row: torch.Tensor) -> None:
        band = None if bands is None else (float(bands[i, 0]), float(bands[i, 1]))
        sparsify(row, density[i], method, rescale, generator, gamma[i], epsilon[i], band, inplace=True)

    thinning = method != Sparsification.none and min(density) < 1
    if consensus == Consensus.none:
        total = float(weight.sum())
        scale = lambda_ / (total if normalize and abs(total) >= 1e-8 else 1.0)
        summed = (
            weighted_sum(weight, stages.thinned(keys, thin, generator), scale)
            if thinning
            else stages.task_vector_sum(weight, scale)
        )
        return summed if added is None else finish(summed, 1.0, added, out=summed)
    deltas = stages.thinned(keys, thin, generator) if thinning else stages.task_vectors()
    key = (tuple(keys), tuple(weights), *how)
    return _scaled_election(stages, key, lambda: deltas, [keep_all()] * n, weights, how, lambda_, added)


def _scaled_election(
    stages: Stages,
    key: tuple,
    deltas: Callable[[], torch.Tensor],
    cuts: Sequence[tuple[float, int]],
    weights: list[float],
    how: tuple[Consensus, Election, Optional[Divisor]],
    lambda_: float,
    base: Optional[torch.Tensor],
) -> torch.Tensor | Finished:
    """lambda * the election (``elect_``, settings ``how``) of deltas() (N, *S) trimmed by ``cuts``.

    The election is kept as memo "elect" under ``key``. With ``base``: ``Finished`` base + lambda *
    election; a fresh election writes those weights in its own pass, a reused one (a lambda move)
    costs one ``finish``. Without: a new (*S) task vector.
    """
    if base is None:
        mixed = stages.memo("elect", key, lambda old: elect_(deltas(), cuts, weights, *how, old))
        return torch.mul(mixed, lambda_)
    fresh: list[Finished] = []  # the finished weights, when the election runs now

    def elect(old: Optional[torch.Tensor]) -> torch.Tensor:
        mixed, finished = elect_(deltas(), cuts, weights, *how, old, base=base, scale=lambda_)
        fresh.append(finished)
        return mixed

    mixed = stages.memo("elect", key, elect)
    return fresh[0] if fresh else finish(mixed, lambda_, base)


def trim_cut(delta: torch.Tensor, density: float) -> tuple[float, int]:
    """The TIES trim of one task vector (*S) as ``kernels.magnitude_cut``'s (v, cut).

    It keeps the top ``magnitude_count(density, numel)`` magnitudes: the set ``sparsify.magnitude_mask`` keeps.
    """
    k = magnitude_count(density, delta.numel())
    if k >= delta.numel():
        return keep_all()
    return magnitude_cut(delta, k) if k > 0 else keep_none()


def elect_(
    deltas: torch.Tensor,
    cuts: list[tuple[float, int]],
    weights: list[float],
    consensus: Consensus | str,
    election: Election | str,
    divisor: Optional[Divisor | str],
    out: Optional[torch.Tensor] = None,
    base: Optional[torch.Tensor] = None,
    scale: float = 1.0,
) -> torch.Tensor | tuple[torch.Tensor, Finished]:
    """TIES sign election and disjoint sum of task vectors ``deltas`` (N, *S), trimmed by ``cuts``.

    cuts: per model, the (v, cut) of ``kernels.magnitude_cut`` (``keep_all()`` for a vector used as
    it is). The elected sign per entry is that of sum_i v_i ("sum") or of sum_i sign(v_i) ("count"),
    with v_i = w_i d_i ("weighted") or d_i ("unweighted"); zero votes elect +. Entry i agrees when v_i
    has the elected sign (zeros never agree). Returns sum_i [agree_i] w_i d_i, divided, when
    ``divisor`` is "weights" or "count", by sum_i [agree_i] w_i or sum_i [agree_i] (a zero divisor
    counts as 1): a new (*S) tensor, or ``out`` overwritten when it is a (*S) float32 buffer to reuse;
    ``deltas`` is only read (``kernels.ties_merge``, one pass). With ``base`` (*S) the same pass also
    writes base + scale * result: returns (result, ``kernels.Finished``).
    Raises ValueError on another consensus (including "none"), election or divisor.
    """
    consensus = parse_choice(Consensus, consensus, "consensus")
    if consensus == Consensus.none:
        raise ValueError("elect_ elects signs: consensus must be 'sum' or 'count'")
    election = parse_choice(Election, election, "election")
    divisor = None if divisor is None else parse_choice(Divisor, divisor, "divisor")
    counts = None if divisor is None else (weights if divisor == Divisor.weights else [1.0] * len(weights))
    weighted = election == Election.weighted
    return ties_merge(deltas, cuts, weights, weighted, consensus == Consensus.count, counts, out, base, scale)


def per_model_floats(value: Union[float, torch.Tensor], n: int) -> list[float]:
    """A per-model setting as n Python floats: a (N,) tensor element-wise, a scalar repeated.

    Per-model params arrive as float32; each becomes the shortest decimal that float32 value stands for
    (0.9, not 0.8999999762), so counts such as int(density * numel) agree with mergekit's float64 ones.
    """
    if isinstance(value, torch.Tensor):
        return [float(str(np.float32(v))) for v in value.tolist()]
    return [float(value)] * n
