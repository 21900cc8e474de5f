"""Compiled kernels of the task-vector merges: the exact magnitude threshold, the fused TIES pass and DARE's drop.

Each reads its float32 input once per pass and allocates nothing of its size. They are compiled with
numba (serial, GIL released, cached on disk after the first compile); ``magnitude_cut`` and
``ties_merge`` run over ranges of the tensor on ``torch.get_num_threads()`` threads (``run_ranges``).

* ``magnitude_cut`` finds the top-k entries of |x| exactly as a threshold, without a sort: a
  radix select on the float32 bit patterns of |x| (for non-negative floats the bit pattern orders
  like the value). One pass histograms the high 16 bits, a second the low 15 bits of the entries in
  the bin that holds the k-th largest, which gives its exact value v; entries equal to v are taken in
  flat-index order (the first ``k - #(|x| > v)`` of them), as ``selection.topk_mask`` always has.
* ``bernoulli_drop_`` is DARE's random drop (Yu et al., arXiv:2311.03099) in one pass, drawn from a
  torch CPU generator exactly as ``x.mul_(torch.bernoulli(torch.full_like(x, p), generator=g))``
  draws it (torch's MT19937 stream, one 32-bit draw per entry, kept when its low 24 bits / 2^24 < p),
  with the generator advanced the same way, but with no tensor-sized mask and about 8x faster (the
  draws between two twists of the state are one vectorized loop). It also returns the L1 norms before
  and after the drop, which mergekit's rescale needs, summed in the same pass.
* ``l1_norm`` is sum |x| summed in float64 (torch's float32 ``vector_norm(x, 1)`` drifts by 1.5% on
  28 M entries), the rescale's norm for every other thinning.
* ``weighted_sum`` is sum_i c_i (x_i - m): the linear merge, task arithmetic (from the weights and
  the base, with no task vectors stored) and every unthinned weighted sum, one read of each input.
* ``ties_merge`` is TIES's trim, sign election and disjoint mean in one pass per output entry
  (Yadav et al., arXiv:2306.01708; mergekit 0.1.5 ``generalized_task_arithmetic``), with the same
  float32 operations in the same order as the step-by-step torch code in ``task_arithmetic``, so
  results are equal bit for bit (tested). Given the base, the same pass also writes the merged
  weights base + lambda * result (``Finished``).
* ``finish`` is a delta-space merge's last step, base + lambda * task vector, with the peak |value|
  measured in the same pass (an integer max over the bit patterns), so the output check needs no pass.

They read CPU memory only: each public kernel hands a tensor on another device (CUDA) to its torch
version in ``torch_kernels``, which gives the same results (``torch_path``).
"""

from __future__ import annotations

import importlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import reduce
from types import ModuleType
from typing import Callable, Optional, Sequence

import numba
import numpy as np
import torch

HIGH_BITS = 16  # bits 15..30 of |x|'s float32 pattern: the first histogram
LOW_BITS = 15  # bits 0..14: the second
RANGE = 1 << 22  # most entries per work item
# Fewest entries worth handing to another thread. A merge already runs in a pipeline of threads
# (reader, merge workers, writer), where handing a range over costs more than it saves below about a
# million entries: TIES on SmolLM2's layer tensors took 1.12 s at 1 << 16, 0.78 s at 1 << 20. A caller
# that runs alone (Inspect's scan) splits from SCAN_MIN_RANGE on: its refresh took 0.47 s, 0.68 s at 1 << 20.
MIN_RANGE = 1 << 20
SCAN_MIN_RANGE = 1 << 16
BLOCK = 2048  # entries per block of the fused TIES pass (its vote, sum and divisor stay in L1)
FILTER = 64  # entries per run the second histogram pass checks for its bin at once
_POOL = ThreadPoolExecutor(max_workers=max(1, torch.get_num_threads()), thread_name_prefix="merge-kernel")
_TORCH = "explorer.methods.torch_kernels"


def torch_path(x: torch.Tensor, module: str) -> Optional[ModuleType]:
    """The torch kernels ``module`` (a dotted name) when ``x`` is not on the CPU, else None.

    The compiled kernels read CPU memory only; a kernel given a tensor on another device (CUDA) calls
    its namesake in ``module`` instead. Imported on first use, as that module imports this one.
    """
    return None if x.device.type == "cpu" else importlib.import_module(module)


