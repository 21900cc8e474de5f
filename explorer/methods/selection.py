"""Exact magnitude selection: top-k masks from the threshold kernel, and the scan's work buffers.

``torch.topk`` over a tensor of S entries needs about 6.75 x its size in temporaries (its |x| copy,
values, int64 indices and internal buffers; measured on a 250 MiB embedding), and breaks ties at the
k-th value arbitrarily. Here the top k is a threshold (``kernels.magnitude_cut``: a radix select,
two passes, nothing tensor-sized) turned into a mask; ties are taken by flat index. The merge methods
(``sparsify.magnitude_mask``), pruning and the Inspect scan share that one definition.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from explorer.methods.kernels import magnitude_cut

# Entries per chunk in the merge kernels written in torch (DELLA's ranks): 8 MiB float32 temporaries.
MERGE_CHUNK = 1 << 21


class Workspace:
    """Grow-only work buffers reused across tensors.

    Fresh large allocations are slow on CPU (every page is faulted in again). ``get(key, *shape)`` is
    a view of the buffer ``key``.
    """

    def __init__(self) -> None:
        self._flat: dict[str, torch.Tensor] = {}

    def get(
        self, key: str, *shape: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        """A buffer of ``shape``, ``dtype`` and ``device`` kept under ``key``: reused while it is big enough, else reallocated."""
        size = math.prod(shape)
        held = self._flat.get(key)
        if held is None or held.numel() < size or held.device != torch.device(device):
            self._flat[key] = torch.empty(size, dtype=dtype, device=device)
        return self._flat[key][:size].view(shape)


def sorted_descending(values: torch.Tensor) -> torch.Tensor:
    """Each row of ``values`` (R, K) sorted descending (numpy's sort: several times torch's on CPU)."""
    return torch.from_numpy(np.ascontiguousarray(np.sort(values.numpy(), axis=1)[:, ::-1]))


def topk_mask(t: torch.Tensor, k: int) -> torch.Tensor:
    """(*S) bool mask: True on the k largest |t| entries of ``t`` (*S), False elsewhere; 0 <= k <= numel.

    Exact: every |t| above the k-th largest value v, then the entries equal to v in flat-index order
    until k are taken (``torch.topk`` breaks such ties arbitrarily; mergekit and PEFT use it, so
    results differ from theirs only where |t| has exact ties at v). Any float dtype (read as float32,
    which holds float16 and bfloat16 values exactly). Memory beyond ``t``: the mask (numel bytes)
    and, for a dtype other than float32, a float32 copy.
    """
    flat = t.reshape(-1).float()
    n = flat.numel()
    if k <= 0 or k >= n:
        return torch.full(t.shape, k >= n, dtype=torch.bool, device=t.device)
    v, cut = magnitude_cut(flat, k)
    mask = flat.abs() > v
    mask[:cut] |= flat[:cut].abs() == v
    return mask.reshape(t.shape)
