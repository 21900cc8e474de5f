"""How this process allocates merge-sized memory: huge pages, and freed memory kept for the next merge.

A slider move allocates a new merge (540 MB for SmolLM2-135M in float32) right after the previous
one was freed. By default glibc hands every block over its mmap threshold back to the kernel on free,
so each merge pays the page faults of fresh memory again; and torch backs large tensors with 4 KiB
pages unless told otherwise. ``tune`` (run when ``explorer`` is imported) sets:

* torch's ``THP_MEM_ALLOC_ENABLE=1``: tensors of 2 MiB and more on transparent huge pages (read by
  torch at its first large allocation; an existing value is kept, 0 opts out);
* glibc's mmap threshold to its largest value (32 MiB) and its trim threshold to 1 GiB
  (``mallopt``), so blocks up to 32 MiB are reused from the heap instead of being unmapped and faulted in
  again: up to 1 GiB of freed memory stays with the process;
* glibc's arena count to one (``M_ARENA_MAX``), for threads that have not allocated yet: the merge
  workers' blocks then come from that heap too. A thread's own arena lives in 64 MiB heaps that glibc
  unmaps as soon as one is empty, whatever the trim threshold, so without this a worker's freed merge
  was faulted in again on the next slider move.

Skipped when any ``MALLOC_*`` variable is set (the user's own tuning) or when the C library is not glibc.

Measured on SmolLM2-135M with 3 experts (2 cores, side by side): a TIES merge from scratch 1.9 s ->
1.3 s with huge pages; with the heap kept as well, a TIES weight move 0.48-0.51 s -> 0.43-0.44 s, a
lambda move 0.22-0.23 s -> 0.17-0.19 s, and TIES from scratch 1.59 s -> 1.28-1.31 s. One arena on top
(2026-12-01, medians of runs alternated twice): TIES from scratch 1.42-1.59 s -> 0.92 s, a weight move
0.39 s -> 0.34-0.35 s, a lambda move 0.15 s -> 0.13 s, a density move 0.52-0.56 s -> 0.49 s, and the
session's peak RSS 6.5-6.6 -> 5.7 GiB; the CLI's TIES merge to disk 6.43-6.45 s -> 6.59-6.60 s (one
lock for the reader, merge and writer threads), peak RSS unchanged (1.12 GB).
"""

from __future__ import annotations

import ctypes
import os

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8  # glibc's mallopt parameters
MMAP_THRESHOLD = 32 * 2**20  # glibc's largest on 64-bit (HEAP_MAX_SIZE / 2)
TRIM_THRESHOLD = 2**30


def tune() -> bool:
    """Set the allocators as the module says; True when glibc's thresholds were set."""
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    if any(k.startswith("MALLOC_") for k in os.environ):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    mallopt = getattr(libc, "mallopt", None)
    settings = ((M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD), (M_ARENA_MAX, 1))
    return bool(mallopt) and all(mallopt(param, value) for param, value in settings)
