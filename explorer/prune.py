"""Magnitude pruning and mask statistics, for making and inspecting sparse variants of a model.

Pure functions over tensors, and ``prune_to_folder`` (``python -m explorer prune``), which streams a
checkpoint through them into a new folder with the merge writer. A "mask" is where a tensor is
nonzero; the statistics feed the sparse soup (``explorer.methods.sparse_soup``, Sparse Model Soups,
arXiv:2306.16788), whose ingredients share one pruning mask: agreement 1 means the soup stays exactly
as sparse as its ingredients.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping

import torch

from explorer.choices import TrimScope, parse_choice
from explorer.io.checkpoint import Checkpoint, open_checkpoint
from explorer.io.formats.base import DTYPES, check_finite
from explorer.io.writer import check_output_dir, write_checkpoint
from explorer.methods.selection import topk_mask
from explorer.methods.trim_scope import _bin_index, magnitude_histograms

PRUNE_REPORT = "prune_report.json"  # written into every pruned folder: source, settings, sparsity reached


def magnitude_prune(t: torch.Tensor, sparsity: float) -> torch.Tensor:
    """``t`` (*S) with its round(sparsity * numel) smallest-|t| entries set to 0 (a new tensor).

    sparsity: fraction of entries zeroed, in [0, 1]; raises ValueError outside. Magnitude pruning as
    in Han et al. 2015 (arXiv:1506.02626), one tensor at a time.
    """
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    keep = t.numel() - round(sparsity * t.numel())
    return t * topk_mask(t, keep)


def is_weight_matrix(name: str, t: torch.Tensor) -> bool:
    """The default selection of what is pruned: floating tensors of 2 or more dimensions (weights)."""
    return t.is_floating_point() and t.dim() >= 2


def prune_state_dict(
    state: Mapping[str, torch.Tensor],
    sparsity: float,
    select: Callable[[str, torch.Tensor], bool] = is_weight_matrix,
) -> dict[str, torch.Tensor]:
    """Every selected tensor magnitude-pruned to ``sparsity`` per tensor; the others returned as they are.

    select(name, tensor): default prunes floating matrices (weights) and keeps vectors (biases, norms).
    """
    return {name: magnitude_prune(t, sparsity) if select(name, t) else t for name, t in state.items()}


def sparsity(t: torch.Tensor) -> float:
    """Fraction of exact zeros in ``t``, in [0, 1] (0.0 for an empty tensor)."""
    return float((t == 0).sum()) / t.numel() if t.numel() else 0.0


def mask_agreement(x: torch.Tensor) -> float:
    """Jaccard index of the N nonzero masks of x (N, *S): |intersection| / |union|, in [0, 1].

    1.0 when all masks are equal (also when every entry is zero: no disagreement).
    """
    nonzero = x.reshape(x.shape[0], -1) != 0
    union = int(nonzero.any(dim=0).sum())
    return int(nonzero.all(dim=0).sum()) / union if union else 1.0


def soup_report(x: torch.Tensor, merged: torch.Tensor) -> dict[str, object]:
    """Sparsity of each ingredient x (N, *S) and of the soup ``merged`` (*S), and the masks' agreement."""
    return {
        "sparsity_before": [sparsity(m) for m in x],
        "sparsity_after": sparsity(merged),
        "mask_jaccard": mask_agreement(x),
    }


def model_cutoff(tensors: Callable[[], Iterable[torch.Tensor]], keep: int) -> tuple[float, int]:
    """Where the ``keep`` largest |x| over all given tensors end: (v, ties), exact.

    v is the keep-th largest magnitude over every entry of every tensor; ``ties`` is how many entries
    equal to v belong to the top ``keep`` (the first ones in tensor order, then flat index, as
    ``topk_mask`` breaks ties). ``tensors()`` is called twice (a log-magnitude histogram, then the
    entries of the one histogram bin that holds v), so memory stays at one tensor plus that bin.
    keep <= 0 gives (inf, 0); keep >= the number of nonzero entries gives (0.0, 0): every nonzero
    entry is kept.
    """
    if keep <= 0:
        return float("inf"), 0
    hist, nonzero = None, 0
    for t in tensors():
        counts = magnitude_histograms([t.reshape(1, -1).float()])[0]
        hist = counts if hist is None else hist + counts
        nonzero += int(t.count_nonzero())
    if hist is None or keep >= nonzero:
        return 0.0, 0
    above = hist.flip(0).cumsum(0).flip(0)  # above[b]: entries in bins >= b
    b = int((above >= keep).nonzero().max())
    needed = keep - (int(above[b + 1]) if b + 1 < len(above) else 0)
    in_bin = torch.cat([m[(_bin_index(m) == b) & (m > 0)] for m in (t.reshape(-1).abs().float() for t in tensors())])
    v = in_bin.sort(descending=True).values[needed - 1]
    return float(v), needed - int((in_bin > v).sum())


