"""The merge kernels of ``kernels`` in torch operations, for tensors on any device (CUDA in practice).

The compiled kernels of ``kernels`` read CPU memory (numba, through ``.numpy()``), so a tensor on a GPU
cannot go through them; each of them hands such a tensor to its namesake here (``kernels.torch_path``).
These take the same arguments, raise the same errors and return the same types, on the input's device,
and compute the same float32 operations in the same order, so their results equal the compiled
kernels' bit for bit, signed zeros included (tested on CPU tensors, ``tests/test_torch_kernels.py``).
Each product is its own ``torch.mul`` before its ``torch.add``: a fused multiply-add (``addcmul``,
``add(..., alpha=)``) would round once where the compiled kernels round twice. The exceptions are
the float64 L1 norms (``l1_norm``, ``bernoulli_drop_``'s), summed in another order: equal within
1e-7 relative.

They are written for clarity over memory: a step allocates a few temporaries the size of one input
row (a mask, |x|, a product), where the compiled kernels allocate none.

References are those of ``kernels``: TIES (Yadav et al., arXiv:2306.01708; mergekit 0.1.5
``generalized_task_arithmetic``), DARE (Yu et al., arXiv:2311.03099; mergekit's rescale needs the L1
norms before and after the drop).
"""

from __future__ import annotations

from typing import Iterator, Optional, Sequence

import numpy as np
import torch

from explorer.methods.kernels import (
    Finished,
    check_float32,
    check_float32_any,
    check_k,
    check_weighted_sum,
    from_bits,
    ties_factors,
    trim_thresholds,
)

_MAGNITUDE = 0x7FFFFFFF  # the bits of a float32 pattern but the sign: |x|'s pattern, which orders like |x|


def _magnitude_bits(x: torch.Tensor) -> torch.Tensor:
    """The int32 bit patterns of |x|, flat (numel,): they order like |x|, with inf below every NaN."""
    return x.detach().reshape(-1).view(torch.int32) & _MAGNITUDE


def _kth_largest(bits: torch.Tensor, k: int) -> int:
    """The k-th largest of the flat int32 ``bits`` (1 <= k <= numel), from a top-k of the smaller side.

    Not ``torch.kthvalue``: on CUDA it selects within one thread block per slice, reported 20x slower
    than a sort on 1e8 entries (pytorch issue 75599), where ``torch.topk`` spreads a slice over many
    blocks (pytorch PR 71081).
    """
    if 2 * k <= bits.numel() + 1:
        return int(torch.topk(bits, k, sorted=False).values.min())
    return int(torch.topk(bits, bits.numel() - k + 1, largest=False, sorted=False).values.max())


def magnitude_cut(x: torch.Tensor, k: int) -> tuple[float, int]:
    """(v, cut): the top-k entries of |x| are those with |x| > v and those with |x| == v before index cut.

    As ``kernels.magnitude_cut``: x any shape, float32, read flat (on any device); 1 <= k <= numel,
    else ValueError. v is the exact k-th largest |x| (a Python float, a float32 value), found as the
    k-th largest bit pattern of |x| (``torch.topk``), so NaN orders above inf as there; cut is the
    flat index just past the ``k - #(|x| > v)``-th entry equal to v, numel when all of them are taken.
    Both equal the compiled kernel's exactly.
    """
    bits = _magnitude_bits(x)
    check_k(k, bits.numel())
    pattern = _kth_largest(bits, k)
    equal = bits == pattern
    take, ties = k - int((bits > pattern).sum()), int(equal.sum())
    cut = bits.numel() if take == ties else int(equal.nonzero()[take - 1]) + 1
    return from_bits(pattern), cut


def _peak(x: torch.Tensor) -> float:
    """The largest |x| (inf or NaN when one is not finite; 0 for no entries), by an integer max as the kernels."""
    bits = _magnitude_bits(x)
    return from_bits(int(bits.max()) if bits.numel() else 0)


