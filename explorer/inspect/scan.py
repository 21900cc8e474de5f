"""One pass over a source's tensors that feeds every Inspect statistic.

``scan`` visits each tensor name once, holds that tensor's N task vectors (never whole models) in a
reused buffer (fresh allocations are the slow part on CPU), and measures them in compiled passes
(``scan_kernel``). Per tensor it records exact counts and sums, and a uniform random sample of entries:

  exact   sum of squares, L1 mass, exact zeros, entries with |x| < threshold, pairwise dot products,
          the magnitude trim at ``density`` (TIES, arXiv:2306.01708): per tensor and expert the kept
          set is the one ``sparsify.magnitude_mask`` keeps (``sparsify.magnitude_count`` entries,
          ties with the k-th largest |x| broken by flat index), found exactly by the same threshold
          kernel (``kernels.magnitude_cut``: no topk, no sort); counts of kept entries, their
          overlaps, sign conflicts and L1 mass; distances of a merge from its inputs.
  sampled ``sample`` entries per tensor (uniform, with replacement, the same positions for every
          expert; the whole tensor when it has no more entries), drawn from a generator seeded by
          ``registry.tensor_seed(seed, name)``. Each sampled entry stands for numel / sample entries.

Conventions: N experts, a task vector is x_i = M_i - B; "kept" means kept by the trim *and* nonzero
(a zero has no sign), so the kept L1 mass is exactly that of the TIES trim's output.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from explorer.inspect.scan_kernel import merge_distances, scan_sums
from explorer.inspect.sources import TaskVectorSource, expert_labels, layer_of, layer_rank
from explorer.methods.kernels import keep_none, magnitude_cut
from explorer.methods.selection import Workspace, sorted_descending
from explorer.methods.sparsify import magnitude_count
from explorer.progress import Progress
from explorer.registry import tensor_generator

DEFAULT_SAMPLE = 4096  # sampled entries per tensor
DENSITY_GRID = (0.01, 0.02, 0.03, 0.05, 0.07, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
_COLUMNS = {"pairs": ["name", "layer", "a", "b", "dot", "both_kept", "sign_dot"]}  # may have no rows (N = 1)


@dataclass
class Scan:
    """Everything one pass over a source measured; the ``stats`` functions turn it into tables.

    experts: one row per (tensor, expert): name, layer, expert, numel, sumsq, l1, zeros,
        below_{t} (entries with |x| < t, one column per threshold), kept, kept_l1, threshold.
    entries: one row per tensor: name, layer, numel, kept_any (entries kept by >= 1 expert),
        kept_2plus (by >= 2), conflicts (kept by >= 2 with both signs), agreement_sum
        (sum over entries of |sum_i s_i| / sum_i |s_i|, s_i the sign of a kept x_i, 0 where none kept).
    pairs: one row per (tensor, a < b): name, layer, a, b, dot (x_a . x_b), both_kept, sign_dot
        (agreeing minus disagreeing signs among entries both keep).
    distances: None without a merge; else one row per (tensor, target in [base, experts...]):
        name, layer, target, dist_sq (||merged - target||^2), ref_sq (||target||^2).
    samples: (N, K) sampled task-vector entries, all tensors concatenated; sample_weight (K,) entries
        each stands for; sample_tensor (K,) index into ``names`` of the tensor it came from.
    grid, grid_shares: densities in (0, 1] and (T, N, G) the share of each tensor's sampled L1 mass
        held by its largest ``magnitude_count(d, s)`` sampled |x| (``grid_shares``).
    """

    labels: list[str]
    names: list[str]
    density: float
    thresholds: tuple[float, ...]
    sample: int
    seed: int
    experts: pd.DataFrame
    entries: pd.DataFrame
    pairs: pd.DataFrame
    distances: pd.DataFrame | None
    samples: torch.Tensor
    sample_weight: torch.Tensor
    sample_tensor: torch.Tensor
    grid: tuple[float, ...]
    grid_shares: torch.Tensor

    @property
    def layers(self) -> list[str]:
        """Layer label of each scanned tensor, aligned with ``names``."""
        return [layer_of(n) for n in self.names]


BY = ("tensor", "layer", "model")  # groupings of the per-tensor rows; "model" is one group, "all"


def grouped_sum(frame: pd.DataFrame, by: str, keys: Sequence[str], columns: Sequence[str]) -> pd.DataFrame:
    """Sum ``columns`` of a ``Scan`` table over its tensors per (``by`` group, *keys), in model order.

    by: "tensor" (no grouping), "layer" (``layer_of``) or "model" (everything, labelled "all");
    the result's first column is named ``by``. Raises ValueError for another ``by``.
    """
    if by not in BY:
        raise ValueError(f"by must be one of {BY}; got {by!r}")
    group = {"tensor": frame["name"], "layer": frame["layer"], "model": pd.Series("all", index=frame.index)}[by]
    out = frame.assign(**{by: group}).groupby([by, *keys], sort=False)[list(columns)].sum().reset_index()
    if by == "layer":
        out = out.sort_values(by, key=lambda s: s.map(layer_rank), kind="stable", ignore_index=True)
    return out


def with_attrs(frame: pd.DataFrame, scan: Scan, exact: bool, how: str) -> pd.DataFrame:
    """``frame`` with attrs saying how it was computed.

    exact (bool), sample_size (entries sampled per tensor, None when exact), samples (sampled entries
    per expert in all), density, seed, how.
    """
    frame.attrs.update(
        exact=exact,
        sample_size=None if exact else scan.sample,
        samples=None if exact else int(scan.samples.shape[1]),
        density=scan.density,
        seed=scan.seed,
        how=how,
    )
    return frame


def below_column(threshold: float) -> str:
    """Column of ``Scan.experts`` counting entries with |x| < ``threshold``."""
    return f"below_{threshold:g}"


def _task_vectors(source: TaskVectorSource, name: str, work: Workspace) -> torch.Tensor:
    """(N, numel) float32 task vectors of tensor ``name``, flattened.

    With the source's weights (``models`` and ``base``) M_i - B is computed into a reused buffer (no
    tensor-sized allocation per tensor); otherwise ``source.task_vectors(name)``
    (``explorer.io.inputs.task_vectors``). Both give the same float32 values. A non-float tensor
    comes back as it is stored.
    """
    models, bases = source.models, source.base
    if models is None or bases is None:
        stack = source.task_vectors(name)
        return stack.reshape(stack.shape[0], -1).float() if stack.is_floating_point() else stack
    base = bases[name].reshape(-1)
    if not base.is_floating_point():
        return base[None]
    out = work.get("x", len(models), base.numel(), device=base.device)
    for row, model in zip(out, models, strict=True):
        torch.sub(model[name].reshape(-1), base, out=row)
    return out


def _trims(x: torch.Tensor, density: float) -> list[tuple[float, int]]:
    """Per expert the magnitude trim at ``density`` of task vectors ``x`` (N, numel) as (v, cut).

    The trim keeps ``magnitude_count(density, numel)`` entries, exactly the set of the TIES method
    (``kernels.magnitude_cut``: |x| > v and the entries equal to v before flat index cut); v = inf at
    density 0 (nothing kept). v is the trim's threshold, the k-th largest |x|.
    """
    k = magnitude_count(density, x.shape[1])
    return [magnitude_cut(row, k) if k > 0 else keep_none() for row in x]


def grid_shares(ranked: torch.Tensor, grid: Sequence[float]) -> torch.Tensor:
    """(N, G) share of the L1 mass of each row of ``ranked`` held by its largest entries.

    ``ranked``: (N, s) |values| sorted descending; for each d in ``grid`` the ``magnitude_count(d, s)``
    largest entries (as the TIES trim of the sample); 0 for an all-zero row.
    """
    cumulative = ranked.double().cumsum(dim=1)
    take = torch.tensor([magnitude_count(d, ranked.shape[1]) - 1 for d in grid])
    return cumulative[:, take] / cumulative[:, -1:].clamp(min=torch.finfo(torch.float64).tiny)


def _sample_index(numel: int, sample: int, generator: torch.Generator) -> torch.Tensor:
    if numel <= sample:
        return torch.arange(numel)
    return torch.randint(numel, (sample,), generator=generator)


def _check(density: float, thresholds: Sequence[float], sample: int, grid: Sequence[float]) -> None:
    if not 0 <= density <= 1:
        raise ValueError(f"density must be in [0, 1] (the fraction of entries a trim keeps); got {density}")
    if any(t <= 0 for t in thresholds):
        raise ValueError(f"thresholds must be positive magnitudes; got {list(thresholds)}")
    if not all(0 < d <= 1 for d in grid):
        raise ValueError(f"kept-mass densities must be in (0, 1]; got {list(grid)}")
    if sample < 1:
        raise ValueError(f"sample must be >= 1; got sample={sample}")


def scan(
    source: TaskVectorSource,
    density: float,
    merged: Mapping[str, torch.Tensor] | None = None,
    thresholds: Sequence[float] = (0.005,),
    sample: int = DEFAULT_SAMPLE,
    seed: int = 0,
    grid: Sequence[float] = DENSITY_GRID,
    progress: Progress | None = None,
) -> Scan:
    """Measure ``source`` in one pass over its tensor names (non-float tensors are skipped).

    density: fraction of each task vector the magnitude trim keeps, in [0, 1].
    merged: {name: merged weights} of the current merge (any float dtype) or None.
    thresholds: magnitudes t > 0 for the share of |x| < t (DARE, arXiv:2311.03099, reports most
        |delta| below 0.005 and 0.002). sample: entries sampled per tensor (>= 1). grid: densities
        in (0, 1] for the kept-mass curve (``stats.kept_mass``). Memory besides the source: the task
        vectors of the largest tensor (N x its size, a reused buffer). Each tensor takes three passes
        over its task vectors: two for the trims, one for every sum (``scan_kernel.scan_sums``).
    Raises ValueError on out-of-range arguments, a source without task vectors, or a ``merged``
    that lacks a tensor or has another size; CheckpointError from a disk source's bad tensor.
    """
    _check(density, thresholds, sample, grid)
    if merged is not None and source.base is None:
        raise ValueError("distances of a merge need the base weights; this source has none")
    rows: dict[str, list] = {"experts": [], "entries": [], "pairs": [], "distances": []}
    samples, weights, owners, shares, names, labels, work = [], [], [], [], [], None, Workspace()
    cache = getattr(source, "scan_cache", None) if source.models is not None and source.base is not None else None
    for t, name in enumerate(source.names):
        key = (name, density, tuple(thresholds), sample, seed, tuple(grid))
        x, measured = None, cache.get(key) if cache is not None else None
        if measured is None:
            x = _task_vectors(source, name, work)
            measured = _measure(x, name, density, thresholds, sample, seed, grid)
            if cache is not None:
                cache[key] = measured
        if measured.numel:
            labels = labels or expert_labels(source, measured.values.shape[0])
            acc = dict(measured.sums)
            if merged is not None:
                acc |= _distances(source, name, x, merged, acc["gram"].diagonal())
            thresholds_of = [v for v, _ in measured.trims]
            _add_rows(rows, name, measured.numel, labels, thresholds, thresholds_of, acc, merged is not None)
            values = measured.values
            shares.append(measured.shares)
            samples.append(values)
            weights.append(torch.full((values.shape[1],), measured.numel / values.shape[1], dtype=torch.float64))
            owners.append(torch.full((values.shape[1],), len(names), dtype=torch.long))
            names.append(name)
        if progress:
            progress((t + 1) / len(source.names), name)
    if not names:
        raise ValueError("the source has no floating-point tensors to inspect")
    frames = {
        key: pd.DataFrame(value, columns=list(value[0]) if value else _COLUMNS.get(key)) for key, value in rows.items()
    }
    return Scan(
        labels=labels,
        names=names,
        density=density,
        thresholds=tuple(thresholds),
        sample=sample,
        seed=seed,
        experts=frames["experts"],
        entries=frames["entries"],
        pairs=frames["pairs"],
        distances=frames["distances"] if merged is not None else None,
        samples=torch.cat(samples, dim=1),
        sample_weight=torch.cat(weights),
        sample_tensor=torch.cat(owners),
        grid=tuple(grid),
        grid_shares=torch.stack(shares),
    )


@dataclass(frozen=True)
class _Measured:
    """What the scan measured of one tensor without a merge (a session keeps it: ``scan_cache``).

    numel 0 for a tensor the scan skips (not float, or empty); values: (N, s) sampled task-vector
    entries; shares: (N, G) ``grid_shares``; trims: per expert (v, cut); sums: ``scan_sums``.
    """

    numel: int
    values: torch.Tensor | None = None
    shares: torch.Tensor | None = None
    trims: list[tuple[float, int]] | None = None
    sums: dict | None = None


def _measure(
    x: torch.Tensor,
    name: str,
    density: float,
    thresholds: Sequence[float],
    sample: int,
    seed: int,
    grid: Sequence[float],
) -> _Measured:
    """Sample, trim and sum the task vectors ``x`` (N, numel) of tensor ``name`` (see ``Scan``)."""
    if not x.is_floating_point() or not x.shape[1]:
        return _Measured(numel=0)
    numel = x.shape[1]
    values = x[:, _sample_index(numel, sample, tensor_generator(seed, name))].cpu()  # the statistics run in numpy
    trims = _trims(x, density)
    shares = grid_shares(sorted_descending(values.abs()), grid)
    return _Measured(numel, values, shares, trims, scan_sums(x, trims, tuple(thresholds)))


def _distances(
    source: TaskVectorSource,
    name: str,
    x: torch.Tensor | None,
    merged: Mapping[str, torch.Tensor],
    squares: np.ndarray,
) -> dict[str, np.ndarray]:
    """Where the merge of tensor ``name`` lies among its inputs (moved = merged - B).

    Returns dist_sq (N + 1,): ||x_i - moved||^2 for each expert, then ||moved||^2 (from the base);
    ref_sq (N + 1,): ||B + x_i||^2 = ||B||^2 + 2 B.x_i + ||x_i||^2 (squares: the (N,) ||x_i||^2), then
    ||B||^2. Task vectors from ``x`` (N, numel) when given, else from the source's weights. Raises
    ValueError when the merge lacks the tensor or has another size.
    """
    numel = source.base[name].numel()
    if name not in merged:
        raise ValueError(f"the merged weights lack tensor {name!r}; merge again before inspecting distances")
    flat = merged[name].reshape(-1).float()
    if flat.numel() != numel:
        raise ValueError(f"merged tensor {name!r} has {flat.numel()} entries but the inputs have {numel}; merge again")
    base = source.base[name].reshape(-1).float()
    if x is None:
        rows, minus = [m[name].reshape(-1) for m in source.models], base
    else:
        rows, minus = list(x), torch.zeros(numel, device=base.device)
    d = merge_distances(rows, minus, base, flat)
    return {
        "dist_sq": np.append(d["dist_sq"], d["moved_sq"]),
        "ref_sq": np.append(d["bb"] + 2 * d["xb"] + squares, d["bb"]),
    }


def _add_rows(
    rows: dict[str, list],
    name: str,
    numel: int,
    labels: list[str],
    thresholds: Sequence[float],
    cutoff: Sequence[float],
    acc: dict,
    has_merge: bool,
) -> None:
    """Append one tensor's accumulated sums as table rows (see ``Scan``)."""
    layer, n = layer_of(name), len(labels)
    for i, label in enumerate(labels):
        row = {
            "name": name,
            "layer": layer,
            "expert": label,
            "numel": numel,
            "sumsq": float(acc["gram"][i, i]),
            "l1": float(acc["l1"][i]),
            "zeros": int(acc["zeros"][i]),
        }
        row |= {below_column(t): int(acc["below"][j, i]) for j, t in enumerate(thresholds)}
        row |= {"kept": int(acc["inter"][i, i]), "kept_l1": float(acc["kept_l1"][i]), "threshold": float(cutoff[i])}
        rows["experts"].append(row)
    counts = {k: int(acc[k]) for k in ("kept_any", "kept_2plus", "conflicts")}
    rows["entries"].append(
        dict(name=name, layer=layer, numel=numel, **counts, agreement_sum=float(acc["agreement_sum"]))
    )
    for a in range(n):
        for b in range(a + 1, n):
            rows["pairs"].append(
                {
                    "name": name,
                    "layer": layer,
                    "a": labels[a],
                    "b": labels[b],
                    "dot": float(acc["gram"][a, b]),
                    "both_kept": int(acc["inter"][a, b]),
                    "sign_dot": int(acc["sdot"][a, b]),
                }
            )
    if has_merge:
        for i, target in enumerate([*labels, "base"]):
            rows["distances"].append(
                {
                    "name": name,
                    "layer": layer,
                    "target": target,
                    "dist_sq": float(acc["dist_sq"][i]),
                    "ref_sq": float(acc["ref_sq"][i]),
                }
            )
