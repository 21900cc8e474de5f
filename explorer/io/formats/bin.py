"""PyTorch pickle checkpoints: ``pytorch_model.bin`` or shards listed in ``pytorch_model.bin.index.json``.

Loaded with ``torch.load(weights_only=True)``: its restricted unpickler builds only tensors and plain
containers and never runs code from the file; a file that needs more is refused with a message that
says how to convert it. Zip-format files are memory-mapped (``mmap=True``: tensor bytes are read when
touched); old non-zip files are read whole. One file's state dict is kept loaded at a time.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Optional

import torch
from typing_extensions import override

from explorer.io.formats.base import DTYPE_NAMES, Checkpoint, CheckpointError, read_json

BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"


def is_bin_dir(path: Path) -> bool:
    """True for a folder with config.json and pytorch_model.bin (or its shard index)."""
    return (path / "config.json").is_file() and ((path / BIN_INDEX).is_file() or (path / BIN_SINGLE).is_file())


def load_state_dict(file: Path) -> dict[str, torch.Tensor]:
    """{name: tensor} from a .bin file without executing code; CheckpointError saying what to do if refused."""
    try:
        try:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            state = torch.load(file, map_location="cpu", weights_only=True)  # pre-1.6 (non-zip) format
    except pickle.UnpicklingError as e:
        reason = str(e).strip().splitlines()[-1][:300]
        raise CheckpointError(
            f"{file}: not loaded: this pickle holds objects other than tensors, and unpickling them could run code "
            f"from the file ({reason}). If you trust its source, convert it once to safetensors in a separate "
            "environment (torch.load(..., weights_only=False), then safetensors.torch.save_file or "
            "save_pretrained(..., safe_serialization=True)) and merge the converted folder"
        ) from None
    except (RuntimeError, OSError, EOFError) as e:
        raise CheckpointError(
            f"{file}: not a readable PyTorch checkpoint ({str(e)[:200]}); re-download or re-save it"
        ) from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise CheckpointError(
            f"{file}: holds a {type(state).__name__} rather than a state dict {{name: tensor}}; save model.state_dict() instead"
        )
    return state


class PickleFile:
    """One loaded .bin state dict, with the read interface of ``SafetensorsFile`` (keys, shape, dtype, read)."""

    def __init__(self, path: Path):
        self.path, self.state = path, load_state_dict(path)

    def keys(self) -> list[str]:
        """Tensor names of the state dict, in stored order."""
        return list(self.state)

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of tensor ``name`` in the loaded state dict."""
        return tuple(self.state[name].shape)

    def dtype(self, name: str) -> str:
        """safetensors dtype name of tensor ``name`` (``F16``, ...)."""
        return DTYPE_NAMES[self.state[name].dtype]

    def read(self, name: str) -> torch.Tensor:
        """Tensor ``name`` of the state dict (loaded with weights_only=True: no code executed)."""
        return self.state[name]


class BinCheckpoint(Checkpoint):
    """A folder with config.json and .bin weights. Shapes and dtypes are indexed once at open."""

    def __init__(self, path: Path, config: dict):
        index = path / BIN_INDEX
        if index.is_file():
            self.format = "bin (sharded)"
            weight_map = read_json(index, "index").get("weight_map") or {}
            missing = sorted({f for f in weight_map.values() if not (path / f).is_file()})
            if missing or not weight_map:
                raise CheckpointError(
                    f"{path}: {BIN_INDEX} names shard(s) {missing or '(none)'} that are not there; copy them or fix the index"
                )
            files = {name: path / file for name, file in weight_map.items()}
            self._loaded: Optional[PickleFile] = None
        else:
            self.format = "bin"
            self._loaded = PickleFile(path / BIN_SINGLE)
            files = {name: self._loaded.path for name in self._loaded.keys()}
        super().__init__(path, config, files)
        self._meta: dict[str, tuple[tuple[int, ...], str]] = {}
        for file in dict.fromkeys(files.values()):
            loaded = self._file(file)
            for name in (n for n, f in files.items() if f == file):
                if name not in loaded.state:
                    raise CheckpointError(
                        f"{file}: has no tensor {name!r} although {BIN_INDEX} says so; fix the index or re-save the model"
                    )
                self._meta[name] = (loaded.shape(name), loaded.dtype(name))

    def _file(self, file: Path) -> PickleFile:
        if self._loaded is None or self._loaded.path != file:
            self._loaded = None  # drop the previous file's mapping before opening the next
            self._loaded = PickleFile(file)
        return self._loaded

    @override
    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self._meta:
            raise self._missing(name)
        return self._meta[name][0]

    @override
    def dtype(self, name: str) -> str:
        if name not in self._meta:
            raise self._missing(name)
        return self._meta[name][1]

    @override
    def get(self, name: str) -> torch.Tensor:
        if name not in self.files:
            raise self._missing(name)
        return self._file(self.files[name]).read(name)

    @override
    def close(self) -> None:
        self._loaded = None
