"""Delta and interference statistics for the Inspect view, as pandas DataFrames.

Usage: ``s = scan(source, density, merged)`` reads every tensor once (see ``stats_scan``); the table
functions below and in ``stats_interference`` then only reshape what it measured:

  delta_summary, layer_norms, layer_stats   exact norms, sparsity, shares below thresholds, kept mass
  delta_quantiles, histogram, dare_effect   from the per-tensor samples (sampled; exact when every
                                            tensor was small enough to take whole)
  kept_mass                                 L1 share kept by the trim vs density (sampled curve,
                                            exact point at the scan's density)
  cosine_similarity, jaccard, sign_conflict, sign_agreement, merge_distance   exact

Every table's ``attrs`` say how it was computed (``exact``, ``sample_size``, ``samples``, ``how``).
Task vectors are x_i = M_i - B (N experts, float32). Papers: TIES (trim, sign election)
arXiv:2306.01708; DARE (the 0.005 / 0.002 thresholds, drop and rescale) arXiv:2311.03099.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from explorer.choices import Rescale, Sparsification
from explorer.inspect.interference import (
    cosine_similarity,
    jaccard,
    merge_distance,
    pair_label,
    sign_agreement,
    sign_conflict,
)
from explorer.inspect.scan import (
    BY,
    DEFAULT_SAMPLE,
    DENSITY_GRID,
    Scan,
    below_column,
    grid_shares,
    grouped_sum,
    scan,
    with_attrs,
)
from explorer.inspect.sources import (
    DiskTaskVectors,
    TaskVectorSource,
    TensorTaskVectors,
    expert_labels,
    lacks_base,
    layer_of,
    layer_rank,
)
from explorer.methods.sparsify import sparsify
from explorer.progress import Progress
from explorer.registry import tensor_generator

__all__ = [
    "BY",
    "DARE_THRESHOLDS",
    "PANEL_KEYS",
    "DEFAULT_BINS",
    "DEFAULT_SAMPLE",
    "DENSITY_GRID",
    "QUANTILES",
    "DiskTaskVectors",
    "Scan",
    "TaskVectorSource",
    "TensorTaskVectors",
    "cosine_similarity",
    "dare_effect",
    "delta_quantiles",
    "delta_summary",
    "expert_labels",
    "grid_shares",
    "histogram",
    "inspect_tables",
    "merge_distance_table",
    "jaccard",
    "kept_mass",
    "lacks_base",
    "layer_norms",
    "layer_of",
    "layer_rank",
    "layer_stats",
    "merge_distance",
    "pair_label",
    "scan",
    "sign_agreement",
    "sign_conflict",
    "weighted_histogram",
    "weighted_quantiles",
]

DARE_THRESHOLDS = (0.005, 0.002)  # DARE: fine-tuning deltas mostly lie within these magnitudes
QUANTILES = (0.001, 0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99, 0.999)
DEFAULT_BINS = 101  # odd, so that 0 is the centre of a bin


def delta_summary(scan: Scan, by: str = "layer") -> pd.DataFrame:
    """Exact per-(group, expert) task-vector statistics; ``by`` is "tensor", "layer" or "model".

    Columns: numel; l2 = ||x||_2; mean_abs = ||x||_1 / numel; sparsity = share of exact zeros;
    share_below_{t:g} = share of entries with |x| < t for each scan threshold; kept_share = share kept
    by the magnitude trim at the scan's density (TIES); kept_mass = L1 share of the kept entries.
    Shares are in [0, 1]; kept_mass is NaN for an all-zero task vector.
    """
    below = [below_column(t) for t in scan.thresholds]
    out = grouped_sum(scan.experts, by, ["expert"], ["numel", "sumsq", "l1", "zeros", *below, "kept", "kept_l1"])
    table = pd.DataFrame(
        {
            by: out[by],
            "expert": out["expert"],
            "numel": out["numel"],
            "l2": np.sqrt(out["sumsq"]),
            "mean_abs": out["l1"] / out["numel"],
            "sparsity": out["zeros"] / out["numel"],
        }
    )
    for column in below:
        table["share_" + column] = out[column] / out["numel"]
    table["kept_share"] = out["kept"] / out["numel"]
    table["kept_mass"] = out["kept_l1"] / out["l1"].where(out["l1"] > 0)
    return with_attrs(table, scan, True, "exact sums over every entry")


def layer_norms(scan: Scan) -> pd.DataFrame:
    """Exact L2 norm of each expert's task vector per layer: index layer (model order), columns experts."""
    table = delta_summary(scan, "layer").pivot(index="layer", columns="expert", values="l2")
    table = table.reindex(index=_layers(scan), columns=scan.labels)
    return with_attrs(table, scan, True, "exact sums of squares per layer")


