"""Plain (not memory-mapped) reads and streaming writes of .safetensors files.

Format (https://github.com/huggingface/safetensors#format): 8 bytes little-endian header length N, N
bytes of JSON header {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}} that may
end in spaces, then the tensors' bytes; offsets are relative to the end of the header.

Why not ``safe_open``: it memory-maps the file, and every page a read touches stays counted in the
process's resident memory until the file is closed, so reading a whole model through open handles
shows the whole model in RSS. ``SafetensorsFile.read`` copies one tensor into a fresh buffer with
ordinary reads instead: a tensor's bytes are counted once, and only while the caller holds it.
``ShardWriter`` writes tensors as they come, after a reserved header that it fills in at the end, so
the writer holds no tensor either.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import torch

from explorer.io.formats.base import DTYPE_NAMES, DTYPES, CheckpointError

MAX_HEADER = 100 * 1024**2  # the safetensors library refuses larger headers
HEADER_RESERVE = 256 * 1024  # bytes kept for a written shard's header: room for ~2,000 tensor entries
_CHUNK = 1 << 30  # one read() call returns at most about 2 GiB on Linux


class SafetensorsFile:
    """Header of one .safetensors file and per-tensor reads of it (file is opened per read).

    The header is checked when the file is opened: a JSON object whose every tensor has a dtype torch
    holds, a shape, and data offsets that span exactly numel * itemsize bytes inside the file.
    """

    def __init__(self, path: Path):
        self.path = path
        try:
            with open(path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                if not 2 <= n <= MAX_HEADER:
                    raise ValueError(f"header length {n}")
                header = json.loads(f.read(n))
            if not isinstance(header, dict):
                raise ValueError(f"the header is a JSON {type(header).__name__}, not an object")
        except (OSError, ValueError) as e:
            raise CheckpointError(
                f"{path}: not a readable safetensors file ({type(e).__name__}: {e}); re-download or re-save it"
            ) from None
        header.pop("__metadata__", None)
        self.entries: dict[str, dict] = header
        self.data_start = 8 + n
        for name, entry in header.items():
            self._check_entry(name, entry)
        self._check_size()

    def _check_entry(self, name: str, entry) -> None:
        """CheckpointError naming the file and tensor when its header entry is malformed."""
        problem = entry_problem(entry)
        if problem:
            raise CheckpointError(
                f"{self.path}: tensor {name!r} has {problem} in the file's header; re-download or re-save the checkpoint"
            )

    def _check_size(self) -> None:
        """CheckpointError when a tensor's bytes lie past the end of the file (an incomplete download)."""
        if not self.entries:
            return
        last = max(self.entries, key=lambda name: self.entries[name]["data_offsets"][1])
        expected, size = self.data_start + self.entries[last]["data_offsets"][1], self.path.stat().st_size
        if size < expected:
            raise CheckpointError(
                f"{self.path}: file is truncated ({size} of {expected} bytes; tensor {last!r} ends past it); "
                "the download is incomplete, fetch the file again"
            )

    def keys(self) -> list[str]:
        """Tensor names in the file's header, in stored order."""
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of tensor ``name`` from the header (no data read)."""
        return tuple(self.entries[name]["shape"])

    def dtype(self, name: str) -> str:
        """safetensors dtype name of tensor ``name`` from the header (``F16``, ...)."""
        return self.entries[name]["dtype"]

    def read(self, name: str) -> torch.Tensor:
        """Tensor ``name`` in its stored dtype, in memory owned by the caller; CheckpointError if truncated."""
        entry = self.entries[name]
        begin, end = entry["data_offsets"]
        buffer = torch.empty(end - begin, dtype=torch.uint8)
        self._fill(name, buffer)
        return buffer.view(DTYPES[entry["dtype"]]).reshape(entry["shape"])

    def read_into(self, name: str, out: torch.Tensor) -> None:
        """Tensor ``name``'s bytes straight into ``out``: contiguous, its stored dtype and shape (one copy, no buffer).

        Raises ValueError when ``out`` is not that, CheckpointError if the file is truncated.
        """
        entry = self.entries[name]
        if out.dtype != DTYPES[entry["dtype"]] or tuple(out.shape) != tuple(entry["shape"]) or not out.is_contiguous():
            raise ValueError(
                f"read_into {name!r}: out must be a contiguous {entry['dtype']} tensor of shape {entry['shape']}"
            )
        self._fill(name, out.reshape(-1).view(torch.uint8))

    def _fill(self, name: str, buffer: torch.Tensor) -> None:
        """Read tensor ``name``'s bytes into ``buffer`` (uint8, exactly their length) with ordinary reads."""
        begin = self.entries[name]["data_offsets"][0]
        view, done = memoryview(buffer.numpy()), 0
        with open(self.path, "rb", buffering=0) as f:
            f.seek(self.data_start + begin)
            while done < len(view):
                got = f.readinto(view[done : done + _CHUNK])
                if not got:
                    raise CheckpointError(
                        f"{self.path}: file ends inside tensor {name!r}; the download is incomplete, fetch the file again"
                    )
                done += got


