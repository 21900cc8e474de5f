"""Whole-model trimming (``trim_scope="model"``): one magnitude band per task vector, over all its tensors.

mergekit ranks |delta| within each tensor; the TIES paper (arXiv:2306.01708, reference code
``topk_values_mask`` on the flattened task vector) keeps the top ``density`` of the whole model. The
whole-model variant needs every tensor's magnitudes before the first tensor is merged, so it is a
pre-pass, ``model_bands``: the ``prepare`` hook of the magnitude-ranked variants (ties, breadcrumbs,
breadcrumbs_ties). It streams the task vectors once into a log-magnitude histogram per model (bounded
memory: 128 bins per octave over [2^-40, 2^24]) and returns, per model i, the band [low_i, high_i) with

    about int(gamma_i * total_i) entries of |d_i| >= high_i        (outliers, breadcrumbs; 0 for ties)
    about int((gamma_i + density_i) * total_i) entries >= low_i    (kept: low_i <= |d_i| < high_i)

A threshold is exact when its bin holds no other magnitude, otherwise interpolated log-linearly within
one bin (a relative magnitude error below 0.55%). Entries below 2^-40 (zeros included) share bin 0.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch

from explorer.choices import TrimScope, parse_choice
from explorer.methods.task_arithmetic import per_model_floats

_LOW, _HIGH, _PER_OCTAVE = -40, 24, 128  # log2 range and resolution of the histogram
_BINS = (_HIGH - _LOW) * _PER_OCTAVE


def model_bands(params: dict, items: Iterable[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The prepare hook: {"bands": (N, 2) float32 [low, high)} per model, or {} for trim_scope "tensor".

    params: the method's resolved params; reads trim_scope, density (N,) and gamma (N,) if present.
    items: (name, task vectors (N, *S)) for every tensor the method merges; iterated only for "model".
    Raises ValueError when ``items`` is empty or trim_scope is not a ``TrimScope`` value.
    """
    if parse_choice(TrimScope, params.get("trim_scope", TrimScope.tensor), "trim_scope") != TrimScope.model:
        return {}
    hist = magnitude_histograms(x for _, x in items)
    n, total = hist.shape[0], int(hist[0].sum())
    density, gamma = per_model_floats(params["density"], n), per_model_floats(params.get("gamma", 0.0), n)
    bands = []
    for i in range(n):
        top, keep = int(gamma[i] * total), int(density[i] * total)
        bands.append((count_threshold(hist[i], top + keep), count_threshold(hist[i], top)))
    return {"bands": torch.tensor(bands, dtype=torch.float32)}


def magnitude_histograms(stacks: Iterable[torch.Tensor]) -> torch.Tensor:
    """(N, bins) int64 counts of log2|x_i| over all given (N, *S) stacks; ValueError if there are none."""
    hist = None
    for x in stacks:
        counts = torch.stack([torch.bincount(_bin_index(row), minlength=_BINS) for row in x])
        hist = counts if hist is None else hist + counts
    if hist is None:
        raise ValueError("trim_scope='model' got no tensors to rank; check the model's tensor list")
    return hist


def _bin_index(t: torch.Tensor) -> torch.Tensor:
    """Flat int32 histogram bin of each |t| (one model's tensor at a time bounds the scratch memory)."""
    return ((t.reshape(-1).abs().log2() - _LOW) * _PER_OCTAVE).floor_().clamp_(0, _BINS - 1).to(torch.int32)


def count_threshold(hist: torch.Tensor, count: int) -> float:
    """Magnitude t with about ``count`` entries >= t, from one model's (bins,) histogram.

    count <= 0 gives inf (nothing kept above), count >= total gives 0 (everything kept).
    """
    if count <= 0:
        return math.inf
    above = hist.flip(0).cumsum(0).flip(0)  # above[b]: entries in bins >= b
    if count >= int(above[0]):
        return 0.0
    b = int((above >= count).nonzero().max())
    needed = count - (int(above[b + 1]) if b + 1 < _BINS else 0)
    fraction_below = 1 - needed / int(hist[b])
    return 2.0 ** (_LOW + (b + fraction_below) / _PER_OCTAVE)
