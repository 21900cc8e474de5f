"""The Inspect scan's sums (``scan_kernel``) in torch operations, for task vectors on any device (CUDA).

``scan_kernel``'s compiled passes read CPU memory; given a tensor on another device, each calls its
namesake here. Same arguments and the same dict of numpy float64 values (computed on the tensors'
device, copied to the CPU at the end). Counts are exact integers, equal to the compiled passes'.
Sums are accumulated in float64 throughout: ``merge_distances`` (float64 there too) equals the
compiled pass within 1e-9 relative. The compiled scan sums each 4096-entry block in float32 first,
so ``scan_sums``' l1, kept_l1, gram and agreement_sum here are the exact float64 sums and differ from
the compiled ones by that float32 rounding: up to 3e-7 of the largest value on one block, 7e-9 on
3 x 2 M entries (measured; tested within 1e-6).
"""

from __future__ import annotations

import numpy as np
import torch

from explorer.inspect.scan_kernel import sums_dict
from explorer.methods.kernels import trim_thresholds
from explorer.methods.torch_kernels import trim_mask


def _kept_and_signs(x: torch.Tensor, cuts: list[tuple[float, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept bool, sign int8), each (N, numel): kept by the trim and nonzero; sign +-1 where kept, else 0."""
    rows = zip(x, *trim_thresholds(cuts), strict=True)
    kept = torch.stack([trim_mask(row, float(low), float(high), int(cut)) for row, low, high, cut in rows])
    kept &= x != 0
    return kept, kept.to(torch.int8).masked_fill_(kept & (x < 0), -1)


def _row_products(a: torch.Tensor) -> torch.Tensor:
    """(N, N) float64 sums_j a_i[j] a_k[j] of the rows of ``a`` (N, numel), products exact in float64."""
    a = a.double()
    return a @ a.T


def scan_sums(x: torch.Tensor, cuts: list[tuple[float, int]], thresholds: tuple[float, ...]) -> dict:
    """Float64 sums over task vectors ``x`` (N, numel) float32, any device: ``scan_kernel.scan_sums``.

    cuts: per expert the trim's (v, cut) (``kernels.magnitude_cut``; ``keep_none()`` at density 0).
    Returns numpy float64 arrays l1, zeros, kept_l1 (N,), below (T, N) (entries with |x| under each
    threshold, compared in float32), gram, inter, sdot (N, N, symmetric), and numpy float64 scalars
    kept_any, kept_2plus, conflicts, agreement_sum (the per-entry |net sign| / max(kept count, 1) a
    float32 quotient, as there).
    """
    x = x.detach().reshape(x.shape[0], -1)
    magnitude = x.abs()
    kept, sign = _kept_and_signs(x, cuts)
    below = [(magnitude < float(t)).sum(1) for t in np.array(thresholds, np.float32)]
    per_expert = [magnitude.sum(1, dtype=torch.float64), (magnitude == 0).sum(1)]
    per_expert += [torch.mul(magnitude, kept).sum(1, dtype=torch.float64), *below]  # inf * 0 is NaN, as there
    pairs = torch.stack([_row_products(x), _row_products(kept), _row_products(sign)])
    count, net = kept.sum(0), sign.sum(0).abs()
    agreement = torch.div(net.float(), count.clamp(min=1).float()).sum(dtype=torch.float64)
    totals = [(count > 0).sum(), (count > 1).sum(), (net < count).sum(), agreement]
    per_expert, totals = torch.stack(per_expert).double(), torch.stack(totals).double()
    return sums_dict(*(t.cpu().numpy() for t in (per_expert, pairs, totals)))


def merge_distances(
    rows: list[torch.Tensor], minus: torch.Tensor, base: torch.Tensor, merged: torch.Tensor
) -> dict[str, np.ndarray]:
    """Float64 sums that place a merge among its inputs, any device: ``scan_kernel.merge_distances``.

    Task vector i is rows[i] - minus (float32 difference), N >= 1 rows each (numel,) float32; base, merged:
    (numel,) float32; moved = merged - base (float32). Returns numpy float64 arrays dist_sq (N,)
    ||x_i - moved||^2 and xb (N,) x_i . base, and Python floats moved_sq ||moved||^2, bb ||base||^2.
    """
    base64, moved = base.detach().double(), (merged - base).detach().double()
    dist_sq, xb = [], []
    for row in rows:
        x = (row - minus).detach().double()
        dist_sq.append(torch.sum((x - moved) ** 2))
        xb.append(torch.dot(x, base64))
    return {
        "dist_sq": torch.stack(dist_sq).cpu().numpy(),
        "xb": torch.stack(xb).cpu().numpy(),
        "moved_sq": float(torch.dot(moved, moved)),
        "bb": float(torch.dot(base64, base64)),
    }
