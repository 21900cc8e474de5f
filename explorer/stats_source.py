"""Where the Inspect statistics read task vectors from, and how tensor names map to layers.

A *source* is anything with ``names`` (tensor names, in order) and ``task_vectors(name)`` returning the
(N, *S) float32 task vectors M_i - B of one tensor. ``MergeSession`` is one; ``DiskTaskVectors`` reads
checkpoints from disk one tensor name at a time (for models that do not fit in RAM);
``TensorTaskVectors`` wraps task vectors already in memory (tests, notebooks).

Optional attributes a source may have:
  ``labels``  expert names for tables and legends (default: the folder names of ``model_paths``);
  ``base``    mapping name -> base weights B (needed for distances of a merge from its inputs);
  ``models``  list of mappings name -> expert weights M_i; with ``base`` the statistics compute
              M_i - B chunk by chunk instead of materializing the (N, *S) stack (same numbers, faster).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Protocol

import torch

from explorer.checkpoint import Checkpoint, check_compatible, open_checkpoint
from explorer.finite import read_float

_BLOCK = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks)\.(\d+)\.")
_OUTSIDE_BLOCKS = (("embed", "embed"), ("wte", "embed"), ("wpe", "embed"), ("lm_head", "head"), ("norm", "norm"), ("ln_f", "norm"))
_RANK = {"embed": -1, "norm": 1 << 30, "head": (1 << 30) + 1}


def layer_of(name: str) -> str:
    """Layer label of tensor ``name``.

    The block index as a string ("0", "1", ...) for ``model.layers.{i}.`` (also ``h.{i}.``,
    ``layer.{i}.``, ``blocks.{i}.``), else "embed", "norm", "head" or "other" by the name's parts
    (``embed_tokens``/``wte`` -> embed, ``lm_head`` -> head, final ``norm``/``ln_f`` -> norm).
    """
    match = _BLOCK.search(name)
    if match:
        return match.group(1)
    return next((label for part, label in _OUTSIDE_BLOCKS if part in name), "other")


def layer_rank(label: str) -> int:
    """Sort key putting layer labels in model order: embed, 0, 1, ..., norm, head, other."""
    return int(label) if label.isdigit() else _RANK.get(label, (1 << 30) + 2)


class TaskVectorSource(Protocol):
    """What the statistics need: tensor names and their stacked task vectors (N, *S) float32."""

    names: Sequence[str]

    def task_vectors(self, name: str) -> torch.Tensor:
        """(N, *S) float32 task vectors M_i - B of tensor ``name``."""


def expert_labels(source: TaskVectorSource, n: int) -> list[str]:
    """``n`` distinct expert labels.

    ``source.labels``, else the folder names of ``source.model_paths`` (suffixed " (2)", " (3)" where
    they repeat), else "expert 0", "expert 1", ...

    Raises ValueError when the source's labels do not number ``n``.
    """
    labels = getattr(source, "labels", None)
    if labels is None:
        paths = getattr(source, "model_paths", None)
        labels = [Path(p).name for p in paths] if paths else [f"expert {i}" for i in range(n)]
    if len(labels) != n:
        raise ValueError(f"the source names {len(labels)} experts but its task vectors stack {n}")
    return _distinct(list(labels))


def _distinct(labels: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        out.append(label if seen[label] == 1 else f"{label} ({seen[label]})")
    return out


def lacks_base(source: TaskVectorSource) -> bool:
    """True for a source that holds weights (``models``) but no base: it has no task vectors."""
    return getattr(source, "models", None) is not None and getattr(source, "base", None) is None


class CheckpointTensors(Mapping):
    """Read-only mapping name -> float32 tensor, read from a checkpoint on disk at each lookup."""

    def __init__(self, checkpoint: Checkpoint, names: Sequence[str]):
        self.checkpoint, self._names = checkpoint, list(names)

    def __getitem__(self, name: str) -> torch.Tensor:
        return read_float(self.checkpoint, name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


class DiskTaskVectors:
    """Task vectors of checkpoints on disk, read one tensor name at a time (bounded memory).

    Peak memory is about (N + 1) x the largest tensor in float32 plus the statistics' work buffers.
    Raises CheckpointError (from ``check_compatible``) when the models do not share the base's
    architecture, tensor names or shapes.
    """

    def __init__(self, base: str | Path, models: Sequence[str | Path], labels: Sequence[str] | None = None):
        base_ckpt = open_checkpoint(base)
        model_ckpts = [open_checkpoint(m) for m in models]
        self.names = check_compatible(base_ckpt, model_ckpts)
        self.model_paths = [c.path for c in model_ckpts]
        self.labels = list(labels) if labels is not None else None
        self.base = CheckpointTensors(base_ckpt, self.names)
        self.models = [CheckpointTensors(c, self.names) for c in model_ckpts]

    def task_vectors(self, name: str) -> torch.Tensor:
        """(N, *S) float32 task vectors M_i - B of tensor ``name``, read from disk now."""
        return torch.stack([m[name] for m in self.models]) - self.base[name]


class TensorTaskVectors:
    """Task vectors already in memory.

    ``vectors`` maps name -> (N, *S) tensor; ``base`` (optional) maps name -> (*S) base weights,
    needed only for distances of a merge from its inputs.
    """

    def __init__(self, vectors: Mapping[str, torch.Tensor], labels: Sequence[str] | None = None, base: Mapping[str, torch.Tensor] | None = None):
        self.vectors, self.base = dict(vectors), base
        self.names = list(self.vectors)
        self.labels = list(labels) if labels is not None else None

    def task_vectors(self, name: str) -> torch.Tensor:
        """(N, *S) float32 task vectors of tensor ``name`` (KeyError if unknown)."""
        return self.vectors[name].float()