def prune_masks(
    tensors: Callable[[], Iterable[torch.Tensor]], sparsity: float, scope: TrimScope | str = TrimScope.tensor
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(tensor, keep mask) for each tensor ``tensors()`` yields, in order: magnitude pruning to ``sparsity``.

    scope "tensor": each tensor keeps its own numel - round(sparsity * numel) largest |x| (as
    ``magnitude_prune``). scope "model": the whole model keeps total - round(sparsity * total) largest
    |x| over all the tensors together (one global magnitude cutoff, ties by tensor order then flat
    index), so tensors end up with different sparsities; ``tensors()`` is then called three times.
    Raises ValueError for sparsity outside [0, 1] or an unknown scope.
    """
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    if parse_choice(TrimScope, scope, "scope") == TrimScope.tensor:
        for t in tensors():
            yield t, topk_mask(t, t.numel() - round(sparsity * t.numel()))
        return
    total = sum(t.numel() for t in tensors())
    v, ties = model_cutoff(tensors, total - round(sparsity * total))
    for t in tensors():
        magnitude = t.abs().float()
        take = min(int((magnitude == v).sum()), ties)
        ties -= take
        yield t, topk_mask(t, int((magnitude > v).sum()) + take)


@dataclass
class PruneReport:
    """What ``prune_to_folder`` did: settings, tensors pruned, and the sparsity before and after."""

    source: str
    sparsity: float
    scope: str
    pruned_tensors: list[str]
    kept_tensors: list[str]
    sparsity_before: float  # over the pruned tensors together
    sparsity_after: float
    out: str


def prune_to_folder(
    model: str | Path,
    out_dir: str | Path,
    sparsity: float,
    scope: TrimScope | str = TrimScope.tensor,
    overwrite: bool = False,
    select: Callable[[str, torch.Tensor], bool] = is_weight_matrix,
) -> PruneReport:
    """Magnitude-prune checkpoint ``model`` into the new folder ``out_dir``; returns the report.

    ``select(name, tensor)`` chooses the tensors pruned (default: weight matrices and embeddings; norms
    and biases are copied). Each tensor keeps its stored dtype (pruning is computed on float32 and only
    zeroes entries). The folder is written by ``explorer.io.writer`` (hidden temporary folder renamed when
    complete, config, tokenizer, ``prune_report.json``) after the output-folder checks of
    ``check_output_dir`` (never an input, never a folder holding other data). The input is only read:
    twice more for scope "model" (the global cutoff). Raises CheckpointError for a refused output or an
    unreadable input, ValueError for sparsity outside [0, 1] or an unknown scope.
    """
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    scope = parse_choice(TrimScope, scope, "scope")
    checkpoint = open_checkpoint(model)
    out = check_output_dir(out_dir, checkpoint.sources, overwrite)
    chosen = {n for n in checkpoint.names() if select(n, _meta(checkpoint, n))}
    counts = {"numel": 0, "before": 0, "after": 0}

    def read_chosen() -> Iterator[torch.Tensor]:
        for name in (n for n in checkpoint.names() if n in chosen):
            stored = checkpoint.get(name)
            check_finite(checkpoint, name, stored)
            yield stored

    def stream() -> Iterator[tuple[str, torch.Tensor]]:
        pairs = prune_masks(read_chosen, sparsity, scope)
        for name in checkpoint.names():
            if name not in chosen:
                yield name, checkpoint.get(name)
                continue
            stored, mask = next(pairs)
            counts["numel"] += stored.numel()
            counts["before"] += int((stored == 0).sum())
            pruned = stored.masked_fill(~mask, 0)
            counts["after"] += int((pruned == 0).sum())
            yield name, pruned

    report = PruneReport(
        source=str(checkpoint.ref),
        sparsity=sparsity,
        scope=scope.value,
        pruned_tensors=[n for n in checkpoint.names() if n in chosen],
        kept_tensors=[n for n in checkpoint.names() if n not in chosen],
        sparsity_before=0.0,
        sparsity_after=0.0,
        out=str(out),
    )

    def report_text() -> str:  # written last, when every tensor's count is in
        report.sparsity_before = counts["before"] / counts["numel"] if counts["numel"] else 0.0
        report.sparsity_after = counts["after"] / counts["numel"] if counts["numel"] else 0.0
        return json.dumps(asdict(report), indent=2)

    card = (
        f"---\nlibrary_name: transformers\ntags:\n- pruned\n- merge-explorer\nbase_model:\n- {checkpoint.ref}\n---\n\n"
        f"# {checkpoint.name}, magnitude-pruned to sparsity {sparsity} (per {scope.value})\n\n"
        f"Reproduce with `python -m explorer prune {checkpoint.ref} --sparsity {sparsity} --scope {scope.value} --out DIR`; "
        f"the sparsity reached is in `{PRUNE_REPORT}`.\n"
    )
    write_checkpoint(out, stream(), checkpoint, None, overwrite, files={"README.md": card, PRUNE_REPORT: report_text})
    return report


def _meta(checkpoint: Checkpoint, name: str) -> torch.Tensor:
    """An empty tensor with ``name``'s dtype and shape (the ``select`` callback's view, nothing read)."""
    return torch.empty(checkpoint.shape(name), dtype=DTYPES.get(checkpoint.dtype(name), torch.float32), device="meta")
