"""Sparsification of one task vector: which entries a task-vector method keeps, and how it rescales.

Conventions: ``delta`` is one task vector of any shape (*S), float32; ``density`` is the fraction of
entries kept, in [0, 1]. density >= 1 returns ``delta`` unchanged; density <= 0 returns zeros.
Formulas follow mergekit 0.1.5 ``mergekit/sparsify.py`` (magnitude: TIES, arXiv:2306.01708; random:
DARE, arXiv:2311.03099; magnitude_outliers: Model Breadcrumbs, arXiv:2312.06795; della_magprune:
DELLA, arXiv:2406.11617).
"""

from __future__ import annotations

from typing import Optional

import torch

from explorer.choices import Rescale, Sparsification, parse_choice
from explorer.methods.kernels import bernoulli_drop_, l1_norm
from explorer.methods.selection import MERGE_CHUNK, topk_mask

__all__ = [
    "Rescale",
    "Sparsification",
    "della_mask",
    "magnitude_count",
    "magnitude_mask",
    "outlier_mask",
    "random_drop",
    "sparsify",
]


def sparsify(
    delta: torch.Tensor,
    density: float,
    method: Sparsification,
    rescale: Rescale = Rescale.none,
    generator: Optional[torch.Generator] = None,
    gamma: float = 0.01,
    epsilon: float = 0.15,
    band: Optional[tuple[float, float]] = None,
    inplace: bool = False,
) -> torch.Tensor:
    """Return ``delta`` (*S) thinned to ``density`` by ``method`` and rescaled by ``rescale``.

    gamma (breadcrumbs): fraction of the largest |delta| also dropped, in [0, 1).
    epsilon (DELLA): keep probabilities span density +/- epsilon over magnitude ranks; raises ValueError
    unless 0 < density - epsilon and density + epsilon < 1.
    band: (low, high) magnitude thresholds from a whole-model pre-pass (``trim_scope="model"``, see
    ``explorer.methods.trim_scope``): keep low <= |delta| < high instead of ranking within this tensor.
    inplace: thin ``delta`` itself and return it (saves one tensor of size S).
    method and rescale: members or their values; another value raises ValueError.
    """
    method = parse_choice(Sparsification, method, "sparsify: method")
    rescale = parse_choice(Rescale, rescale, "sparsify: rescale")
    if method == Sparsification.none or density >= 1:
        return delta
    if density <= 0 or delta.numel() == 0:
        return delta.zero_() if inplace else torch.zeros_like(delta)
    measured = band is None and method in _MEASURING  # the drop returns the L1 norms before and after
    before = l1_norm(delta) if rescale == Rescale.l1 and not measured else None
    kept = delta if inplace else delta.clone()
    if band is not None:
        _apply(kept, (kept.abs() >= band[0]) & (kept.abs() < band[1]))
    else:
        norms = _DROPS[method](kept, density, generator, gamma, epsilon)
    if rescale == Rescale.inverse_density:
        return kept.div_(density)
    if rescale == Rescale.l1:
        before, after = norms if measured else (before, l1_norm(kept))
        if before < 1e-7 or after < 1e-7:
            return kept
        return kept.mul_(before / after)
    return kept


def magnitude_count(density: float, numel: int) -> int:
    """How many entries the magnitude trim keeps: 0 at density <= 0, numel at density >= 1, else max(1, int(density * numel)).

    The one definition of the TIES trim's size, used by ``magnitude_mask`` and the Inspect statistics.
    """
    if density <= 0:
        return 0
    return numel if density >= 1 else max(1, int(density * numel))


def magnitude_mask(delta: torch.Tensor, density: float, *_: object) -> torch.Tensor:
    """True on the ``magnitude_count(density, numel)`` largest |delta| entries, ties by flat index (``topk_mask``)."""
    return topk_mask(delta, magnitude_count(density, delta.numel()))


