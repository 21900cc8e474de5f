"""Hugging Face checkpoint folders with safetensors weights: ``model.safetensors`` or sharded + index.

When ``model.safetensors.index.json`` is present it decides which files hold which tensors; any other
.safetensors file beside it (a stray single file, a leftover shard) is ignored.
"""

from __future__ import annotations

from pathlib import Path

import torch
from typing_extensions import override

from explorer.io.formats.base import DTYPES, Checkpoint, CheckpointError, read_json
from explorer.io.formats.safetensors_io import SafetensorsFile

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def is_safetensors_dir(path: Path) -> bool:
    """True for a folder with config.json and model.safetensors (or its shard index)."""
    return (path / "config.json").is_file() and ((path / INDEX_FILE).is_file() or (path / SINGLE_FILE).is_file())


class SafetensorsCheckpoint(Checkpoint):
    """A folder with config.json and safetensors weights; tensors are read one at a time (no mmap)."""

    def __init__(self, path: Path, config: dict):
        index = path / INDEX_FILE
        if index.is_file():
            self.format = "safetensors (sharded)"
            weight_map = read_json(index, "index").get("weight_map") or {}
            if not weight_map:
                raise CheckpointError(f"{index}: has no weight_map; re-save the model with save_pretrained")
            missing = sorted({f for f in weight_map.values() if not (path / f).is_file()})
            if missing:
                raise CheckpointError(
                    f"{path}: {INDEX_FILE} names shard(s) {missing} that are not there; copy them or fix the index"
                )
            self._shards = {path / file: SafetensorsFile(path / file) for file in sorted(set(weight_map.values()))}
            files = {name: path / file for name, file in weight_map.items()}
            for name, file in weight_map.items():
                if name not in self._shards[path / file].entries:
                    raise CheckpointError(
                        f"{path / file}: has no tensor {name!r} although {INDEX_FILE} says so; fix the index or re-save the model"
                    )
        else:
            self.format = "safetensors"
            single = SafetensorsFile(path / SINGLE_FILE)
            self._shards = {single.path: single}
            files = {name: single.path for name in single.keys()}
        super().__init__(path, config, files)

    def _file(self, name: str) -> SafetensorsFile:
        if name not in self.files:
            raise self._missing(name)
        return self._shards[self.files[name]]

    @override
    def shape(self, name: str) -> tuple[int, ...]:
        return self._file(name).shape(name)

    @override
    def dtype(self, name: str) -> str:
        return self._file(name).dtype(name)

    @override
    def get(self, name: str) -> torch.Tensor:
        return self._file(name).read(name)

    @override
    def read_into(self, name: str, out: torch.Tensor) -> None:
        file = self._file(name)
        if DTYPES[file.dtype(name)] == out.dtype and out.is_contiguous():
            file.read_into(name, out)
        else:
            out.copy_(file.read(name))