def layer_stats(scan: Scan) -> pd.DataFrame:
    """Exact per-layer shares in [0, 1], index layer, one column per statistic (for a heatmap).

    Per expert e: "e: |x|<t" (share below each scan threshold), "e: zeros" (sparsity), "e: kept mass"
    (L1 share kept by the trim); then "sign conflict" (``sign_conflict`` pair "all") and
    "sign agreement" (``sign_agreement``), both over the kept entries at the scan's density.
    """
    summary = delta_summary(scan, "layer").set_index(["layer", "expert"])
    columns = {}
    for label in scan.labels:
        per = summary.xs(label, level="expert")
        columns |= {f"{label}: |x|<{t:g}": per["share_" + below_column(t)] for t in scan.thresholds}
        columns |= {f"{label}: zeros": per["sparsity"], f"{label}: kept mass": per["kept_mass"]}
    conflict = sign_conflict(scan, "layer")
    columns["sign conflict"] = conflict[conflict["pair"] == "all"].set_index("layer")["conflict_rate"]
    columns["sign agreement"] = sign_agreement(scan, "layer").set_index("layer")["agreement"]
    table = pd.DataFrame(columns).reindex(_layers(scan))
    table.index.name, table.columns.name = "layer", "statistic"
    return with_attrs(table, scan, True, "exact shares per layer")


def _layers(scan: Scan) -> list[str]:
    return sorted(set(scan.layers), key=layer_rank)


def weighted_quantiles(values: torch.Tensor, weights: torch.Tensor, quantiles: Sequence[float]) -> torch.Tensor:
    """(R, Q) weighted quantiles of each row of ``values`` (R, K), every column weighing ``weights`` (K,).

    Inverse of the weighted empirical CDF: the smallest v with (weight of entries <= v) >= q x total,
    for q in [0, 1]; with unit weights this is the type-1 sample quantile. K >= 1.
    """
    order = np.argsort(values.numpy(), axis=1)
    ordered = np.take_along_axis(values.numpy(), order, axis=1)
    cumulative = np.cumsum(weights.double().numpy()[order], axis=1)
    out = [
        row[np.searchsorted(cum, np.asarray(quantiles) * cum[-1]).clip(max=len(row) - 1)]
        for row, cum in zip(ordered, cumulative, strict=True)
    ]
    return torch.from_numpy(np.stack(out))


def _groups(scan: Scan, by: str) -> dict[str, torch.Tensor]:
    """Sample columns of each ``by`` group, groups in model order."""
    keys = {"tensor": scan.names, "layer": scan.layers, "model": ["all"] * len(scan.names)}[by]
    ordered = _layers(scan) if by == "layer" else list(dict.fromkeys(keys))
    code = {g: i for i, g in enumerate(ordered)}
    owner = torch.tensor([code[k] for k in keys])[scan.sample_tensor]
    columns = torch.argsort(owner, stable=True).split(torch.bincount(owner, minlength=len(ordered)).tolist())
    return dict(zip(ordered, columns, strict=True))


def delta_quantiles(scan: Scan, by: str = "layer", quantiles: Sequence[float] = QUANTILES) -> pd.DataFrame:
    """Quantiles of task-vector values per (group, expert), from the per-tensor samples.

    Each sampled entry weighs numel / sample of its tensor (``weighted_quantiles``), so a layer's
    quantiles are those of all its entries, estimated. Columns q{q:g}; column ``exact`` is True
    where every tensor of the group was taken whole.
    """
    if by not in BY:
        raise ValueError(f"by must be one of {BY}; got {by!r}")
    rows = []
    for group, columns in _groups(scan, by).items():
        weights = scan.sample_weight[columns]
        values = weighted_quantiles(scan.samples[:, columns], weights, quantiles)
        for label, row in zip(scan.labels, values.tolist(), strict=True):
            rows.append(
                {
                    by: group,
                    "expert": label,
                    **{f"q{q:g}": v for q, v in zip(quantiles, row, strict=True)},
                    "exact": bool((weights == 1).all()),
                }
            )
    return with_attrs(pd.DataFrame(rows), scan, _all_exact(scan), "weighted uniform samples of entries per tensor")


def _all_exact(scan: Scan) -> bool:
    return bool((scan.sample_weight == 1).all())


