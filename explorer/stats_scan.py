"""One streaming pass over a source's tensors that feeds every Inspect statistic.

``scan`` visits each tensor name once, holds that tensor's N task vectors (never whole models), and
walks them in column chunks through preallocated work buffers (fresh allocations are the slow part
on CPU). Per tensor it records exact counts and sums, and a uniform random sample of entries:

  exact   sum of squares, L1 mass, exact zeros, entries with |x| < threshold, pairwise dot products,
          the magnitude trim at ``density`` (TIES, arXiv:2306.01708): per tensor and expert the kept
          set is the k = max(1, int(density * numel)) largest |x| (as ``sparsify.magnitude_mask``),
          found exactly by a sample-bracketed selection (no topk, no full sort); counts of kept
          entries, their overlaps, sign conflicts and L1 mass; distances of a merge from its inputs.
  sampled ``sample`` entries per tensor (uniform, with replacement, the same positions for every
          expert; the whole tensor when it has no more entries), drawn from a generator seeded by
          ``tensor_seed(seed, name)``. Each sampled entry stands for numel / sample entries.

Conventions: N experts, a task vector is x_i = M_i - B; "kept" means kept by the trim *and* nonzero
(a zero has no sign); entries tied with the k-th largest |x| are all kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Optional, Sequence

import pandas as pd
import torch

from explorer.executor import Progress, tensor_seed
from explorer.stats_source import TaskVectorSource, expert_labels, layer_of, layer_rank

DEFAULT_SAMPLE = 8192  # sampled entries per tensor
DEFAULT_CHUNK = 1 << 20  # entries per expert per work chunk (4 MiB float32)
_COLUMNS = {"pairs": ["name", "layer", "a", "b", "dot", "both_kept", "sign_dot"]}  # may have no rows (N = 1)
_TINY = float(torch.finfo(torch.float32).tiny) * torch.finfo(torch.float32).eps  # smallest subnormal > 0


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
    distances: Optional[pd.DataFrame]
    samples: torch.Tensor
    sample_weight: torch.Tensor
    sample_tensor: torch.Tensor

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
    """``frame`` with attrs saying how it was computed: exact (bool), sample_size (entries sampled
    per tensor, None when exact), samples (sampled entries per expert in all), density, seed, how."""
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


class _Buffers:
    """Reused float32 work buffers of N x chunk entries; ``get(key, c)`` is an (N, c) view."""

    def __init__(self, n: int, chunk: int):
        self.n, self.chunk, self._flat = n, chunk, {}

    def get(self, key: str, c: int) -> torch.Tensor:
        if key not in self._flat:
            self._flat[key] = torch.empty(self.n * self.chunk)
        return self._flat[key][: self.n * c].view(self.n, c)


class _Tensor:
    """One tensor name of a source, flattened: task-vector chunks (N, c) and samples (N, k).

    With a source's weights (``models`` and ``base``) chunks are M_i - B computed into a buffer;
    otherwise they are views of ``source.task_vectors(name)``. Both give the same float32 values.
    """

    def __init__(self, source: TaskVectorSource, name: str):
        models, base = getattr(source, "models", None), getattr(source, "base", None)
        self.base = base[name].reshape(-1) if base is not None else None
        if models is not None and self.base is not None:
            self.weights, self.stack = [m[name].reshape(-1) for m in models], None
        else:
            self.weights, self.stack = None, source.task_vectors(name).float()
            self.stack = self.stack.reshape(self.stack.shape[0], -1)
        self.n_experts = len(self.weights) if self.weights is not None else self.stack.shape[0]
        self.numel = self.base.numel() if self.weights is not None else self.stack.shape[1]
        self.is_float = self.base.is_floating_point() if self.weights is not None else True

    def chunk(self, a: int, b: int, buffers: _Buffers) -> torch.Tensor:
        if self.stack is not None:
            return self.stack[:, a:b]
        out = buffers.get("x", b - a)
        torch.stack([w[a:b] for w in self.weights], out=out)
        return out.sub_(self.base[a:b])

    def take(self, index: torch.Tensor) -> torch.Tensor:
        if self.stack is not None:
            return self.stack[:, index]
        return torch.stack([w[index] for w in self.weights]) - self.base[index]


def kth_largest(abs_chunks: Callable[[], Iterator[torch.Tensor]], numel: int, k: int, sample: torch.Tensor) -> torch.Tensor:
    """(N,) exact k-th largest entry of each row of a non-negative (N, numel) matrix given as chunks.

    ``abs_chunks()`` yields the matrix as (N, c) column chunks (it may reuse one buffer); ``sample``
    (N, s) holds uniform samples of each row. Floyd-Rivest selection: the sample brackets the answer
    within +/- (3 binomial standard deviations + 2) ranks; one pass counts entries above the bracket
    and keeps those inside it; the answer is a kthvalue over the few kept. A row whose bracket
    misses (rare) gets an exact kthvalue over its whole row in a second pass. 1 <= k <= numel.
    """
    s = sample.shape[1]
    ranked = sample.sort(dim=1, descending=True).values
    share = k / numel
    spread = 3 * math.sqrt(s * share * (1 - share)) + 2
    top, bottom = math.floor(share * s - spread), math.ceil(share * s + spread)
    hi = ranked[:, top] if top >= 0 else torch.full((sample.shape[0],), math.inf)
    lo = ranked[:, bottom] if bottom < s else torch.zeros(sample.shape[0])
    above = torch.zeros(sample.shape[0], dtype=torch.long)
    inside: list[list[torch.Tensor]] = [[] for _ in range(sample.shape[0])]
    for c in abs_chunks():
        above += (c > hi[:, None]).sum(1)
        keep = (c >= lo[:, None]) & (c <= hi[:, None])
        for row, kept in zip(inside, c[keep].split(keep.sum(1).tolist())):
            row.append(kept)
    out = torch.empty(sample.shape[0])
    for i, row in enumerate(inside):
        values, rank = torch.cat(row), k - int(above[i])
        if 1 <= rank <= values.numel():
            out[i] = torch.kthvalue(values, values.numel() - rank + 1).values
        else:
            full = torch.cat([c[i].clone() for c in abs_chunks()])
            out[i] = torch.kthvalue(full, numel - k + 1).values
    return out


def _abs_chunks(tensor: _Tensor, chunk: int, buffers: _Buffers) -> Callable[[], Iterator[torch.Tensor]]:
    def chunks() -> Iterator[torch.Tensor]:
        for a in range(0, tensor.numel, chunk):
            b = min(a + chunk, tensor.numel)
            yield torch.abs(tensor.chunk(a, b, buffers), out=buffers.get("abs", b - a))

    return chunks


def _thresholds(tensor: _Tensor, density: float, sample: torch.Tensor, exact_sample: bool, chunk: int, buffers: _Buffers) -> torch.Tensor:
    """(N,) smallest |x| each expert keeps at ``density`` (inf: nothing; the smallest subnormal: all nonzero)."""
    if density <= 0:
        return torch.full((tensor.n_experts,), math.inf)
    k = max(1, int(density * tensor.numel))
    if exact_sample:
        kth = torch.kthvalue(sample.abs(), tensor.numel - k + 1, dim=1).values
    else:
        kth = kth_largest(_abs_chunks(tensor, chunk, buffers), tensor.numel, k, sample.abs())
    return kth.clamp(min=_TINY)


def _accumulate(tensor: _Tensor, cutoff: torch.Tensor, thresholds: Sequence[float], merged: Optional[torch.Tensor], chunk: int, buffers: _Buffers) -> dict[str, torch.Tensor]:
    """Exact sums over one tensor's entries, chunk by chunk (see ``Scan`` for their meaning)."""
    n = tensor.n_experts
    acc = {key: torch.zeros(n, dtype=torch.float64) for key in ("l1", "zeros", "kept_l1")}
    acc |= {key: torch.zeros(n, n, dtype=torch.float64) for key in ("gram", "inter", "sdot")}
    acc |= {key: torch.zeros((), dtype=torch.float64) for key in ("kept_any", "kept_2plus", "conflicts", "agreement_sum")}
    acc["below"] = torch.zeros(len(thresholds), n, dtype=torch.float64)
    acc["dist_sq"], acc["ref_sq"] = torch.zeros(n + 1, dtype=torch.float64), torch.zeros(n + 1, dtype=torch.float64)
    for a in range(0, tensor.numel, chunk):
        b = min(a + chunk, tensor.numel)
        x = tensor.chunk(a, b, buffers)  # (N, c)
        ax, tmp = torch.abs(x, out=buffers.get("abs", b - a)), buffers.get("tmp", b - a)
        acc["gram"] += x @ x.T
        acc["l1"] += ax.sum(1)
        acc["zeros"] += torch.eq(ax, 0, out=tmp).sum(1)
        for j, t in enumerate(thresholds):
            acc["below"][j] += torch.lt(ax, t, out=tmp).sum(1)
        kept = torch.ge(ax, cutoff[:, None], out=buffers.get("kept", b - a))  # 1.0 where kept
        signs = torch.sign(x, out=buffers.get("sign", b - a)).mul_(kept)  # -1/0/+1 on kept entries
        acc["inter"] += kept @ kept.T
        acc["sdot"] += signs @ signs.T
        acc["kept_l1"] += torch.mul(ax, kept, out=tmp).sum(1)
        count, net = kept.sum(0), signs.sum(0).abs_()  # (c,) experts keeping, |sum of their signs|
        acc["kept_any"] += (count > 0).sum()
        acc["kept_2plus"] += (count >= 2).sum()
        acc["conflicts"] += (net < count).sum()
        acc["agreement_sum"] += (net / count.clamp(min=1)).sum()
        if merged is not None:
            _distances(acc, x, merged[a:b].float() - tensor.base[a:b], tensor.base[a:b], tmp)
    return acc


