"""Incremental re-merge: an in-memory session keeps each tensor's merge stages between merges.

A slider moves one parameter; the merge then recomputes only the stages downstream of it. For the
task-vector methods (``generalized_task_arithmetic``) the stages of a tensor are its task vectors
M_i - B, each task vector's trim (a threshold) or thinned copy, and the sign election with the
disjoint sum; each is stored with the key of the parameters it depends on (``Stages``). A lambda move
reuses the election and only rescales; a weight move reuses the trims; a density move redoes one
model's trim. The method code is the same as a merge from scratch, so results are equal bit for bit
(``tests/test_stage_cache.py`` checks every method and parameter).

Memory: up to (2N + 1) tensors of size S per tensor name, within a byte budget (default half the
memory free on the session's device (RAM or the GPU's) when it starts, or ``MERGE_EXPLORER_CACHE_GB``). When a merge would exceed
it, the least recently used tensors' stages are dropped first; nothing is ever swapped for the cache.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from typing import Callable, Hashable, Optional, TypeVar

import torch

from explorer.device import free_bytes
from explorer.methods.stages import Stages, Thin
from explorer.methods.weighted_sum import weighted_sum

T = TypeVar("T")


def default_budget(device: Optional[torch.device] = None) -> int:
    """Bytes the stage cache may hold: ``MERGE_EXPLORER_CACHE_GB`` GiB, else half the memory free on ``device``.

    That is the available RAM for the CPU, the GPU's free memory for a CUDA device (``device.free_bytes``); None is the CPU.
    """
    if os.environ.get("MERGE_EXPLORER_CACHE_GB"):
        return int(float(os.environ["MERGE_EXPLORER_CACHE_GB"]) * 2**30)
    return free_bytes(device or torch.device("cpu")) // 2


def _nbytes(value: object) -> int:
    """Bytes held by a cached value: a tensor's storage, else nothing worth counting."""
    return value.numel() * value.element_size() if isinstance(value, torch.Tensor) else 0


class CachedStages(Stages):
    """The stages of one tensor, kept between merges.

    task_vectors() reads its (N, *S) task vectors (kept once read); weights() lists the N model
    weights (*S) as the session holds them, and ``base`` (*S) is the base (None without one): never
    copied or kept here. A method that needs the task vectors only once (an unthinned weighted sum, a
    thinning) forms them from the weights and the base instead, so nothing of size N x S is stored for them.
    """

    def __init__(
        self, task_vectors: Callable[[], torch.Tensor], weights: list[torch.Tensor], base: Optional[torch.Tensor]
    ):
        self._read = task_vectors
        self._weights, self._base = weights, base
        self._x: Optional[torch.Tensor] = None
        self._rows: Optional[torch.Tensor] = None  # thinned task vectors
        self._row_keys: list[Hashable] = []
        self._row_states: list[Optional[torch.Tensor]] = []  # generator state after each row's thinning
        self._memo: dict[str, tuple[Hashable, object]] = {}

    @property
    def n(self) -> int:
        """Number of task vectors N."""
        return len(self._weights)

    @property
    def nbytes(self) -> int:
        """Bytes held: task vectors, thinned rows and memoized results."""
        held = [self._x, self._rows, *(v for _, v in self._memo.values())]
        return sum(_nbytes(v) for v in held if v is not None)

    def weights(self) -> list[torch.Tensor]:
        """The N model weights (*S), where the session holds them."""
        return self._weights

    def task_vectors(self) -> torch.Tensor:
        """(N, *S) task vectors, read once."""
        if self._x is None:
            self._x = self._read()
        return self._x

    def task_vector_sum(self, weights: torch.Tensor, scale: float) -> torch.Tensor:
        """As ``Stages.task_vector_sum``: from the kept task vectors, else from the weights and the base (same bits)."""
        if self._x is not None:
            return weighted_sum(weights, self._x, scale)
        return weighted_sum(weights, self._weights, scale, minus=self._base)

    def thinned(self, keys: list[Hashable], thin: Thin, generator: Optional[torch.Generator]) -> torch.Tensor:
        """As ``Stages.thinned``, reusing every row whose key is unchanged.

        A reused row sets the generator to where its thinning left it; any other row is formed again
        (M_i - B, from the kept task vectors if any) and thinned again.
        """
        if self._rows is None:
            self._rows = torch.empty(
                (self.n, *self._weights[0].shape), dtype=torch.float32, device=self._weights[0].device
            )
            self._row_keys, self._row_states = [None] * len(keys), [None] * len(keys)
        for i, key in enumerate(keys):
            if self._row_keys[i] == key:
                if self._row_states[i] is not None:
                    generator.set_state(self._row_states[i])
                continue
            self._row_keys[i] = None  # a failed thinning leaves no stale row behind
            if self._x is not None:
                self._rows[i].copy_(self._x[i])
            else:
                torch.sub(self._weights[i], self._base, out=self._rows[i])
            thin(i, self._rows[i])
            self._row_keys[i], self._row_states[i] = key, generator.get_state() if generator is not None else None
        return self._rows

    def memo(self, slot: str, key: Hashable, compute: Callable[[], T]) -> T:
        """As ``Stages.memo``; the last result of ``slot`` is reused while ``key`` is unchanged.

        Once the key changed, that result is handed to ``compute`` as ``stale`` (its memory reused:
        a slider move then allocates no new election buffer, saving its page faults).
        """
        if slot in self._memo and self._memo[slot][0] == key:
            return self._memo[slot][1]
        _, stale = self._memo.pop(slot, (None, None))
        value = compute(stale)
        self._memo[slot] = (key, value)
        return value


class StageCache:
    """Every tensor's ``CachedStages`` of a session, least recently used first, within ``budget`` bytes."""

    def __init__(self, budget: Optional[int] = None):
        self.budget = default_budget() if budget is None else budget
        self._stages: OrderedDict[str, CachedStages] = OrderedDict()
        self._sizes: dict[str, int] = {}  # bytes each tensor's stages held when last trimmed
        self._held = 0
        self._lock = threading.Lock()  # tensors are merged on several threads

    @property
    def nbytes(self) -> int:
        """Bytes held as of the last ``trim``."""
        return self._held

    def stages(
        self,
        name: str,
        task_vectors: Callable[[], torch.Tensor],
        weights: list[torch.Tensor],
        base: Optional[torch.Tensor],
    ) -> CachedStages:
        """The stages of tensor ``name``, made on first use (arguments as ``CachedStages``)."""
        with self._lock:
            if name not in self._stages:
                self._stages[name] = CachedStages(task_vectors, weights, base)
            self._stages.move_to_end(name)
            return self._stages[name]

    def trim(self, name: str) -> None:
        """Count what tensor ``name``'s stages hold now, then fit the budget.

        The least recently used tensors' stages are dropped first.
        """
        with self._lock:
            size = self._stages[name].nbytes if name in self._stages else 0
            self._held += size - self._sizes.get(name, 0)
            self._sizes[name] = size
            while self._held > self.budget and self._stages:
                dropped, _ = self._stages.popitem(last=False)
                self._held -= self._sizes.pop(dropped, 0)

    def clear(self) -> None:
        """Drop every stage (the next merge runs from scratch)."""
        with self._lock:
            self._stages.clear()
            self._sizes.clear()
            self._held = 0

    def describe(self) -> str:
        """One line for the app and ``explorer info``: what the cache holds and its budget."""
        return (
            f"stage cache {self.nbytes / 2**30:.2f} GiB of {self.budget / 2**30:.1f} GiB ({len(self._stages)} tensors)"
        )