def entry_problem(entry) -> Optional[str]:
    """What is wrong with one tensor's header entry ({dtype, shape, data_offsets}), or None when it is sound."""
    if not isinstance(entry, dict):
        return f"an entry that is a JSON {type(entry).__name__}, not an object"
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in DTYPES:
        return f"dtype {dtype!r}, which torch cannot hold (save it as F16, BF16 or F32)"
    if not (isinstance(shape, list) and all(_is_count(d) for d in shape)):
        return f"shape {shape!r}, not a list of non-negative integers"
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
        return f"data_offsets {offsets!r}, not two non-negative integers"
    nbytes = math.prod(shape) * DTYPES[dtype].itemsize
    if offsets[1] - offsets[0] != nbytes:
        return f"data_offsets {offsets} spanning {offsets[1] - offsets[0]} bytes, but {dtype} {shape} takes {nbytes}"
    return None


def _is_count(value) -> bool:
    return type(value) is int and value >= 0


class ShardWriter:
    """Write one .safetensors file tensor by tensor; call ``fits`` before ``add``, ``close`` at the end."""

    def __init__(self, path: Path, reserve: int = HEADER_RESERVE):
        self.path, self.reserve = path, reserve
        self.entries: dict[str, dict] = {}
        self.size = 0  # data bytes written
        self._header_bytes = len(json.dumps({"__metadata__": {"format": "pt"}})) + 16
        self._file = open(path, "wb")
        self._file.seek(8 + reserve)

    def fits(self, name: str, tensor: torch.Tensor, max_bytes: int) -> bool:
        """True when ``tensor`` fits this shard's byte cap and header room (an empty shard takes anything)."""
        nbytes = tensor.numel() * tensor.element_size()
        return not self.entries or (
            self.size + nbytes <= max_bytes and self._header_bytes + self._entry_bytes(name, tensor) <= self.reserve
        )

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Append ``tensor``'s bytes to the file now (the caller may drop it afterwards)."""
        flat = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
        self._file.write(memoryview(flat.numpy()))
        nbytes = flat.numel()
        self._header_bytes += self._entry_bytes(name, tensor)
        self.entries[name] = {
            "dtype": DTYPE_NAMES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [self.size, self.size + nbytes],
        }
        self.size += nbytes

    def close(self) -> None:
        """Write the header into the reserved room (padded with spaces, as the format allows) and close."""
        header = json.dumps({"__metadata__": {"format": "pt"}, **self.entries}, separators=(",", ":")).encode()
        self._file.seek(0)
        self._file.write(self.reserve.to_bytes(8, "little") + header + b" " * (self.reserve - len(header)))
        self._file.close()

    def abort(self) -> None:
        """Close the file after a failed write, without a header (the writer then removes its folder)."""
        self._file.close()

    def _entry_bytes(self, name: str, tensor: torch.Tensor) -> int:
        """Upper bound of the header bytes of one entry (offsets counted at 20 digits each)."""
        return len(json.dumps(name)) + len(json.dumps(list(tensor.shape))) + 90
