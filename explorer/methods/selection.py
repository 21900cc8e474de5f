"""Exact magnitude selection in bounded memory: the k-th largest |x| and top-k masks, without a sort.

``torch.topk`` over a tensor of S entries needs about 6.75 x its size in temporaries (its |x| copy,
values, int64 indices and internal buffers; measured on a 250 MiB embedding), which made the TIES trim
the memory peak of a streaming merge. Here selection works on column chunks: a uniform sample brackets
the k-th largest |x| (Floyd-Rivest), one pass collects the few percent of entries inside the bracket,
and a kthvalue over those gives the exact answer. The merge methods (``sparsify.magnitude_mask``) and
the Inspect scan (``stats_scan``) share it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import numpy as np
import torch

DEFAULT_CHUNK = 1 << 18  # entries per row per work chunk (1 MiB float32: chunks stay in cache)
SAMPLE = 4096  # sampled entries that bracket the k-th largest in ``topk_mask``
# Entries per chunk in the merge kernels: 8 MiB float32 temporaries, and few ops per tensor (every op
# is a parallel region; thousands of small ones stall when another process shares the cores).
MERGE_CHUNK = 1 << 21


class Workspace:
    """Grow-only work buffers reused across chunks and tensors.

    Fresh large allocations are slow on CPU (every page is faulted in again). ``get(key, *shape)`` is
    a view of the buffer ``key``.
    """

    def __init__(self) -> None:
        self._flat: dict[str, torch.Tensor] = {}

    def get(self, key: str, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A buffer of ``shape`` and ``dtype`` kept under ``key``: reused while it is big enough, else reallocated."""
        size = math.prod(shape)
        if key not in self._flat or self._flat[key].numel() < size:
            self._flat[key] = torch.empty(size, dtype=dtype)
        return self._flat[key][:size].view(shape)


ChunkReader = Callable[[int, int], torch.Tensor]  # (a, b) -> task vectors (N, b - a) of columns [a, b)


def chunks(numel: int, chunk: int) -> Iterator[tuple[int, int]]:
    """Consecutive [a, b) ranges of at most ``chunk`` entries covering range(numel)."""
    for a in range(0, numel, chunk):
        yield a, min(a + chunk, numel)


def kth_largest(
    read: ChunkReader,
    numel: int,
    k: int,
    ranked: torch.Tensor,
    chunk: int = DEFAULT_CHUNK,
    work: Workspace | None = None,
) -> torch.Tensor:
    """(N,) exact k-th largest |value| in each row of an (N, numel) matrix, for 1 <= k <= numel.

    ``read(a, b)`` returns the matrix's columns [a, b) (it may reuse a buffer); ``ranked`` (N, s):
    uniform samples of each row's |values|, sorted descending. Floyd-Rivest selection: the sample
    brackets the answer within +/- (3 binomial standard deviations + 2) ranks; one pass over column
    chunks counts entries above the bracket and collects those inside it (a few percent); the answer
    is a kthvalue over those. A row whose bracket misses (rare) falls back to kthvalue over the row.
    """
    return top_cutoff(read, numel, k, ranked, chunk, work)[0]