def outlier_mask(
    delta: torch.Tensor, density: float, _generator: object, gamma: float, _epsilon: float
) -> torch.Tensor:
    """Keep int(density * numel) entries just below the top int(gamma * numel) by |delta|.

    As mergekit's ascending-order slice [n - keep - top, n - keep) with the start clamped at 0: when
    keep + top > n the top shrinks to n - keep. Two ``topk_mask`` selections, no sort.
    """
    n = delta.numel()
    keep = int(density * n)
    top = min(int(gamma * n), n - keep)
    return topk_mask(delta, top + keep) & ~topk_mask(delta, top)


def della_mask(
    delta: torch.Tensor, density: float, generator: Optional[torch.Generator], _gamma: float, epsilon: float
) -> torch.Tensor:
    """Bernoulli mask whose keep probability grows linearly with |delta| rank within each row.

    Rows are the last dimension of a 2-D view (a 1-D tensor is one row); probabilities run from
    density - epsilon (smallest) to density + epsilon (largest). Ranks are computed a block of rows at
    a time (two argsorts hold 4 x 8 bytes per entry), so beyond the mask only the probabilities take
    tensor-sized memory; the one Bernoulli draw over all of them keeps mergekit's random stream.
    """
    if not (0 < density - epsilon and density + epsilon < 1):
        raise ValueError(
            f"DELLA needs 0 < density - epsilon and density + epsilon < 1; got density={density}, epsilon={epsilon}"
        )
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta.reshape(delta.shape[0], -1)
    probs = torch.empty(rows.shape)
    block = max(1, MERGE_CHUNK // rows.shape[1])
    for a in range(0, rows.shape[0], block):
        # ranked on the CPU: a GPU's sort orders tied magnitudes differently, and so would the masks
        probs[a : a + block] = rows[a : a + block].cpu().abs().argsort(dim=1).argsort(dim=1)
    span = (rows.shape[1] - 1) or 1
    probs.div_(span).mul_(2).mul_(epsilon).add_(density - epsilon)  # the order of mergekit's float ops
    # drawn on the CPU (the generator is a CPU one, as mergekit's stream), then moved to delta's device
    return torch.bernoulli(probs, generator=generator).reshape(delta.shape).to(delta.device)


def _apply(kept: torch.Tensor, mask: torch.Tensor) -> None:
    """Zero the entries of ``kept`` that ``mask`` drops.

    A bool mask fills +0 (``masked_fill_``: multiplying by a bool tensor would copy it to float); a float
    0/1 mask multiplies (dropped entries become x * 0).
    """
    if mask.dtype == torch.bool:
        kept.masked_fill_(mask.logical_not_(), 0)
    else:
        kept.mul_(mask)


def _masking(mask_fn):
    """The drop of a sparsification given by its mask function (a mask of the same shape as the delta)."""
    return lambda kept, density, generator, gamma, epsilon: _apply(
        kept, mask_fn(kept, density, generator, gamma, epsilon)
    )


def random_drop(
    kept: torch.Tensor, density: float, generator: Optional[torch.Generator], *_: object
) -> tuple[torch.Tensor, torch.Tensor]:
    """DARE: keep each entry of ``kept`` with probability density, in place, in one pass.

    Entries and draws equal ``kept.mul_(torch.bernoulli(torch.full_like(kept, density), generator=generator))``,
    mergekit's draw (``kernels.bernoulli_drop_``). Returns the L1 norms of ``kept`` before and after
    (0-dim float32), measured in the same pass: the l1 rescale needs no pass of its own.
    """
    return bernoulli_drop_(kept, density, generator)


# thin in place: drop(kept (*S), density, generator, gamma, epsilon) zeroes the entries a method drops;
# those in _MEASURING also return the L1 norms of kept before and after (0-dim float32 each)
_DROPS = {
    Sparsification.magnitude: _masking(magnitude_mask),
    Sparsification.random: random_drop,
    Sparsification.magnitude_outliers: _masking(outlier_mask),
    Sparsification.della_magprune: _masking(della_mask),
}
_MEASURING = (Sparsification.random,)