def _ranges(size: int, min_range: int) -> list[tuple[int, int]]:
    """[a, b) ranges covering range(size): one per thread at least, at most RANGE entries, none under ``min_range`` but one."""
    parts = max(1, min(max(torch.get_num_threads(), -(-size // RANGE)), size // min_range))
    step = -(-size // parts) or 1
    return [(a, min(a + step, size)) for a in range(0, size, step)]


def run_ranges(kernel: Callable, size: int, *args, min_range: int = MIN_RANGE) -> list:
    """kernel(*args, a, b) for every range of ``_ranges(size, min_range)``, on the pool; results in range order."""
    ranges = _ranges(size, min_range)
    if len(ranges) == 1:
        return [kernel(*args, *ranges[0])]
    return list(_POOL.map(lambda r: kernel(*args, *r), ranges))


@numba.njit(nogil=True, cache=True)
def _high_counts(bits, a, b):  # pragma: no cover - compiled
    counts = np.zeros(1 << HIGH_BITS, np.int64)
    for j in range(a, b):
        counts[(bits[j] & 0x7FFFFFFF) >> LOW_BITS] += 1
    return counts


@numba.njit(nogil=True, cache=True)
def _low_counts(bits, high, a, b):  # pragma: no cover - compiled
    # the bin holds ~0.1% of the entries: a vectorized count finds the FILTER-entry runs that hold any
    # (0.34 vs 0.74 ns per entry for one branchy loop), and only those are histogrammed
    counts = np.zeros(1 << LOW_BITS, np.int64)
    for s in range(a, b, FILTER):
        x = bits[s : min(s + FILTER, b)]
        hits = 0
        for j in range(x.size):
            hits += ((x[j] & 0x7FFFFFFF) >> LOW_BITS) == high
        if hits:
            for j in range(x.size):
                m = x[j] & 0x7FFFFFFF
                if m >> LOW_BITS == high:
                    counts[m & ((1 << LOW_BITS) - 1)] += 1
    return counts


@numba.njit(nogil=True, cache=True)
def _nth_equal(bits, pattern, n):  # pragma: no cover - compiled
    """Flat index just past the n-th (1-based) entry whose |x| pattern equals ``pattern``."""
    seen = 0
    for s in range(0, bits.size, BLOCK):  # a vectorized count per block; the block that holds it is searched
        x = bits[s : min(s + BLOCK, bits.size)]
        hits = 0
        for j in range(x.size):
            hits += (x[j] & 0x7FFFFFFF) == pattern
        if seen + hits >= n:
            for j in range(x.size):
                if x[j] & 0x7FFFFFFF == pattern:
                    seen += 1
                    if seen == n:
                        return s + j + 1
        seen += hits
    return bits.size


@numba.njit(nogil=True, cache=True)
def _select(counts, k):  # pragma: no cover - compiled
    """(bin, entries in higher bins) of the bin holding the k-th largest, counting bins from the top."""
    above = 0
    for b in range(counts.size - 1, -1, -1):
        if above + counts[b] >= k:
            return b, above
        above += counts[b]
    return 0, above


def check_k(k: int, size: int) -> None:
    """Raise ValueError unless 1 <= k <= size: ``magnitude_cut``'s k over ``size`` entries."""
    if not 1 <= k <= size:
        raise ValueError(f"magnitude_cut: k={k} is outside [1, {size}]")


def from_bits(pattern: int) -> float:
    """The float32 value whose bit pattern is ``pattern`` (an int32), as a Python float."""
    return float(np.array([pattern], np.int32).view(np.float32)[0])


def magnitude_cut(x: torch.Tensor, k: int) -> tuple[float, int]:
    """(v, cut): the top-k entries of |x| are those with |x| > v and those with |x| == v before index cut.

    x: any shape, float32 (read flat, contiguous); 1 <= k <= numel, else ValueError. v is the exact
    k-th largest |x| (float32 value); cut is the flat index just past the last entry equal to v that
    the top k takes (numel when it takes all of them). Two passes over x, no sort, no copy of x.
    """
    if device := torch_path(x, _TORCH):
        return device.magnitude_cut(x, k)
    bits = x.detach().contiguous().view(torch.int32).reshape(-1).numpy()
    check_k(k, bits.size)
    # the ranges' histograms added up (one range's is taken as it is: no 65,536-bin sum per call)
    high, above = _select(reduce(np.add, run_ranges(_high_counts, bits.size, bits)), k)
    low_counts = reduce(np.add, run_ranges(_low_counts, bits.size, bits, high))
    low, above_low = _select(low_counts, k - above)
    pattern = (high << LOW_BITS) | low
    take = k - above - above_low
    cut = bits.size if take == low_counts[low] else int(_nth_equal(bits, pattern, take))
    return from_bits(pattern), cut


def keep_all() -> tuple[float, int]:
    """The (v, cut) of a task vector that is not trimmed: every |x| > -1."""
    return -1.0, 0


def keep_none() -> tuple[float, int]:
    """The (v, cut) of a task vector trimmed to nothing: no |x| > inf."""
    return float("inf"), 0


@numba.njit(nogil=True, cache=True, inline="always")
def _finish_block(x, scale, base, out):  # pragma: no cover - compiled
    # out = x * scale + base (two float32 roundings, as torch.mul then torch.add: numba fuses no
    # multiply-add), and the largest |out| as its bit pattern: |x| orders like its pattern, inf is
    # 0x7F800000 and every NaN above it, so one vectorized integer max checks range and finiteness
    for j in range(x.size):
        out[j] = x[j] * scale + base[j]
    bits, magnitude = out.view(np.int32), np.int32(0x7FFFFFFF)  # int32 throughout: vpmaxsd, 8 entries at once
    peak = np.int32(0)
    for j in range(bits.size):
        peak = max(peak, bits[j] & magnitude)
    return peak


@numba.njit(nogil=True, cache=True)
def _finish_range(x, scale, base, out, a, b):  # pragma: no cover - compiled
    peak = np.int32(0)
    for s in range(a, b, BLOCK):
        e = min(s + BLOCK, b)
        peak = max(peak, _finish_block(x[s:e], scale, base[s:e], out[s:e]))
    return peak


@dataclass(frozen=True)
class Finished:
    """A merged tensor's weights, base + scale * x, as the pass that wrote them left them.

    weights: (*S) float32. peak: the largest |value| (float; inf, or NaN, when a value is not finite),
    measured in that pass, so the output check (``executor.cast_output``) reads nothing again.
    """

    weights: torch.Tensor
    peak: float


def _peak(bits: Sequence[int]) -> float:
    """The float32 whose pattern is the largest of ``bits`` (per-range maxima of |x| patterns); 0 for none."""
    return from_bits(max(bits, default=0))


def check_float32(who: str, shape: torch.Size, *tensors: torch.Tensor) -> None:
    """Raise ValueError unless every tensor is contiguous float32 of ``shape`` (the kernels read them flat)."""
    if any(t.dtype != torch.float32 or not t.is_contiguous() or t.shape != shape for t in tensors):
        raise ValueError(f"{who} needs contiguous float32 tensors of shape {tuple(shape)}")


def finish(x: torch.Tensor, scale: float, base: torch.Tensor, out: Optional[torch.Tensor] = None) -> Finished:
    """base + scale * x and its peak in one pass: the last step of a delta-space merge.

    x, base: contiguous float32 tensors of one shape (*S), only read; scale is used as float32. The
    weights equal ``torch.mul(x, scale).add_(base)`` bit for bit (the product is rounded to float32
    before the sum). out: a (*S) float32 contiguous tensor to write (``x`` itself is allowed), else a
    new one. Raises ValueError on another dtype, a strided input or mismatched shapes.
    """
    if device := torch_path(x, _TORCH):
        return device.finish(x, scale, base, out)
    check_float32("finish", x.shape, x, base)
    out = torch.empty(x.shape, dtype=torch.float32) if out is None else out
    flat = (x.detach().view(-1).numpy(), np.float32(scale), base.detach().view(-1).numpy(), out.view(-1).numpy())
    size = x.numel()
    # small tensors are in cache: handing halves to the pool costs more than it saves
    peaks = [_finish_range(*flat, 0, size)] if size < RANGE else run_ranges(_finish_range, size, *flat)
    return Finished(out, _peak(peaks))


@numba.njit(nogil=True, cache=True)
def _ties_range(
    d, lows, highs, cut, vote_w, coef, divide_w, count_vote, divide, out, scale, base, final, a, b
):  # pragma: no cover
    # Block by block, in three loops per model over a block buffer (so LLVM vectorizes them):
    # 1. trim and vote: u_i = t_i vote_w[i] goes to the buffer, t_i keeping d where |d| >= lows[i] before
    #    cut[i] and |d| >= highs[i] (the next float up: |d| > v) after it, +0 elsewhere; the vote adds u_i
    #    (or its sign: count_vote) left to right;
    # 2. agreement and disjoint sum: model 0 starts mixed and total at +0 + its term, the others add theirs;
    # 3. the last model's loop writes out: mixed / total (a zero total counts as 1), or mixed;
    # 4. with a base (final not empty): final = out * scale + base while the block is in L1 (``_finish_block``).
    # Returns the largest |final| bit pattern (0 without a base).
    # w_i t_i = u_i coef[i] exactly (coef is 1 for a weighted vote, w_i for an unweighted one), so the
    # float32 operations and their order are those of the torch steps: results equal bit for bit.
    n = d.shape[0]
    zero, one = np.float32(0.0), np.float32(1.0)
    kept = np.empty((n, BLOCK), np.float32)
    vote = np.empty(BLOCK, np.float32)
    mixed = np.empty(BLOCK, np.float32)
    total = np.empty(BLOCK, np.float32)
    peak = np.int32(0)
    for s in range(a, b, BLOCK):
        e = min(s + BLOCK, b)
        m = e - s
        if count_vote:
            vote[:m] = zero
        for i in range(n):
            vw = vote_w[i]
            for lo, hi, th in ((s, min(max(cut[i], s), e), lows[i]), (min(max(cut[i], s), e), e, highs[i])):
                x, k, v = d[i, lo:hi], kept[i, lo - s : hi - s], vote[lo - s : hi - s]
                if count_vote:
                    for j in range(hi - lo):
                        u = (x[j] if abs(x[j]) >= th else zero) * vw
                        k[j] = u
                        v[j] += one if u > 0 else (-one if u < 0 else zero)
                elif i == 0:
                    for j in range(hi - lo):
                        u = (x[j] if abs(x[j]) >= th else zero) * vw
                        k[j] = u
                        v[j] = u
                else:
                    for j in range(hi - lo):
                        u = (x[j] if abs(x[j]) >= th else zero) * vw
                        k[j] = u
                        v[j] += u
        for i in range(max(n - 1, 1)):  # every model but the last (the only one when n == 1)
            u, c, dw = kept[i, :m], coef[i], divide_w[i]
            if i == 0:
                for j in range(m):
                    agree = (u[j] > 0) if vote[j] >= 0 else (u[j] < 0)
                    mixed[j] = zero + (u[j] * c if agree else zero)
                    total[j] = zero + (dw if agree else zero)
            else:
                for j in range(m):
                    agree = (u[j] > 0) if vote[j] >= 0 else (u[j] < 0)
                    mixed[j] += u[j] * c if agree else zero
                    total[j] += dw if agree else zero
        o = out[s:e]
        u, c, dw = kept[n - 1, :m], coef[n - 1], divide_w[n - 1]
        if n > 1 and divide:
            for j in range(m):
                agree = (u[j] > 0) if vote[j] >= 0 else (u[j] < 0)
                mj = mixed[j] + (u[j] * c if agree else zero)
                tj = total[j] + (dw if agree else zero)
                o[j] = mj / (tj if tj != 0 else one)
        elif n > 1:
            for j in range(m):
                agree = (u[j] > 0) if vote[j] >= 0 else (u[j] < 0)
                o[j] = mixed[j] + (u[j] * c if agree else zero)
        elif divide:
            for j in range(m):
                o[j] = mixed[j] / (total[j] if total[j] != 0 else one)
        else:
            for j in range(m):
                o[j] = mixed[j]
        if final.size:
            peak = max(peak, _finish_block(o, scale, base[s:e], final[s:e]))
    return peak


def trim_thresholds(cuts: Sequence[tuple[float, int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(lows, highs, cut) of the trims ``cuts`` (per model (v, cut), ``magnitude_cut``), each (N,).

    Model i keeps the entries with |x| >= lows[i] = v before flat index cut[i] and those with
    |x| >= highs[i] (the next float32 above v: |x| > v) from it on. lows, highs float32; cut int64.
    """
    lows = np.array([c[0] for c in cuts], np.float32)
    return lows, np.nextafter(lows, np.float32(np.inf)), np.array([c[1] for c in cuts], np.int64)


def ties_factors(
    weights: Sequence[float], weighted_vote: bool, divisor: Optional[Sequence[float]]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(vote_w, coef, divide_w), each (N,) float32: ``ties_merge``'s per-model factors.

    u_i = vote_w[i] t_i is model i's vote (w_i t_i when ``weighted_vote``, else t_i) and w_i t_i =
    coef[i] u_i exactly; divide_w holds the divisor's c_i (zeros when ``divisor`` is None).
    """
    w = np.array(weights, np.float32)
    ones = np.ones(w.size, np.float32)
    divide_w = np.array(divisor if divisor is not None else [0.0] * w.size, np.float32)
    return (w, ones, divide_w) if weighted_vote else (ones, w, divide_w)


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
    """sum_i [agree_i] w_i t_i / sum_i [agree_i] c_i over trimmed task vectors, in one pass.

    deltas: (N, *S) float32 task vectors, untouched. cuts: per model (v, cut) of ``magnitude_cut``
    (``keep_all``/``keep_none`` for untrimmed / emptied vectors): t_i keeps the entries it selects, 0
    elsewhere. weights: (N,) w_i. The elected sign is that of sum_i u_i (``count_vote`` False) or of
    sum_i sign(u_i) (True), u_i = w_i t_i when ``weighted_vote`` else t_i, zero electing +; entry i
    agrees when u_i has that sign. divisor: the c_i (weights or ones), or None for no division; a zero
    sum counts as 1. Returns a new (*S) float32 tensor, or ``out`` overwritten when it is a contiguous
    (*S) float32 tensor (a buffer to reuse; it must not share memory with ``deltas``).
    base: a (*S) contiguous float32 tensor: the same pass also writes base + scale * result (``finish``),
    and (result, ``Finished``) is returned.
    """
    if device := torch_path(deltas, _TORCH):
        return device.ties_merge(deltas, cuts, weights, weighted_vote, count_vote, divisor, out, base, scale)
    n = deltas.shape[0]
    flat = deltas.detach().contiguous().view(n, -1).numpy()
    vote_w, coef, divide_w = ties_factors(weights, weighted_vote, divisor)
    lows, highs, cut = trim_thresholds(cuts)
    if out is None or out.shape != deltas.shape[1:] or out.dtype != torch.float32 or not out.is_contiguous():
        out = torch.empty(deltas.shape[1:], dtype=torch.float32)
    args = (flat, lows, highs, cut, vote_w, coef, divide_w, count_vote, divisor is not None, out.view(-1).numpy())
    if base is None:
        nothing = np.empty(0, np.float32)
        run_ranges(_ties_range, flat.shape[1], *args, np.float32(1), nothing, nothing)
        return out
    check_float32("ties_merge's base", out.shape, base)
    final = torch.empty_like(out)
    parts = (np.float32(scale), base.detach().view(-1).numpy(), final.view(-1).numpy())
    peaks = run_ranges(_ties_range, flat.shape[1], *args, *parts)
    return out, Finished(final, _peak(peaks))


@numba.njit(nogil=True, cache=True)
def _weighted_range(xs, minus, subtract, c, out, a, b):  # pragma: no cover - compiled
    # block by block, one vectorized loop per input: out = c_0 (x_0 - m) + c_1 (x_1 - m) + ..., left to right
    for s in range(a, b, BLOCK):
        e = min(s + BLOCK, b)
        o, m = out[s:e], minus[s:e]
        for i in range(len(xs)):
            x, ci = xs[i][s:e], c[i]
            if subtract and i == 0:
                for j in range(e - s):
                    o[j] = ci * (x[j] - m[j])
            elif subtract:
                for j in range(e - s):
                    o[j] += ci * (x[j] - m[j])
            elif i == 0:
                for j in range(e - s):
                    o[j] = ci * x[j]
            else:
                for j in range(e - s):
                    o[j] += ci * x[j]


def check_weighted_sum(xs: Sequence[torch.Tensor], minus: Optional[torch.Tensor]) -> None:
    """Raise ValueError unless ``weighted_sum`` can read ``xs`` and ``minus`` (its docstring)."""
    if not xs or any(x.dtype != torch.float32 or not x.is_contiguous() or x.shape != xs[0].shape for x in xs):
        raise ValueError("weighted_sum needs N >= 1 contiguous float32 tensors of one shape")
    if minus is not None and (minus.dtype != torch.float32 or not minus.is_contiguous() or minus.shape != xs[0].shape):
        raise ValueError(f"weighted_sum: minus must be a contiguous float32 tensor of shape {tuple(xs[0].shape)}")


def weighted_sum(
    xs: Sequence[torch.Tensor], coefficients: Sequence[float], minus: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """sum_i c_i (x_i - minus) (``minus`` None: sum_i c_i x_i) in one pass: a new float32 tensor (*S).

    xs: N >= 1 float32 tensors of one shape (*S), each contiguous (the rows of a stacked (N, *S) tensor
    or separate ones); minus: (*S) float32 or None; coefficients: N floats, used as float32. Each
    x_i - minus is rounded to float32 before it is scaled, so the result equals the same sum over
    task vectors formed first (``x_i - minus`` stored, then summed with ``minus`` None), bit for bit.
    Raises ValueError on another dtype, a strided input or mismatched shapes.
    """
    if xs and (device := torch_path(xs[0], _TORCH)):
        return device.weighted_sum(xs, coefficients, minus)
    check_weighted_sum(xs, minus)
    flat = tuple(x.detach().view(-1).numpy() for x in xs)
    subtracted = (minus if minus is not None else xs[0]).detach().view(-1).numpy()
    out = torch.empty(xs[0].shape, dtype=torch.float32)
    c = np.array(coefficients, np.float32)
    run_ranges(_weighted_range, flat[0].size, flat, subtracted, minus is not None, c, out.view(-1).numpy())
    return out


# torch's CPU generator state (``Generator.get_state()``, 5056 bytes): the initial seed (uint64), the
# number of draws left before the next twist and a "seeded" flag (int32 each), the index of the next
# word (uint64), then the 624 MT19937 state words, each stored as a uint64.
_LEFT, _NEXT, _WORDS = slice(8, 12), slice(16, 24), slice(24, 24 + 624 * 8)


@numba.njit(nogil=True, cache=True)
def _twist(w):  # pragma: no cover - compiled
    # MT19937's next state, in three loops so no index needs a modulo
    upper, lower, matrix, one = np.uint32(0x80000000), np.uint32(0x7FFFFFFF), np.uint32(0x9908B0DF), np.uint32(1)
    for k in range(227):
        y = (w[k] & upper) | (w[k + 1] & lower)
        w[k] = w[k + 397] ^ (y >> one) ^ (matrix * (y & one))
    for k in range(227, 623):
        y = (w[k] & upper) | (w[k + 1] & lower)
        w[k] = w[k - 227] ^ (y >> one) ^ (matrix * (y & one))
    y = (w[623] & upper) | (w[0] & lower)
    w[623] = w[396] ^ (y >> one) ^ (matrix * (y & one))


@numba.njit(nogil=True, cache=True)
def _temper_keep(words, x, below):  # pragma: no cover - compiled
    # one tempered draw per entry; kept when its low 24 bits < below (= u < p), else x * 0 (signed zero)
    zero = np.float32(0.0)
    for j in range(words.size):
        y = words[j]
        y ^= y >> np.uint32(11)
        y ^= (y << np.uint32(7)) & np.uint32(0x9D2C5680)
        y ^= (y << np.uint32(15)) & np.uint32(0xEFC60000)
        y ^= y >> np.uint32(18)
        x[j] = x[j] if (y & np.uint32(0xFFFFFF)) < below else x[j] * zero


@numba.njit(nogil=True, cache=True, fastmath={"reassoc"})
def _abs_sum(x):  # pragma: no cover - compiled
    # sum |x| in float64; reassociation lets LLVM vectorize the sum (its order is fixed by the compiled
    # code, the same in every process on one machine and independent of the thread count)
    s = 0.0
    for j in range(x.size):
        s += abs(np.float64(x[j]))
    return s


def check_float32_any(who: str, x: torch.Tensor, contiguous: bool) -> None:
    """Raise ValueError unless ``x`` (any shape) is float32, and contiguous when ``contiguous``."""
    if x.dtype != torch.float32 or (contiguous and not x.is_contiguous()):
        raise ValueError(f"{who} needs a {'contiguous ' if contiguous else ''}float32 tensor")


def l1_norm(x: torch.Tensor) -> torch.Tensor:
    """sum |x| of a float32 tensor (any shape), as a 0-dim float32 tensor: summed in float64, one serial pass.

    Within 1e-7 of the exact sum, like mergekit's ``tensor.abs().sum()`` (torch's cascade sum) and
    unlike ``torch.linalg.vector_norm(x, 1)``, whose float32 accumulation on the CPU is off by 0.03% at
    4 M entries and 1.5% at 28 M (6.6% on one thread; measured with torch 2.13). The order of the sum
    does not depend on the thread count. Raises ValueError on another dtype.
    """
    if device := torch_path(x, _TORCH):
        return device.l1_norm(x)
    check_float32_any("l1_norm", x, contiguous=False)
    return torch.tensor(_abs_sum(x.detach().contiguous().view(-1).numpy()), dtype=torch.float32)


@numba.njit(nogil=True, cache=True)
def _drop(x, p, words, left, nxt, norms):  # pragma: no cover - compiled
    # torch's mt19937 draw: ``if --left == 0: twist (left = 624, next = 0)``, then temper words[next++].
    # Between twists the draws are independent, so each run of words is one vectorizable loop; the L1
    # norms before and after are summed run by run while the run is in cache (norms[0], norms[1]).
    # u = (y & 0xFFFFFF) / 2^24 < p  <=>  (y & 0xFFFFFF) < ceil(p * 2^24), exactly (p * 2^24 is exact).
    below = np.uint32(np.ceil(np.float64(p) * (1 << 24)))
    j = 0
    while j < x.size:
        if left == 1:
            _twist(words)
            left, nxt = 625, 0  # the draw that twisted then counts as one of the 624
        take = min(left - 1, x.size - j)
        run = x[j : j + take]
        norms[0] += _abs_sum(run)
        _temper_keep(words[nxt : nxt + take], run, below)
        norms[1] += _abs_sum(run)
        left, nxt, j = left - take, nxt + take, j + take
    return left, nxt


def bernoulli_drop_(
    x: torch.Tensor, density: float, generator: Optional[torch.Generator]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep each entry of ``x`` (any shape, float32, contiguous) with probability ``density``, in place.

    Dropped entries become x * 0 (signed zeros, as the float mask of ``torch.bernoulli`` makes them).
    generator: a torch CPU generator (None: torch's default one), advanced by one draw per entry.
    Equal bit for bit, draws included, to ``x.mul_(torch.bernoulli(torch.full_like(x, density), generator=generator))``.
    Returns the L1 norms of ``x`` before and after the drop (sum |x|, 0-dim float32), summed in float64
    in a fixed order in the same pass (mergekit's rescale needs both). Raises ValueError unless ``x`` is
    a contiguous float32 tensor.
    """
    if device := torch_path(x, _TORCH):
        return device.bernoulli_drop_(x, density, generator)
    generator = generator if generator is not None else torch.default_generator
    check_float32_any("bernoulli_drop_", x, contiguous=True)
    state = generator.get_state()
    raw = state.numpy()
    words = raw[_WORDS].view(np.uint64).astype(np.uint32)
    norms = np.zeros(2, np.float64)
    left, nxt = _drop(
        x.view(-1).numpy(),
        np.float32(density),
        words,
        int(raw[_LEFT].view(np.int32)[0]),
        int(raw[_NEXT].view(np.uint64)[0]),
        norms,
    )
    raw[_WORDS].view(np.uint64)[:] = words
    raw[_LEFT].view(np.int32)[0] = left
    raw[_NEXT].view(np.uint64)[0] = nxt
    generator.set_state(state)
    before, after = torch.from_numpy(norms).to(torch.float32)
    return before, after