def _distances(acc: dict[str, torch.Tensor], x: torch.Tensor, moved: torch.Tensor, base: torch.Tensor, tmp: torch.Tensor) -> None:
    """Add squared distances of the merge (base + ``moved``) from each expert (B + x_i) and the base."""
    n = x.shape[0]
    acc["dist_sq"][:n] += torch.sub(x, moved, out=tmp).square_().sum(1)
    acc["dist_sq"][n] += moved.dot(moved)
    acc["ref_sq"][:n] += torch.add(x, base, out=tmp).square_().sum(1)
    acc["ref_sq"][n] += base.dot(base)


def _sample_index(numel: int, sample: int, generator: torch.Generator) -> torch.Tensor:
    if numel <= sample:
        return torch.arange(numel)
    return torch.randint(numel, (sample,), generator=generator)


def _check(density: float, thresholds: Sequence[float], sample: int, chunk: int) -> None:
    if not 0 <= density <= 1:
        raise ValueError(f"density must be in [0, 1] (the fraction of entries a trim keeps); got {density}")
    if any(t <= 0 for t in thresholds):
        raise ValueError(f"thresholds must be positive magnitudes; got {list(thresholds)}")
    if sample < 1 or chunk < 1:
        raise ValueError(f"sample and chunk must be >= 1; got sample={sample}, chunk={chunk}")