def _edges(values: torch.Tensor, bins: int) -> torch.Tensor:
    """``bins`` + 1 equal-width edges symmetric about 0 covering every value (float64); bins >= 1."""
    if bins < 1:
        raise ValueError(f"a histogram needs at least one bin; got bins={bins}")
    reach = float(values.abs().max()) or 1e-12
    return torch.linspace(-reach, reach, bins + 1, dtype=torch.float64)


def weighted_histogram(values: torch.Tensor, weights: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """(R, B) summed ``weights`` (K,) of each row of ``values`` (R, K) per bin of ``edges`` (B + 1,).

    Equal-width bins: bin floor((v - edges[0]) / width) computed in the values' dtype, values beyond
    the edges counted in the first or last bin (so the last bin is closed).
    """
    bins, scale = edges.numel() - 1, 1 / float(edges[1] - edges[0])
    index = ((values - float(edges[0])) * scale).floor_().clamp_(0, bins - 1).long()
    return torch.stack([torch.bincount(row, weights=weights.double(), minlength=bins) for row in index])


def _histogram_rows(
    labels: Sequence[str], values: torch.Tensor, weights: torch.Tensor, edges: torch.Tensor, **extra: str
) -> list[dict]:
    """One row per (label, bin): left, right, count = summed weights of the row's values in the bin."""
    counts = weighted_histogram(values, weights, edges).tolist()
    lefts, rights = edges[:-1].tolist(), edges[1:].tolist()
    return [
        {"expert": label, **extra, "left": lo, "right": hi, "count": c}
        for label, row in zip(labels, counts, strict=True)
        for lo, hi, c in zip(lefts, rights, row, strict=True)
    ]


def histogram(scan: Scan, bins: int = DEFAULT_BINS) -> pd.DataFrame:
    """Histogram of each expert's task-vector values over the whole model, on shared bin edges.

    Rows (expert, bin): left, right (edges symmetric about 0, spanning the largest sampled |x|), count
    = estimated entries in [left, right) (the last bin is closed): each sampled entry counts
    numel / sample of its tensor. Exact when every tensor was taken whole. bins >= 1.
    """
    edges = _edges(scan.samples, bins)
    rows = _histogram_rows(scan.labels, scan.samples, scan.sample_weight, edges)
    return with_attrs(pd.DataFrame(rows), scan, _all_exact(scan), "weighted uniform samples of entries per tensor")


def dare_effect(scan: Scan, bins: int = DEFAULT_BINS, rescale: Rescale | str = Rescale.inverse_density) -> pd.DataFrame:
    """Histograms of each expert's task vector before and after DARE's drop and rescale at the density.

    The "after" values are the DARE method's own stage (``sparsify.sparsify`` with
    ``Sparsification.random``, arXiv:2311.03099) applied to each tensor's sampled entries, expert
    after expert, with the generator the merge uses for that tensor (``registry.tensor_generator``
    seeded with the scan's seed): keep each entry with probability p = density, then ``rescale``
    ("inverse_density", the paper's 1/p, by default; "l1" as mergekit, here matching each tensor's
    sampled L1 mass; "none"); at p = 0 everything is dropped. For a tensor taken whole these are
    exactly the values a dare_linear / dare_ties merge with that seed thins it to; for a sampled
    tensor they follow the same distribution (the drop is independent per entry).
    Rows (expert, stage in {"before", "after"}, bin) as in ``histogram``, edges shared by both stages.
    """
    after = torch.empty_like(scan.samples)
    starts = torch.cat(
        [torch.zeros(1, dtype=torch.long), torch.bincount(scan.sample_tensor, minlength=len(scan.names)).cumsum(0)]
    )
    for t, name in enumerate(scan.names):
        generator = tensor_generator(scan.seed, name)
        a, b = int(starts[t]), int(starts[t + 1])
        for i in range(len(scan.labels)):
            after[i, a:b] = sparsify(
                scan.samples[i, a:b].clone(), scan.density, Sparsification.random, rescale, generator
            )
    edges = _edges(torch.cat([scan.samples, after], dim=1), bins)
    rows = []
    for stage, values in (("before", scan.samples), ("after", after)):
        rows += _histogram_rows(scan.labels, values, scan.sample_weight, edges, stage=stage)
    how = f"the DARE method's seeded drop and {Rescale(rescale).value} rescale of uniform samples per tensor"
    return with_attrs(pd.DataFrame(rows), scan, _all_exact(scan), how)


def kept_mass(scan: Scan) -> pd.DataFrame:
    """Share of each expert's L1 mass kept by the per-tensor magnitude trim, as a function of density.

    For density d in (0, 1] and expert e: sum_t ||trim_d(x_e,t)||_1 / sum_t ||x_e,t||_1, the trim
    keeping the max(1, int(d * n)) largest |x| of each tensor (TIES). Rows (density, expert):
    kept_mass in [0, 1] (NaN for an all-zero task vector); current = False for the scan's grid,
    each tensor's share estimated from its sorted sample and weighted by its exact L1 mass (exact
    only where every tensor was whole); current = True for one exact row per expert at the scan's
    density.
    """
    l1 = scan.experts.pivot_table(index="name", columns="expert", values="l1", sort=False).reindex(
        index=scan.names, columns=scan.labels
    )
    l1 = torch.tensor(l1.to_numpy(dtype=float))  # (T, N)
    curve = ((l1[:, :, None] * scan.grid_shares).sum(0) / l1.sum(0)[:, None]).numpy()  # (N, G); NaN for 0 / 0
    exact = _all_exact(scan)
    rows = [
        {"density": d, "expert": e, "kept_mass": curve[i, g], "exact": exact, "current": False}
        for g, d in enumerate(scan.grid)
        for i, e in enumerate(scan.labels)
    ]
    now = delta_summary(scan, "model")
    rows += [
        {"density": scan.density, "expert": e, "kept_mass": m, "exact": True, "current": True}
        for e, m in zip(now["expert"], now["kept_mass"], strict=True)
    ]
    return with_attrs(
        pd.DataFrame(rows),
        scan,
        exact,
        "sorted uniform samples per tensor weighted by exact L1 mass; exact at the current density",
    )


def merge_distance_table(scan: Scan) -> pd.DataFrame:
    """``merge_distance`` per layer, then its whole-model rows (layer "all"); ValueError without a merge."""
    total = merge_distance(scan, "model").rename(columns={"model": "layer"})
    table = pd.concat([merge_distance(scan, "layer"), total], ignore_index=True)
    table.attrs = dict(total.attrs)
    return table


# The Inspect view: one table per panel, in display order, all from one scan.
_TABLES: dict[str, Callable[[Scan], pd.DataFrame]] = {
    "histogram": histogram,
    "layer_norms": layer_norms,
    "quantiles": lambda s: delta_quantiles(s, "layer"),
    "layer_stats": layer_stats,
    "cosine": cosine_similarity,
    "sign_conflict": sign_conflict,
    "jaccard": jaccard,
    "kept_mass": kept_mass,
    "merge_distance": merge_distance_table,
    "dare_effect": dare_effect,
}
PANEL_KEYS = tuple(_TABLES)
MERGE_TABLES = ("merge_distance",)  # the tables that depend on the merge; the rest only on the task vectors


def inspect_tables(
    source: TaskVectorSource,
    density: float,
    merged: Mapping[str, torch.Tensor] | None = None,
    threshold: float = 0.005,
    sample: int = DEFAULT_SAMPLE,
    seed: int = 0,
    progress: Progress | None = None,
    keys: Sequence[str] = PANEL_KEYS,
) -> dict[str, pd.DataFrame | str]:
    """The table of each Inspect panel in ``keys`` (default: every one), in that order, from one ``scan`` of ``source``.

    density: the current trim density in [0, 1]. merged: the current merge {name: tensor} or None.
    threshold: |delta| threshold for the share-below statistic (DARE's 0.005 and 0.002 are
    ``DARE_THRESHOLDS``). sample: entries sampled per tensor for histograms and quantiles. A panel
    that cannot be computed gets a message saying why instead of a table: every panel without a base
    (no task vectors; nothing is read), "merge_distance" before a merge or without base weights.
    Raises ValueError on out-of-range arguments (see ``scan``).
    """
    if lacks_base(source):
        return dict.fromkeys(PANEL_KEYS, "Choose a base model: these statistics are about task vectors M_i - B.")
    has_base = source.base is not None
    missing = {}
    if merged is None:
        missing["merge_distance"] = "Merge first: this panel compares the merged weights with the base and each expert."
    elif not has_base:
        missing["merge_distance"] = "Distances of the merge need the base weights; this source has none."
    if all(key in missing for key in keys):
        return {key: missing[key] for key in keys}
    measured = scan(source, density, merged if has_base else None, (threshold,), sample, seed, progress=progress)
    return {key: missing[key] if key in missing else _TABLES[key](measured) for key in keys}