def top_cutoff(
    read: ChunkReader,
    numel: int,
    k: int,
    ranked: torch.Tensor,
    chunk: int = DEFAULT_CHUNK,
    work: Workspace | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(kth, ties): the top-k selection of each row of an (N, numel) matrix, for 1 <= k <= numel.

    kth (N,) float32: the exact k-th largest |value| (as ``kth_largest``); ties (N,) int64: how many
    entries equal to kth the top k take, k - #(|value| > kth), >= 1. ``mark_top`` turns these into
    the mask chunk by chunk; arguments as ``kth_largest``.
    """
    work = work or Workspace()
    n_rows, s = ranked.shape
    share = k / numel
    spread = 3 * math.sqrt(s * share * (1 - share)) + 2
    top, bottom = math.floor(share * s - spread), math.ceil(share * s + spread)
    hi = (ranked[:, top] if top >= 0 else torch.full((n_rows,), math.inf))[:, None]
    lo = (ranked[:, bottom] if bottom < s else torch.zeros(n_rows))[:, None]
    above = torch.zeros(n_rows, dtype=torch.float64)
    # Candidates go into one buffer per row sized for the expected bracket: appending many small
    # tensors instead fragments the heap (measured: RSS grew by the chunk size per chunk).
    inside = [_Buffer(min(numel, math.ceil(1.5 * numel * (bottom - top + 1) / s) + chunk)) for _ in range(n_rows)]
    for a, b in chunks(numel, chunk):
        ax = torch.abs(read(a, b), out=work.get("abs", n_rows, b - a))
        above += torch.gt(ax, hi, out=work.get("tmp", n_rows, b - a)).sum(1)
        clamped = torch.clamp(ax, lo, hi, out=work.get("tmp", n_rows, b - a))
        keep = torch.eq(clamped, ax, out=work.get("keep", n_rows, b - a, dtype=torch.bool))  # lo <= |x| <= hi
        for row, kept in zip(inside, ax[keep].split(keep.sum(1).tolist()), strict=True):
            row.append(kept)
    out, ties = torch.empty(n_rows), torch.empty(n_rows, dtype=torch.long)
    for i, row in enumerate(inside):
        candidates, rank = row.values(), k - int(above[i])
        if 1 <= rank <= candidates.numel():
            out[i] = torch.kthvalue(candidates, candidates.numel() - rank + 1).values
            ties[i] = rank - int(torch.count_nonzero(candidates > out[i]))
        else:
            whole = torch.cat([read(a, b)[i].abs() for a, b in chunks(numel, chunk)])
            out[i] = torch.kthvalue(whole, numel - k + 1).values
            ties[i] = k - int(torch.count_nonzero(whole > out[i]))
    return out, ties


def mark_top(magnitude: torch.Tensor, kth: torch.Tensor, ties: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Mark one column chunk of a top-k selection; chunks must come in column order.

    magnitude (N, c): |values| of columns [a, b); kth (N, 1) and ties (N,) from ``top_cutoff``. Marks
    ``out`` (N, c) bool (or float 0/1) where |value| > kth, and where |value| == kth for the first
    ``ties`` such entries by column, counting down ``ties`` in place (so the next chunk continues).
    This is the one definition of which entries a top-k keeps (``topk_mask``, the Inspect scan).
    """
    torch.gt(magnitude, kth, out=out)
    tied = magnitude == kth
    if bool(ties.any()) and bool(tied.any()):
        take = tied.logical_and_(tied.cumsum(1) <= ties[:, None])
        out.logical_or_(take) if out.dtype == torch.bool else out.add_(take)
        ties.sub_(take.sum(1))
    return out


class _Buffer:
    """A float32 vector filled by appending, grown (doubled) only when full."""

    def __init__(self, capacity: int) -> None:
        self._data, self._used = torch.empty(capacity), 0

    def append(self, values: torch.Tensor) -> None:
        end = self._used + values.numel()
        if end > self._data.numel():
            grown = torch.empty(max(end, 2 * self._data.numel()))
            grown[: self._used] = self._data[: self._used]
            self._data = grown
        self._data[self._used : end] = values
        self._used = end

    def values(self) -> torch.Tensor:
        return self._data[: self._used]


def sorted_descending(values: torch.Tensor) -> torch.Tensor:
    """Each row of ``values`` (R, K) sorted descending (numpy's sort: several times torch's on CPU)."""
    return torch.from_numpy(np.ascontiguousarray(np.sort(values.numpy(), axis=1)[:, ::-1]))


def topk_mask(t: torch.Tensor, k: int, chunk: int = MERGE_CHUNK) -> torch.Tensor:
    """(*S) bool mask: True on the k largest |t| entries of ``t`` (*S), False elsewhere; 0 <= k <= numel.

    Exact: ``top_cutoff`` finds the k-th largest |t| v from a seeded sample (the sample only sets the
    speed) and how many entries tied with v belong to the top k; one chunked pass (``mark_top``) marks
    |t| > v and the first of the tied entries by flat index (``torch.topk`` breaks such ties
    arbitrarily; mergekit and PEFT use it, so results differ from theirs only where |t| has exact ties
    at v). Memory beyond ``t``: the mask (numel bytes) plus a few percent of ``t``, against about
    6.75 x ``t`` for topk.
    """
    flat = t.reshape(-1)
    n = flat.numel()
    mask = torch.zeros(n, dtype=torch.bool)
    if k <= 0 or k >= n:
        return mask.fill_(k >= n).reshape(t.shape)
    picks = torch.randint(n, (min(SAMPLE, n),), generator=torch.Generator().manual_seed(0))
    ranked = sorted_descending(flat[picks].abs().float()[None])
    kth, ties = top_cutoff(lambda a, b: flat[a:b].float().view(1, -1), n, k, ranked, chunk)
    for a, b in chunks(n, chunk):
        mark_top(flat[a:b].abs().view(1, -1), kth[:, None], ties, mask[a:b].view(1, -1))
    return mask.reshape(t.shape)
