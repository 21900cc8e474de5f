"""The Inspect scan's exact sums over one tensor's task vectors, in compiled passes.

For task vectors x (N, numel) float32 and the magnitude trim of each row (``kernels.magnitude_cut``),
one pass per range of entries (GIL released, ranges on ``kernels``' threads) accumulates in float64
every exact statistic ``scan.Scan`` reports: per expert the L1 mass, zeros, entries below each
threshold, the kept count and kept L1 mass; per pair the dot product, kept overlap and sign dot;
per entry the cross-expert counts (kept by any, by two or more, sign conflicts, agreement). A second,
lighter pass (``merge_distances``) places a merge: its squared distance from every expert and from
the base. The first depends on the density only, so a session keeps it across merges (``scan``).
"Kept" is kept by the trim and nonzero (a zero has no sign). Both read CPU memory only; given a tensor
on another device (CUDA), each calls its torch version in ``scan_torch`` (``kernels.torch_path``).
"""

from __future__ import annotations

import numba
import numpy as np
import torch

from explorer.methods.kernels import SCAN_MIN_RANGE, run_ranges, torch_path, trim_thresholds

BLOCK = 4096  # entries per block: its kept flags and signs stay in cache; its sums are float32 (exact counts)
# Sums may be reassociated (so LLVM vectorizes them); no assumption about inf (a trim of nothing uses it).
_FAST = {"reassoc", "contract", "nsz", "arcp"}
_TORCH = "explorer.inspect.scan_torch"


@numba.njit(nogil=True, cache=True, fastmath=_FAST)
def _scan_range(x, lows, highs, cut, thresholds, a, b):  # pragma: no cover - compiled
    n, t = x.shape[0], thresholds.size
    per_expert = np.zeros((3 + t, n))  # l1, zeros, kept_l1, below_0..below_t-1
    pairs = np.zeros((3, n, n))  # gram, inter (kept overlap), sdot (sign dot)
    totals = np.zeros(4)  # kept_any, kept_2plus, conflicts, agreement_sum
    kept = np.empty((n, BLOCK), np.float32)
    sign = np.empty((n, BLOCK), np.float32)
    count = np.empty(BLOCK, np.float32)
    net = np.empty(BLOCK, np.float32)
    for s in range(a, b, BLOCK):
        e = min(s + BLOCK, b)
        size = e - s
        for i in range(n):
            xi, ki, si = x[i, s:e], kept[i], sign[i]
            for part in range(2):  # entries before cut[i] are kept at |x| >= lows[i], the rest at >= highs[i]
                lo, hi = (0, min(max(cut[i] - s, 0), size)) if part == 0 else (min(max(cut[i] - s, 0), size), size)
                th = lows[i] if part == 0 else highs[i]
                for j in range(lo, hi):
                    keep = xi[j] != 0 and abs(xi[j]) >= th
                    ki[j] = 1.0 if keep else 0.0
                    si[j] = (1.0 if xi[j] > 0 else -1.0) if keep else 0.0
            l1 = zeros = kept_l1 = np.float32(0.0)
            for j in range(size):
                m = abs(xi[j])
                l1 += m
                zeros += np.float32(1.0) if m == 0 else np.float32(0.0)
                kept_l1 += m * ki[j]
            per_expert[0, i] += l1
            per_expert[1, i] += zeros
            per_expert[2, i] += kept_l1
            for k in range(t):
                below = np.float32(0.0)
                for j in range(size):
                    below += np.float32(1.0) if abs(xi[j]) < thresholds[k] else np.float32(0.0)
                per_expert[3 + k, i] += below
        for i in range(n):
            for k in range(i, n):
                g = inter = sdot = np.float32(0.0)
                xi, xk = x[i, s:e], x[k, s:e]
                for j in range(size):
                    g += xi[j] * xk[j]
                    inter += kept[i, j] * kept[k, j]
                    sdot += sign[i, j] * sign[k, j]
                pairs[0, i, k] += g
                pairs[1, i, k] += inter
                pairs[2, i, k] += sdot
        count[:size] = 0
        net[:size] = 0
        for i in range(n):
            for j in range(size):
                count[j] += kept[i, j]
                net[j] += sign[i, j]
        one, zero = np.float32(1.0), np.float32(0.0)
        any_ = two = conflicts = agreement = zero
        for j in range(size):
            c, v = count[j], abs(net[j])
            any_ += one if c > 0.5 else zero
            two += one if c > 1.5 else zero
            conflicts += one if v < c else zero
            agreement += v / max(c, one)
        totals[0] += any_
        totals[1] += two
        totals[2] += conflicts
        totals[3] += agreement
    return per_expert, pairs, totals