def scan(
    source: TaskVectorSource,
    density: float,
    merged: Optional[Mapping[str, torch.Tensor]] = None,
    thresholds: Sequence[float] = (0.005,),
    sample: int = DEFAULT_SAMPLE,
    seed: int = 0,
    chunk: int = DEFAULT_CHUNK,
    progress: Optional[Progress] = None,
) -> Scan:
    """Measure ``source`` in one pass over its tensor names (non-float tensors are skipped).

    density: fraction of each task vector the magnitude trim keeps, in [0, 1].
    merged: {name: merged weights} of the current merge (any float dtype) or None.
    thresholds: magnitudes t > 0 for the share of |x| < t (DARE, arXiv:2311.03099, reports most
        |delta| below 0.005 and 0.002). sample: entries sampled per tensor (>= 1). chunk: entries per
        expert per work step (memory: about 5 x N x chunk x 4 bytes besides the tensor itself).
    Raises ValueError on out-of-range arguments, a source without task vectors, or a ``merged``
    that lacks a tensor or has another size; CheckpointError from a disk source's bad tensor.
    """
    _check(density, thresholds, sample, chunk)
    if merged is not None and getattr(source, "base", None) is None:
        raise ValueError("distances of a merge need the base weights; this source has none")
    rows: dict[str, list] = {"experts": [], "entries": [], "pairs": [], "distances": []}
    samples, weights, owners, names, labels, buffers = [], [], [], [], None, None
    for t, name in enumerate(source.names):
        tensor = _Tensor(source, name)
        if tensor.is_float and tensor.numel:
            labels = labels or expert_labels(source, tensor.n_experts)
            buffers = buffers or _Buffers(tensor.n_experts, chunk)
            moved = _merged_flat(merged, name, tensor.numel) if merged is not None else None
            generator = torch.Generator().manual_seed(tensor_seed(seed, name))
            values = tensor.take(_sample_index(tensor.numel, sample, generator))
            cutoff = _thresholds(tensor, density, values, values.shape[1] == tensor.numel, chunk, buffers)
            acc = _accumulate(tensor, cutoff, thresholds, moved, chunk, buffers)
            _add_rows(rows, name, tensor.numel, labels, thresholds, cutoff, acc, moved is not None)
            samples.append(values)
            weights.append(torch.full((values.shape[1],), tensor.numel / values.shape[1], dtype=torch.float64))
            owners.append(torch.full((values.shape[1],), len(names), dtype=torch.long))
            names.append(name)
        if progress:
            progress((t + 1) / len(source.names), name)
    if not names:
        raise ValueError("the source has no floating-point tensors to inspect")
    frames = {key: pd.DataFrame(value, columns=list(value[0]) if value else _COLUMNS.get(key)) for key, value in rows.items()}
    return Scan(
        labels=labels, names=names, density=density, thresholds=tuple(thresholds), sample=sample, seed=seed,
        experts=frames["experts"], entries=frames["entries"], pairs=frames["pairs"],
        distances=frames["distances"] if merged is not None else None,
        samples=torch.cat(samples, dim=1), sample_weight=torch.cat(weights), sample_tensor=torch.cat(owners),
    )