def _finished(x: torch.Tensor, scale: float, base: torch.Tensor, out: torch.Tensor) -> Finished:
    """out = x * scale + base (the product rounded to float32 first) and its peak."""
    torch.mul(x.detach(), float(np.float32(scale)), out=out).add_(base.detach())
    return Finished(out, _peak(out))


def finish(x: torch.Tensor, scale: float, base: torch.Tensor, out: Optional[torch.Tensor] = None) -> Finished:
    """base + scale * x and its peak: the last step of a delta-space merge, as ``kernels.finish``.

    x, base: contiguous float32 tensors of one shape (*S) on one device, only read; scale is used as
    float32. The weights equal ``torch.mul(x, scale).add_(base)`` bit for bit. out: a (*S) float32
    contiguous tensor on that device to write (``x`` itself is allowed), else a new one. Finished.peak
    is the largest |weight|. Raises ValueError on another dtype, a strided input or mismatched shapes.
    """
    check_float32("finish", x.shape, x, base)
    return _finished(x, scale, base, torch.empty_like(x) if out is None else out)


def trim_mask(row: torch.Tensor, low: float, high: float, cut: int) -> torch.Tensor:
    """Bool (numel,) mask of the entries a trim keeps in ``row`` (flat float32, any device).

    |row| >= low before flat index cut, |row| >= high from it on: the thresholds of
    ``kernels.trim_thresholds``, compared in float32 as the compiled kernels compare them.
    """
    magnitude = row.abs()
    keep = magnitude >= high
    keep[:cut] = magnitude[:cut] >= low
    return keep


def _vote_terms(flat: torch.Tensor, cuts: Sequence[tuple[float, int]], vote_w: np.ndarray) -> Iterator[torch.Tensor]:
    """u_i = t_i * vote_w[i] per model, in model order (t_i: row i trimmed, +0 where not kept)."""
    for row, low, high, cut, w in zip(flat, *trim_thresholds(cuts), vote_w, strict=True):
        yield torch.mul(torch.where(trim_mask(row, float(low), float(high), int(cut)), row, 0.0), float(w))


def _elect(flat: torch.Tensor, cuts: Sequence[tuple[float, int]], vote_w: np.ndarray, count_vote: bool) -> torch.Tensor:
    """The vote per entry, (numel,) float32: u_0 + u_1 + ... left to right, or the sum of their signs."""
    vote = torch.zeros(flat.shape[1], dtype=torch.float32, device=flat.device) if count_vote else None
    for u in _vote_terms(flat, cuts, vote_w):
        if count_vote:
            vote.add_((u > 0).float() - (u < 0).float())  # +1, -1, or 0 (zeros and NaN), as the compiled vote
        else:
            vote = u if vote is None else vote.add_(u)
    return vote


def ties_merge(
    deltas: torch.Tensor,
    cuts: list[tuple[float, int]],
    weights: list[float],
    weighted_vote: bool,
    count_vote: bool,
    divisor: list[float] | None,
    out: Optional[torch.Tensor] = None,
    base: Optional[torch.Tensor] = None,
    scale: float = 1.0,
) -> torch.Tensor | tuple[torch.Tensor, Finished]:
    """sum_i [agree_i] w_i t_i / sum_i [agree_i] c_i over trimmed task vectors: ``kernels.ties_merge``.

    deltas: (N, *S) float32 task vectors on any device, untouched. cuts: per model (v, cut) of
    ``magnitude_cut`` (``kernels.keep_all``/``keep_none`` too): t_i keeps the entries it selects, +0
    elsewhere. weights: (N,) w_i. The elected sign is that of sum_i u_i (``count_vote`` False) or of
    sum_i sign(u_i) (True), u_i = w_i t_i when ``weighted_vote`` else t_i, zero electing +; entry i
    agrees when u_i has that sign. divisor: the c_i, or None for no division; a zero sum counts as 1.
    Returns a new (*S) float32 tensor on the deltas' device, or ``out`` overwritten when it is a
    contiguous (*S) float32 tensor there (it must not share memory with ``deltas``). base: a (*S)
    contiguous float32 tensor there: base + scale * result is written too and (result, ``Finished``)
    returned; ValueError when it is not. The float32 operations are those of the compiled kernel's
    ``_ties_range`` in its order (the sum of agreeing terms starts at +0 + the first, so a -0 is +0),
    so the result equals it bit for bit. Each u_i is computed twice (vote, then sum) to hold no (N, *S)
    buffer.
    """
    flat = deltas.detach().reshape(deltas.shape[0], -1)
    shape, device = deltas.shape[1:], deltas.device
    if out is None or (out.shape, out.dtype, out.device) != (shape, torch.float32, device) or not out.is_contiguous():
        out = torch.empty(shape, dtype=torch.float32, device=device)
    if base is not None:
        check_float32("ties_merge's base", out.shape, base)
    vote_w, coef, divide_w = ties_factors(weights, weighted_vote, divisor)
    positive = _elect(flat, cuts, vote_w, count_vote) >= 0
    mixed = out.view(-1).zero_()
    total = torch.zeros_like(mixed)
    for u, c, dw in zip(_vote_terms(flat, cuts, vote_w), coef, divide_w, strict=True):
        agree = torch.where(positive, u > 0, u < 0)
        mixed.add_(torch.where(agree, torch.mul(u, float(c)), 0.0))
        total.add_(torch.where(agree, float(dw), 0.0))
    if divisor is not None:
        mixed.div_(torch.where(total != 0, total, 1.0))
    return out if base is None else (out, _finished(out, scale, base, torch.empty_like(out)))


