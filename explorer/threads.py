"""Torch's CPU threads for the calling thread only: each merge worker runs on its share of the cores.

``torch.set_num_threads`` is process-wide, and threads started later take its value too. With torch's
OpenMP backend (the default CPU build), a thread's team size is OpenMP's per-thread setting, which
``omp_set_num_threads`` changes for the calling thread alone: torch's CPU ops and the merge kernels
(``kernels.run_ranges`` splits work by ``torch.get_num_threads()``) then use that many threads there.
Two merge workers of one thread each beat two of two threads on a 2-core machine: a TIES merge of
SmolLM2-135M takes 1.0 s instead of 1.5 s (bench/remerge_bench.py).
"""

from __future__ import annotations

import ctypes
from functools import lru_cache
from pathlib import Path
from typing import Optional

import torch


@lru_cache(maxsize=1)
def _openmp() -> Optional[ctypes.CDLL]:
    """The OpenMP runtime torch uses: the libgomp/libiomp in torch's own lib folder, else the only one loaded.

    Other packages bring their own copies (sentencepiece ships a libgomp), whose setting torch ignores.
    None where it cannot be told (several loaded outside torch's folder, or no /proc: not Linux).
    """
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "libgomp" in line or "libiomp" in line}
    except OSError:
        return None
    own = [p for p in paths if Path(p).parent == Path(torch.__file__).parent / "lib"]
    chosen = own or (list(paths) if len(paths) == 1 else [])
    return ctypes.CDLL(chosen[0]) if chosen else None


def use_threads(n: int) -> bool:
    """Run the calling thread's torch CPU ops on ``n`` >= 1 threads; other threads keep theirs.

    Returns False, changing nothing, where torch's OpenMP runtime is not found or torch does not
    follow it (another parallel backend): the work then runs with torch's process-wide setting.
    """
    torch.get_num_threads()  # torch sets each thread up on first use; that setup would undo the line below
    openmp = _openmp()
    if openmp is None:
        return False
    openmp.omp_set_num_threads(max(1, n))
    return torch.get_num_threads() == max(1, n)
