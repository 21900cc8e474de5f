"""One streaming pass over a source's tensors that feeds every Inspect statistic.

``scan`` visits each tensor name once, holds that tensor's N task vectors (never whole models), and
walks them in column chunks through preallocated work buffers (fresh allocations are the slow part
on CPU). Per tensor it records exact counts and sums, and a uniform random sample of entries:

  exact   sum of squares, L1 mass, exact zeros, entries with |x| < threshold, pairwise dot products,
          the magnitude trim at ``density`` (TIES, arXiv:2306.01708): per tensor and expert the kept
          set is the one ``sparsify.magnitude_mask`` keeps (``sparsify.magnitude_count`` entries,
          ties with the k-th largest |x| broken by flat index), found exactly by the same
          sample-bracketed selection (``selection.top_cutoff`` and ``mark_top``: no topk, no full
          sort, chunk by chunk); counts of kept entries, their overlaps, sign conflicts and L1 mass;
          distances of a merge from its inputs.
  sampled ``sample`` entries per tensor (uniform, with replacement, the same positions for every
          expert; the whole tensor when it has no more entries), drawn from a generator seeded by
          ``registry.tensor_seed(seed, name)``. Each sampled entry stands for numel / sample entries.

Conventions: N experts, a task vector is x_i = M_i - B; "kept" means kept by the trim *and* nonzero
(a zero has no sign), so the kept L1 mass is exactly that of the TIES trim's output.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import pandas as pd
import torch

from explorer.inspect.sources import TaskVectorSource, expert_labels, layer_of, layer_rank
from explorer.methods.selection import (
    DEFAULT_CHUNK,
    Workspace,
    chunks,
    mark_top,
    sorted_descending,
    top_cutoff,
)
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


class _TaskVectors:
    """Task vectors (N, numel) of one tensor, flattened, read by column chunks.

    With the source's weights (``models`` and ``base``) a chunk is M_i - B computed into a reused
    buffer (nothing of tensor size is allocated); otherwise chunks are views of
    ``source.task_vectors(name)`` (``explorer.io.inputs.task_vectors``). Both give the same float32 values.
    """

    def __init__(self, source: TaskVectorSource, name: str, work: Workspace):
        models, bases = source.models, source.base
        self.base = bases[name].reshape(-1) if bases is not None else None
        self._work, self._weights, self._stack = work, None, None
        if models is not None and self.base is not None:
            self._weights = [m[name].reshape(-1) for m in models]
            self.n_experts, self.numel = len(self._weights), self.base.numel()
            self.is_float = self.base.is_floating_point()
        else:
            stack = source.task_vectors(name).float()
            self._stack = stack.reshape(stack.shape[0], -1)
            (self.n_experts, self.numel), self.is_float = self._stack.shape, True

    def read(self, a: int, b: int) -> torch.Tensor:
        if self._stack is not None:
            return self._stack[:, a:b]
        out = self._work.get("x", self.n_experts, b - a)
        torch.stack([w[a:b] for w in self._weights], out=out)
        return out.sub_(self.base[a:b])

    def take(self, index: torch.Tensor) -> torch.Tensor:
        if self._stack is not None:
            return self._stack[:, index]
        return torch.stack([w[index] for w in self._weights]) - self.base[index]


def _cutoffs(
    x: _TaskVectors, density: float, ranked: torch.Tensor, chunk: int, work: Workspace
) -> tuple[torch.Tensor, torch.Tensor]:
    """(kth, ties), each (N,): the magnitude trim of each expert at ``density``, for ``mark_top``.

    The trim keeps ``magnitude_count(density, numel)`` entries (as the TIES method): |x| > kth and the
    first ``ties`` entries with |x| == kth by flat index. kth = inf at density 0 (nothing kept);
    ties = 0 where kth = 0 (zeros are never "kept": the trim's zeros carry no sign and no mass).
    ``ranked``: the sampled |x| sorted descending (the whole tensor when it was sampled whole).
    """
    numel, n = x.numel, x.n_experts
    k = magnitude_count(density, numel)
    if k == 0:
        return torch.full((n,), math.inf), torch.zeros(n, dtype=torch.long)
    if ranked.shape[1] == numel:  # the sample is the whole tensor
        kth = ranked[:, k - 1].clone()
        ties = k - (ranked > kth[:, None]).sum(1)
    else:
        kth, ties = top_cutoff(x.read, numel, k, ranked, chunk, work)
    return kth, ties.masked_fill_(kth == 0, 0)


def grid_shares(ranked: torch.Tensor, grid: Sequence[float]) -> torch.Tensor:
    """(N, G) share of the L1 mass of each row of ``ranked`` held by its largest entries.

    ``ranked``: (N, s) |values| sorted descending; for each d in ``grid`` the ``magnitude_count(d, s)``
    largest entries (as the TIES trim of the sample); 0 for an all-zero row.
    """
    cumulative = ranked.double().cumsum(dim=1)
    take = torch.tensor([magnitude_count(d, ranked.shape[1]) - 1 for d in grid])
    return cumulative[:, take] / cumulative[:, -1:].clamp(min=torch.finfo(torch.float64).tiny)


def _accumulate(
    x: _TaskVectors,
    cutoff: tuple[torch.Tensor, torch.Tensor],
    thresholds: Sequence[float],
    merged: torch.Tensor | None,
    chunk: int,
    work: Workspace,
) -> dict[str, torch.Tensor]:
    """Exact sums over the task vectors ``x`` of one tensor, chunk by chunk (see ``Scan``).

    All temporaries live in ``work``; 0/1 indicators are float32 (exact: a chunk has < 2^24 entries).
    """
    n = x.n_experts
    acc = {key: torch.zeros(n, dtype=torch.float64) for key in ("l1", "zeros", "kept_l1", "xb", "dist_sq")}
    acc |= {key: torch.zeros(n, n, dtype=torch.float64) for key in ("gram", "inter", "sdot")}
    acc |= {
        key: torch.zeros((), dtype=torch.float64)
        for key in ("kept_any", "kept_2plus", "conflicts", "agreement_sum", "bb", "moved_sq")
    }
    acc["below"] = torch.zeros(len(thresholds), n, dtype=torch.float64)
    kth, ties = cutoff[0][:, None], cutoff[1].clone()  # mark_top counts ties down chunk by chunk
    for a, b in chunks(x.numel, chunk):
        xc, c = x.read(a, b), b - a  # (N, c)
        ax, tmp = torch.abs(xc, out=work.get("abs", n, c)), work.get("tmp", n, c)
        acc["gram"] += xc @ xc.T
        acc["l1"] += ax.sum(1)
        acc["zeros"] += torch.eq(ax, 0, out=tmp).sum(1)
        for j, t in enumerate(thresholds):
            acc["below"][j] += torch.lt(ax, t, out=tmp).sum(1)
        kept = mark_top(ax, kth, ties, work.get("kept", n, c))  # 1.0 where the TIES trim keeps a nonzero x
        signs = torch.sign(xc, out=work.get("signs", n, c)).mul_(kept)  # -1/0/+1 on kept entries
        acc["inter"] += kept @ kept.T
        acc["sdot"] += signs @ signs.T
        acc["kept_l1"] += torch.mul(signs, xc, out=tmp).sum(1)
        _entries(acc, kept, signs, work)
        if merged is not None:
            _distances(acc, xc, merged[a:b], x.base[a:b], work)
    acc["ref_sq"] = torch.cat(
        [acc["bb"] + 2 * acc["xb"] + acc["gram"].diagonal(), acc["bb"][None]]
    )  # ||B + x_i||^2, ||B||^2
    acc["dist_sq"] = torch.cat([acc["dist_sq"], acc["moved_sq"][None]])
    return acc


def _entries(acc: dict[str, torch.Tensor], kept: torch.Tensor, signs: torch.Tensor, work: Workspace) -> None:
    """Add per-entry cross-expert counts.

    An entry conflicts when its kept signs are not all equal, i.e. |sum of signs| < number of
    experts keeping it.
    """
    c = kept.shape[1]
    count = torch.sum(kept, 0, out=work.get("count", c))
    net = torch.sum(signs, 0, out=work.get("net", c)).abs_()
    flag = work.get("flag", c)
    acc["kept_any"] += torch.gt(count, 0.5, out=flag).sum()
    acc["kept_2plus"] += torch.gt(count, 1.5, out=flag).sum()
    acc["conflicts"] += torch.lt(net, count, out=flag).sum()
    acc["agreement_sum"] += torch.div(net, count.clamp_(min=1), out=flag).sum()


def _distances(
    acc: dict[str, torch.Tensor], x: torch.Tensor, merged: torch.Tensor, base: torch.Tensor, work: Workspace
) -> None:
    """Add squared distances of the merge (B + moved) from each expert (B + x_i) and from the base.

    Also the dot products that give the experts' norms (||B + x_i||^2 = ||B||^2 + 2 B.x_i + ||x_i||^2).
    """
    moved = torch.sub(merged, base, out=work.get("moved", base.shape[0]))
    acc["dist_sq"] += (
        torch.linalg.vector_norm(torch.sub(x, moved, out=work.get("tmp", *x.shape)), dim=1).double().square()
    )
    acc["moved_sq"] += moved.dot(moved)
    acc["xb"] += x @ base
    acc["bb"] += base.dot(base)


def _sample_index(numel: int, sample: int, generator: torch.Generator) -> torch.Tensor:
    if numel <= sample:
        return torch.arange(numel)
    return torch.randint(numel, (sample,), generator=generator)


def _check(density: float, thresholds: Sequence[float], sample: int, grid: Sequence[float], chunk: int) -> None:
    if not 0 <= density <= 1:
        raise ValueError(f"density must be in [0, 1] (the fraction of entries a trim keeps); got {density}")
    if any(t <= 0 for t in thresholds):
        raise ValueError(f"thresholds must be positive magnitudes; got {list(thresholds)}")
    if not all(0 < d <= 1 for d in grid):
        raise ValueError(f"kept-mass densities must be in (0, 1]; got {list(grid)}")
    if sample < 1 or chunk < 1:
        raise ValueError(f"sample and chunk must be >= 1; got sample={sample}, chunk={chunk}")


def scan(
    source: TaskVectorSource,
    density: float,
    merged: Mapping[str, torch.Tensor] | None = None,
    thresholds: Sequence[float] = (0.005,),
    sample: int = DEFAULT_SAMPLE,
    seed: int = 0,
    grid: Sequence[float] = DENSITY_GRID,
    chunk: int = DEFAULT_CHUNK,
    progress: Progress | None = None,
) -> Scan:
    """Measure ``source`` in one pass over its tensor names (non-float tensors are skipped).

    density: fraction of each task vector the magnitude trim keeps, in [0, 1].
    merged: {name: merged weights} of the current merge (any float dtype) or None.
    thresholds: magnitudes t > 0 for the share of |x| < t (DARE, arXiv:2311.03099, reports most
        |delta| below 0.005 and 0.002). sample: entries sampled per tensor (>= 1). grid: densities
        in (0, 1] for the kept-mass curve (``stats.kept_mass``). chunk: entries per
        expert per work step. Memory besides the source: the task vectors of one tensor (N x its size)
        and about 6 x N x chunk x 4 bytes of work buffers.
    Raises ValueError on out-of-range arguments, a source without task vectors, or a ``merged``
    that lacks a tensor or has another size; CheckpointError from a disk source's bad tensor.
    """
    _check(density, thresholds, sample, grid, chunk)
    if merged is not None and source.base is None:
        raise ValueError("distances of a merge need the base weights; this source has none")
    rows: dict[str, list] = {"experts": [], "entries": [], "pairs": [], "distances": []}
    samples, weights, owners, shares, names, labels, work = [], [], [], [], [], None, Workspace()
    for t, name in enumerate(source.names):
        x = _TaskVectors(source, name, work)
        if x.is_float and x.numel:
            labels = labels or expert_labels(source, x.n_experts)
            numel = x.numel
            moved = _merged_flat(merged, name, numel) if merged is not None else None
            generator = tensor_generator(seed, name)
            values = x.take(_sample_index(numel, sample, generator))
            ranked = sorted_descending(values.abs())
            cutoff = _cutoffs(x, density, ranked, chunk, work)
            shares.append(grid_shares(ranked, grid))
            acc = _accumulate(x, cutoff, thresholds, moved, chunk, work)
            _add_rows(rows, name, numel, labels, thresholds, cutoff[0], acc, moved is not None)
            samples.append(values)
            weights.append(torch.full((values.shape[1],), numel / values.shape[1], dtype=torch.float64))
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


def _merged_flat(merged: Mapping[str, torch.Tensor], name: str, numel: int) -> torch.Tensor:
    if name not in merged:
        raise ValueError(f"the merged weights lack tensor {name!r}; merge again before inspecting distances")
    flat = merged[name].reshape(-1)
    if flat.numel() != numel:
        raise ValueError(f"merged tensor {name!r} has {flat.numel()} entries but the inputs have {numel}; merge again")
    return flat


def _add_rows(
    rows: dict[str, list],
    name: str,
    numel: int,
    labels: list[str],
    thresholds: Sequence[float],
    cutoff: torch.Tensor,
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
