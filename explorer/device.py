"""Where tensors are merged: a CUDA GPU when there is one with room, else RAM and the CPU.

An in-memory session holds its inputs (N + 1 models in float32) and merges them on the device they
are on: the merge kernels run compiled CPU code on CPU tensors and torch operations on CUDA ones
(``methods.kernels`` dispatches on the tensor's device), with the same results (``torch_kernels``,
tested on the CPU; float64 sums in another order and a GPU's own reductions, e.g. in slerp, may
differ in the last bits). ``choose_device`` picks the device and says why, in one line the app's
Models tab and ``python -m explorer info`` show. ``MERGE_EXPLORER_DEVICE`` (auto, cpu, cuda, cuda:N)
overrides the default choice.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import Iterable, Optional

import psutil
import torch

ENV = "MERGE_EXPLORER_DEVICE"
GiB = 2**30
SPARE_MODELS = 2  # room a session needs beyond its inputs, in models: a merge's output and the stages it forms
_NAMES = re.compile(r"auto|cpu|cuda(:\d+)?")


@dataclass(frozen=True)
class DeviceChoice:
    """The device tensors live on and, in words, why it was chosen."""

    device: torch.device
    reason: str

    def describe(self) -> str:
        """One line: "tensors on cuda:0 (...)" or "tensors in RAM (...)"."""
        where = "in RAM" if self.device.type == "cpu" else f"on {self.device}"
        return f"tensors {where} ({self.reason})"


def choose_device(needed_bytes: int, requested: Optional[str] = None, default: str = "auto") -> DeviceChoice:
    """The device for work that needs ``needed_bytes`` of memory there, and why.

    requested: "auto", "cpu", "cuda" or "cuda:N"; None takes ``MERGE_EXPLORER_DEVICE``, else ``default``.
    auto takes CUDA device 0 when torch sees one and its free memory holds ``needed_bytes``, else the
    CPU (also when the GPU cannot be queried: busy, exclusive or broken). An explicit "cuda" is taken
    as asked, but raises ValueError (with the fix) when torch sees no CUDA device or the index does not
    exist; any other value raises ValueError.
    """
    asked = (requested or os.environ.get(ENV) or default).strip().lower()
    if not _NAMES.fullmatch(asked):
        raise ValueError(f"device {asked!r} is not one of auto, cpu, cuda, cuda:N (set {ENV} or the device option)")
    if asked == "cpu":
        return DeviceChoice(torch.device("cpu"), "asked for")
    if not torch.cuda.is_available():
        if asked != "auto":
            raise ValueError(
                f"device {asked!r} asked for, but torch {torch.__version__} sees no CUDA device: "
                f"install a CUDA build of torch, or use device auto or cpu"
            )
        return DeviceChoice(torch.device("cpu"), f"torch {torch.__version__} sees no CUDA device")
    index = int(asked.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        raise ValueError(f"device {asked!r}: torch sees {torch.cuda.device_count()} CUDA device(s); choose cuda:0")
    try:
        free, _ = torch.cuda.mem_get_info(index)
        name = torch.cuda.get_device_name(index)
    except RuntimeError as e:  # a busy, exclusive-mode or broken GPU
        if asked != "auto":
            raise ValueError(f"device {asked!r} cannot be used ({e}); use device auto or cpu") from None
        return DeviceChoice(torch.device("cpu"), f"cuda:{index} cannot be queried ({e})")
    room = f"{name} has {free / GiB:.1f} GiB free, {needed_bytes / GiB:.1f} GiB needed"
    if asked == "auto" and needed_bytes > free:
        return DeviceChoice(torch.device("cpu"), room)
    return DeviceChoice(torch.device(f"cuda:{index}"), room if asked == "auto" else f"asked for; {room}")


def float32_bytes(shapes: Iterable[tuple[int, ...]]) -> int:
    """Bytes that tensors of ``shapes`` take in float32 (how a session and a merge hold them)."""
    return sum(4 * math.prod(shape) for shape in shapes)


def free_bytes(device: torch.device) -> int:
    """Bytes free on ``device`` now: CUDA's free memory, or the machine's available RAM for the CPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device.index or 0)[0]
    return psutil.virtual_memory().available
