"""How every tensor is read for a merge or a statistic: as float32, checked for NaN/inf."""

from __future__ import annotations

from typing import Optional

import torch

from explorer.io.formats.base import Checkpoint, CheckpointError, check_finite

__all__ = ["CheckpointError", "check_finite", "read_float", "read_stacked"]


def read_float(checkpoint: Checkpoint, name: str) -> torch.Tensor:
    """Tensor ``name`` as float32 (from F16, BF16, F32, dequantized GGUF, ...); non-float tensors as stored.

    The same as ``checkpoint[name]`` (``Checkpoint.__getitem__``). Raises CheckpointError naming model
    and tensor if it holds NaN or inf.
    """
    return checkpoint[name]


def read_stacked(checkpoints: list[Checkpoint], name: str) -> torch.Tensor:
    """Tensor ``name`` of every checkpoint stacked: (N, *S) float32 (non-float tensors: stored dtype).

    Each tensor is read and converted straight into its slot of the result, so reading holds the
    result plus one tensor as stored, not N float32 copies and then their stack. Raises CheckpointError
    naming model and tensor if one holds NaN or inf.
    """
    stacked: Optional[torch.Tensor] = None
    for i, checkpoint in enumerate(checkpoints):
        tensor = checkpoint.get(name)
        if i == 0 and not tensor.is_floating_point():
            return torch.stack([tensor] + [c.get(name) for c in checkpoints[1:]])
        if stacked is None:
            stacked = torch.empty((len(checkpoints), *tensor.shape), dtype=torch.float32)
        stacked[i].copy_(tensor)
        del tensor
        check_finite(checkpoint, name, stacked[i])
    return stacked
