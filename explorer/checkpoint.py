"""Local Hugging Face checkpoints: discovery, a per-tensor index, a lazy reader, compatibility checks.

A checkpoint is a folder with ``config.json`` and either ``model.safetensors`` or a sharded
``model.safetensors.index.json``. Tensors are read one at a time through ``safe_open`` (memory-mapped),
so a merge never holds a whole model. Every refusal is a ``CheckpointError`` whose message names the
model folder, the tensor where there is one, and what to do.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

import torch
from safetensors import safe_open

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
TIED_NAMES = ("lm_head.weight",)


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or merged; the message says which file/tensor and the fix."""


@dataclass
class Checkpoint:
    """Index of one local checkpoint: tensor name -> file, plus its config. Reads lazily."""

    path: Path
    config: dict
    files: dict[str, Path]
    _handles: dict[Path, object] = field(default_factory=dict, repr=False)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def architecture(self) -> str:
        archs = self.config.get("architectures") or [self.config.get("model_type", "?")]
        return archs[0]

    @property
    def tied_embeddings(self) -> bool:
        return bool(self.config.get("tie_word_embeddings", False)) and "lm_head.weight" not in self.files

    def names(self) -> list[str]:
        """Tensor names in file order (stable across calls)."""
        return list(self.files)

    def _handle(self, name: str):
        if name not in self.files:
            raise CheckpointError(f"{self.path}: no tensor {name!r}; the checkpoint has {len(self.files)} tensors")
        file = self.files[name]
        if file not in self._handles:
            self._handles[file] = safe_open(str(file), framework="pt")
        return self._handles[file]

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of tensor ``name`` without reading its data."""
        return tuple(self._handle(name).get_slice(name).get_shape())

    def dtype(self, name: str) -> str:
        """safetensors dtype string of ``name`` (``F32``, ``F16``, ``BF16``, ...) without reading it."""
        return self._handle(name).get_slice(name).get_dtype()

    def get(self, name: str) -> torch.Tensor:
        """Tensor ``name`` as stored (its own dtype), read from disk now."""
        return self._handle(name).get_tensor(name)

    def close(self) -> None:
        self._handles.clear()


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Index the checkpoint folder ``path``; raise CheckpointError saying what is missing and how to fix it."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"{path}: folder not found; check the path (it must be a local checkpoint folder)")
    if not path.is_dir():
        raise CheckpointError(f"{path}: is a file; give the checkpoint folder that holds config.json")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{path}: no config.json; this is not a Hugging Face checkpoint folder")
    config = json.loads(config_file.read_text())
    return Checkpoint(path=path, config=config, files=_tensor_files(path))


def _tensor_files(path: Path) -> dict[str, Path]:
    """Map tensor name -> safetensors file; the index wins over a stray single file beside it."""
    index = path / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        missing = sorted({f for f in weight_map.values() if not (path / f).is_file()})
        if missing:
            raise CheckpointError(f"{path}: {INDEX_FILE} names shard(s) {missing} that are not there; copy them or fix the index")
        return {name: path / file for name, file in weight_map.items()}
    single = path / SINGLE_FILE
    if single.is_file():
        with safe_open(str(single), framework="pt") as f:
            return {name: single for name in f.keys()}
    raise CheckpointError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE}; save the model with save_pretrained(..., safe_serialization=True)")


def is_checkpoint(path: Path) -> bool:
    """True when ``path`` looks like a loadable checkpoint folder (config + safetensors weights)."""
    return (path / "config.json").is_file() and ((path / SINGLE_FILE).is_file() or (path / INDEX_FILE).is_file())


def discover(root: str | Path, max_depth: int = 3) -> list[Path]:
    """Checkpoint folders under ``root`` (itself included), sorted by path, searched ``max_depth`` deep."""
    root = Path(root).expanduser()
    found: list[Path] = []
    frontier = [root] if root.is_dir() else []
    for _ in range(max_depth + 1):
        found += [p for p in frontier if is_checkpoint(p)]
        frontier = [c for p in frontier if not is_checkpoint(p) for c in sorted(p.iterdir()) if c.is_dir() and not c.name.startswith(".")]
    return sorted(found)


def check_compatible(base: Optional[Checkpoint], models: Iterable[Checkpoint]) -> list[str]:
    """Raise CheckpointError on the first incompatibility between ``base`` and ``models``.

    Checks, in order: architecture, depth (num_hidden_layers), tensor names (ignoring a tied lm_head),
    and every tensor's shape. Returns the tensor names to merge, in the reference model's order.
    """
    models = list(models)
    reference = base or models[0]
    names = [n for n in reference.names() if not (n in TIED_NAMES and reference.tied_embeddings)]
    for other in models:
        if other is reference:
            continue
        _check_config(reference, other)
        _check_names(reference, other, names)
        for name in names:
            if reference.shape(name) != other.shape(name):
                raise CheckpointError(
                    f"{other.path}: tensor {name!r} has shape {list(other.shape(name))} but {reference.path} has "
                    f"{list(reference.shape(name))}; only models fine-tuned from the same base can be merged "
                    "(a different vocabulary size needs its embeddings aligned first)"
                )
    return names


def _check_config(reference: Checkpoint, other: Checkpoint) -> None:
    if reference.architecture != other.architecture:
        raise CheckpointError(
            f"{other.path}: architecture {other.architecture} differs from {reference.path} ({reference.architecture}); "
            "choose models of the same architecture, fine-tuned from the same base"
        )
    depth_ref, depth = reference.config.get("num_hidden_layers"), other.config.get("num_hidden_layers")
    if depth_ref != depth:
        raise CheckpointError(
            f"{other.path}: {depth} layers but {reference.path} has {depth_ref}; models of different depth cannot be merged"
        )


def _check_names(reference: Checkpoint, other: Checkpoint, names: list[str]) -> None:
    have = set(other.names())
    missing = [n for n in names if n not in have]
    if missing:
        raise CheckpointError(
            f"{other.path}: missing tensor {missing[0]!r} (and {len(missing) - 1} more) that {reference.path} has; "
            "both must come from the same architecture and base"
        )
    extra = sorted(have - set(names) - set(TIED_NAMES))
    if extra:
        raise CheckpointError(
            f"{other.path}: tensor {extra[0]!r} (and {len(extra) - 1} more) is not in {reference.path}; "
            "both must come from the same architecture and base"
        )
