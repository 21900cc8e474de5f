"""The stages of one tensor's task-vector merge, as the method asks for them: computed, or reused.

``generalized_task_arithmetic`` gets its inputs through a ``Stages``: the task vectors, the task
vectors thinned row by row, and named intermediate results (``memo``), each with the key of the
parameters it depends on. This class computes everything from the ``x`` it wraps, once: a merge from
scratch. ``explorer.stage_cache.CachedStages`` keeps the results between merges of an in-memory
session and recomputes only those whose key changed. Both run the same method code, so a re-merge
is equal bit for bit to a merge from scratch.
"""

from __future__ import annotations

from typing import Callable, Hashable, Optional, Sequence, TypeVar

import torch

from explorer.methods.weighted_sum import weighted_sum

T = TypeVar("T")
Thin = Callable[[int, torch.Tensor], None]  # thin(i, row): thin task vector i (*S) in place


class Stages:
    """One merge of one tensor from the method's input ``x`` (N, *S) float32, which it may overwrite.

    ``x`` holds task vectors for a delta-space method, model weights for the others.
    """

    def __init__(self, x: torch.Tensor):
        self._x = x

    @property
    def n(self) -> int:
        """Number of task vectors N."""
        return self._x.shape[0]

    def task_vectors(self) -> torch.Tensor:
        """(N, *S) task vectors M_i - B; read them, never write them."""
        return self._x

    def weights(self) -> Sequence[torch.Tensor]:
        """The N model weights (*S) of a weight-space method; read them, never write them."""
        return self._x

    def task_vector_sum(self, weights: torch.Tensor, scale: float) -> torch.Tensor:
        """scale * sum_i weights[i] (M_i - B): a new (*S) tensor (``weighted_sum`` of the task vectors)."""
        return weighted_sum(weights, self._x, scale)

    def thinned(self, keys: list[Hashable], thin: Thin, generator: Optional[torch.Generator]) -> torch.Tensor:
        """(N, *S) task vectors, row i thinned by ``thin(i, row)``, rows in order.

        A random thinning draws from ``generator`` where the previous row left it. keys[i]: what row
        i's thinning depends on (a cache reuses the row while it is unchanged). Here: thins ``x`` in place.
        """
        for i in range(self.n):
            thin(i, self._x[i])
        return self._x

    def memo(self, slot: str, key: Hashable, compute: Callable[[Optional[T]], T]) -> T:
        """compute(stale): the result named ``slot``, which depends on ``key`` only.

        A cache reuses it while ``key`` is unchanged; here it is computed now. Callers never modify it.
        stale: the slot's previous result once its key changed (a buffer compute may overwrite and
        return instead of allocating), else None; here always None.
        """
        return compute(None)
