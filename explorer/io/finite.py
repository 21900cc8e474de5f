"""How every tensor is read for a merge or a statistic: as float32, checked for NaN/inf."""

from __future__ import annotations

import torch

from explorer.io.formats.base import Checkpoint, CheckpointError, check_finite, is_float_dtype

__all__ = ["CheckpointError", "check_finite", "read_float", "read_stacked"]


def read_float(checkpoint: Checkpoint, name: str) -> torch.Tensor:
    """Tensor ``name`` as float32 (from F16, BF16, F32, dequantized GGUF, ...); non-float tensors as stored.

    The same as ``checkpoint[name]`` (``Checkpoint.__getitem__``). Raises CheckpointError naming model
    and tensor if it holds NaN or inf.
    """
    return checkpoint[name]


def read_stacked(checkpoints: list[Checkpoint], name: str) -> torch.Tensor:
    """Tensor ``name`` of every checkpoint stacked: (N, *S) float32 (non-float tensors: stored dtype).

    Each tensor is read and converted straight into its slot of the result (``Checkpoint.read_into``:
    an F32 safetensors tensor with no buffer in between), so reading holds the result plus at most one
    tensor as stored, not N float32 copies and then their stack. Raises CheckpointError
    naming model and tensor if one holds NaN or inf.
    """
    first = checkpoints[0]
    if not is_float_dtype(first.dtype(name)):
        return torch.stack([c.get(name) for c in checkpoints])
    stacked = torch.empty((len(checkpoints), *first.shape(name)), dtype=torch.float32)
    for i, checkpoint in enumerate(checkpoints):
        checkpoint.read_into(name, stacked[i])
        check_finite(checkpoint, name, stacked[i])
    return stacked