def _merged_flat(merged: Mapping[str, torch.Tensor], name: str, numel: int) -> torch.Tensor:
    if name not in merged:
        raise ValueError(f"the merged weights lack tensor {name!r}; merge again before inspecting distances")
    flat = merged[name].reshape(-1)
    if flat.numel() != numel:
        raise ValueError(f"merged tensor {name!r} has {flat.numel()} entries but the inputs have {numel}; merge again")
    return flat


def _add_rows(rows: dict[str, list], name: str, numel: int, labels: list[str], thresholds: Sequence[float], cutoff: torch.Tensor, acc: dict, has_merge: bool) -> None:
    """Append one tensor's accumulated sums as table rows (see ``Scan``)."""
    layer, n = layer_of(name), len(labels)
    for i, label in enumerate(labels):
        row = dict(name=name, layer=layer, expert=label, numel=numel, sumsq=float(acc["gram"][i, i]), l1=float(acc["l1"][i]), zeros=int(acc["zeros"][i]))
        row |= {below_column(t): int(acc["below"][j, i]) for j, t in enumerate(thresholds)}
        row |= dict(kept=int(acc["inter"][i, i]), kept_l1=float(acc["kept_l1"][i]), threshold=float(cutoff[i]))
        rows["experts"].append(row)
    rows["entries"].append(dict(name=name, layer=layer, numel=numel, **{k: float(acc[k]) for k in ("kept_any", "kept_2plus", "conflicts", "agreement_sum")}))
    for a in range(n):
        for b in range(a + 1, n):
            rows["pairs"].append(dict(name=name, layer=layer, a=labels[a], b=labels[b], dot=float(acc["gram"][a, b]), both_kept=int(acc["inter"][a, b]), sign_dot=int(acc["sdot"][a, b])))
    if has_merge:
        for i, target in enumerate([*labels, "base"]):
            rows["distances"].append(dict(name=name, layer=layer, target=target, dist_sq=float(acc["dist_sq"][i]), ref_sq=float(acc["ref_sq"][i])))