@numba.njit(nogil=True, cache=True, fastmath=_FAST)
def _distance_range(rows, minus, base, merged, a, b):  # pragma: no cover - compiled
    n = len(rows)
    dist = np.zeros(n)
    xb = np.zeros(n)
    moved_sq = bb = 0.0
    for i in range(n):
        r = rows[i]
        d2 = dot = 0.0
        for j in range(a, b):
            x = np.float64(r[j] - minus[j])  # the float32 task vector entry, as the scan reads it
            d = x - (merged[j] - base[j])
            d2 += d * d
            dot += x * base[j]
        dist[i] = d2
        xb[i] = dot
    for j in range(a, b):
        moved = np.float64(merged[j] - base[j])
        moved_sq += moved * moved
        bb += np.float64(base[j]) * base[j]
    return dist, xb, moved_sq, bb


def scan_sums(x: torch.Tensor, cuts: list[tuple[float, int]], thresholds: tuple[float, ...]) -> dict:
    """Exact float64 sums over task vectors ``x`` (N, numel) float32 that need no merge (module docstring).

    cuts: per expert the trim's (v, cut) (``kernels.magnitude_cut``; ``keep_none()`` at density 0).
    Returns float64 arrays l1, zeros, kept_l1 (N,), below (T, N), gram, inter, sdot (N, N,
    symmetric), and scalars kept_any, kept_2plus, conflicts, agreement_sum.
    """
    if device := torch_path(x, _TORCH):
        return device.scan_sums(x, cuts, thresholds)
    flat = x.contiguous().numpy()
    args = (flat, *trim_thresholds(cuts), np.array(thresholds, np.float32))
    parts = run_ranges(_scan_range, flat.shape[1], *args, min_range=SCAN_MIN_RANGE)
    return sums_dict(*(sum(p[k] for p in parts) for k in range(3)))


def sums_dict(per_expert: np.ndarray, pairs: np.ndarray, totals: np.ndarray) -> dict:
    """``scan_sums``' dict of its float64 sums, each named.

    per_expert: (3 + T, N) l1, zeros, kept_l1, below_0..below_T-1; pairs: (3, N, N) gram, inter, sdot,
    of which the upper triangle (diagonal included) is read and mirrored; totals: (4,) kept_any,
    kept_2plus, conflicts, agreement_sum.
    """
    pairs = np.triu(pairs) + np.transpose(np.triu(pairs, 1), (0, 2, 1))
    sums = dict(l1=per_expert[0], zeros=per_expert[1], kept_l1=per_expert[2], below=per_expert[3:])
    sums |= dict(gram=pairs[0], inter=pairs[1], sdot=pairs[2])
    return sums | {k: totals[i] for i, k in enumerate(("kept_any", "kept_2plus", "conflicts", "agreement_sum"))}


def merge_distances(
    rows: list[torch.Tensor], minus: torch.Tensor, base: torch.Tensor, merged: torch.Tensor
) -> dict[str, np.ndarray]:
    """Float64 sums that place a merge among its inputs, one pass over each task vector.

    Task vector i is rows[i] - minus, each (numel,) float32 (an expert's weights and the base, or a
    task vector and zeros: the same float32 values either way). base, merged: (numel,) float32 weights
    of the base and the merge; moved = merged - base (float32, as torch subtracts). Returns dist_sq
    (N,) ||x_i - moved||^2, xb (N,) x_i . base, and scalars moved_sq ||moved||^2, bb ||base||^2.
    """
    if device := torch_path(base, _TORCH):
        return device.merge_distances(rows, minus, base, merged)
    arrays = tuple(r.contiguous().numpy() for r in rows)
    args = (arrays, minus.contiguous().numpy(), base.contiguous().numpy(), merged.contiguous().numpy())
    parts = run_ranges(_distance_range, base.numel(), *args, min_range=SCAN_MIN_RANGE)
    return dict(zip(("dist_sq", "xb", "moved_sq", "bb"), (sum(p[k] for p in parts) for k in range(4)), strict=True))