def weighted_sum(
    xs: Sequence[torch.Tensor], coefficients: Sequence[float], minus: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """sum_i c_i (x_i - minus) (``minus`` None: sum_i c_i x_i): a new float32 tensor (*S) on the inputs' device.

    As ``kernels.weighted_sum``: xs N >= 1 contiguous float32 tensors of one shape (*S) on one device;
    minus (*S) float32 or None; coefficients N floats, used as float32. c_0 (x_0 - minus), then each
    c_i (x_i - minus) added left to right, the difference and the product each rounded to float32:
    equal to the compiled kernel bit for bit (the linear merge, task arithmetic). Raises ValueError
    on another dtype, a strided input or mismatched shapes.
    """
    check_weighted_sum(xs, minus)
    differences = (torch.sub(x, minus) for x in xs) if minus is not None else xs
    out = None
    for x, c in zip(differences, np.array(coefficients, np.float32), strict=True):
        term = torch.mul(x.detach(), float(c))
        out = term if out is None else out.add_(term)
    return out


def l1_norm(x: torch.Tensor) -> torch.Tensor:
    """sum |x| of a float32 tensor (any shape, any device), summed in float64: a 0-dim float32 tensor there.

    As ``kernels.l1_norm`` (mergekit's rescale norm, without the drift of a float32 sum), but summed
    in torch's order: equal to it within 1e-7 relative, not bit for bit. Raises ValueError on another dtype.
    """
    check_float32_any("l1_norm", x, contiguous=False)
    return x.detach().abs().sum(dtype=torch.float64).float()


def bernoulli_drop_(
    x: torch.Tensor, density: float, generator: Optional[torch.Generator]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep each entry of ``x`` (any shape, float32, contiguous, any device) with probability ``density``, in place.

    DARE's drop as ``kernels.bernoulli_drop_``: the mask is drawn on the CPU from ``generator`` (a torch
    CPU generator; None: torch's default one, advanced by one draw per entry), so the kept entries and
    the generator's state equal the compiled kernel's, then moved to x's device (a float32 mask the
    size of x on both). Dropped entries become x * 0 (signed zeros). Returns the L1 norms of ``x``
    before and after (0-dim float32 on x's device, ``l1_norm``: within 1e-7 relative of the compiled
    kernel's). Raises ValueError unless ``x`` is a contiguous float32 tensor.
    """
    check_float32_any("bernoulli_drop_", x, contiguous=True)
    before = l1_norm(x)
    mask = torch.bernoulli(torch.full(x.shape, float(np.float32(density)), dtype=torch.float32), generator=generator)
    x.mul_(mask.to(x.device))
    return before, l1_norm(x)
