"""The NaN/inf check every tensor read for a merge goes through."""

from __future__ import annotations

import math

import torch

from explorer.formats.base import Checkpoint, CheckpointError


def check_finite(checkpoint: Checkpoint, name: str, tensor: torch.Tensor) -> None:
    """CheckpointError naming ``checkpoint`` and tensor ``name`` if ``tensor`` (any shape, float) holds
    NaN or inf (one aminmax pass: NaN propagates into min and max)."""
    if tensor.numel() and not all(math.isfinite(v.item()) for v in torch.aminmax(tensor)):
        bad = int((~torch.isfinite(tensor)).sum())
        raise CheckpointError(f"{checkpoint.path}: tensor {name!r} has {bad} NaN/inf values; this checkpoint is corrupt or diverged; re-export or drop it")
