"""Interference between task vectors, and how far a merge moved: tables from one ``Scan``.

All tables here are exact (sums over every entry). "Kept" is the magnitude trim of TIES
(arXiv:2306.01708) at the scan's density, per tensor and expert, restricted to nonzero entries.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from explorer.inspect.scan import Scan, grouped_sum, with_attrs


def _square(scan: Scan, diagonal: pd.Series, off: pd.Series) -> np.ndarray:
    """(N, N) matrix with ``diagonal`` (indexed by expert) and symmetric ``off`` (indexed by (a, b))."""
    index = {label: i for i, label in enumerate(scan.labels)}
    out = np.diag(diagonal.reindex(scan.labels).to_numpy(dtype=float))
    for (a, b), value in off.items():
        out[index[a], index[b]] = out[index[b], index[a]] = value
    return out


def _matrix(scan: Scan, values: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame(values, index=pd.Index(scan.labels, name="expert"), columns=list(scan.labels))


def cosine_similarity(scan: Scan) -> pd.DataFrame:
    """(N, N) cosine similarity of whole-model task vectors, index and columns the expert labels.

    cos(a, b) = sum_t <x_a,t, x_b,t> / (||x_a|| ||x_b||) over all tensors t, from exact dot products;
    in [-1, 1], NaN where a task vector is all zero.
    """
    gram = _square(scan, scan.experts.groupby("expert")["sumsq"].sum(), scan.pairs.groupby(["a", "b"])["dot"].sum())
    norms = np.sqrt(np.diag(gram))
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = gram / np.outer(norms, norms)
    return with_attrs(_matrix(scan, cos), scan, True, "exact dot products accumulated tensor by tensor")


def jaccard(scan: Scan) -> pd.DataFrame:
    """(N, N) Jaccard overlap |K_a & K_b| / |K_a | K_b| of the entries each expert keeps at the density.

    K_a: entries of expert a kept by the per-tensor magnitude trim (top density share of |x|, nonzero),
    over the whole model. In [0, 1]; 1 on the diagonal; NaN where neither keeps anything.
    """
    kept = scan.experts.groupby("expert")["kept"].sum()
    inter = _square(scan, kept, scan.pairs.groupby(["a", "b"])["both_kept"].sum())
    sizes = kept.reindex(scan.labels).to_numpy(dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        overlap = inter / (sizes[:, None] + sizes[None, :] - inter)
    return with_attrs(_matrix(scan, overlap), scan, True, "exact top-density magnitude masks per tensor")


def pair_label(a: str, b: str) -> str:
    """Column label of the expert pair (a, b) in conflict tables."""
    return f"{a} | {b}"


def sign_conflict(scan: Scan, by: str = "layer") -> pd.DataFrame:
    """Sign-conflict rate among kept entries, per ``by`` group ("tensor", "layer", "model").

    Rows (group, pair): pair "all" counts entries kept by >= 2 experts (``kept``) and those among them
    whose kept values have both signs (``conflicts``); pair "a | b" counts entries both a and b keep
    and those where their signs differ. conflict_rate = conflicts / kept in [0, 1], NaN where kept = 0.
    This is the disagreement TIES resolves by sign election.
    """
    every = grouped_sum(scan.entries, by, [], ["kept_2plus", "conflicts"]).rename(columns={"kept_2plus": "kept"})
    every.insert(1, "pair", "all")
    pairs = grouped_sum(scan.pairs, by, ["a", "b"], ["both_kept", "sign_dot"])
    pairs = pd.DataFrame(
        {
            by: pairs[by],
            "pair": [pair_label(a, b) for a, b in zip(pairs["a"], pairs["b"], strict=True)],
            "kept": pairs["both_kept"],
            "conflicts": (pairs["both_kept"] - pairs["sign_dot"]) // 2,  # agree - disagree = sign_dot
        }
    )
    out = pd.concat([every, pairs], ignore_index=True)
    order = {g: i for i, g in enumerate(dict.fromkeys(every[by]))}
    out = out.sort_values(by, key=lambda s: s.map(order), kind="stable", ignore_index=True)
    out["conflict_rate"] = out["conflicts"] / out["kept"].where(out["kept"] > 0)
    return with_attrs(out, scan, True, "exact counts over the top-density magnitude masks")


def sign_agreement(scan: Scan, by: str = "layer") -> pd.DataFrame:
    """Sign agreement ratio of the kept entries, per ``by`` group.

    For an entry kept (nonzero, in the trim) by at least one expert, with s_i = sign(x_i) on kept
    entries and 0 elsewhere: r = |sum_i s_i| / sum_i |s_i|, i.e. 1 when all kept signs agree (or one
    expert keeps it) and 0 when they split evenly. agreement = mean of r over those entries (count in
    ``kept_any``), in [0, 1], NaN where nothing is kept. With two experts it is
    1 - (entries both keep with opposite signs) / (entries either keeps).
    """
    out = grouped_sum(scan.entries, by, [], ["kept_any", "agreement_sum"])
    out["agreement"] = out["agreement_sum"] / out["kept_any"].where(out["kept_any"] > 0)
    return with_attrs(out.drop(columns="agreement_sum"), scan, True, "exact over the top-density magnitude masks")


def merge_distance(scan: Scan, by: str = "layer") -> pd.DataFrame:
    """L2 distance of the merged weights from the base and from each expert, per ``by`` group.

    Rows (group, target): distance = ||W_merged - W_target||_2 over the group's entries,
    reference_norm = ||W_target||_2, relative = distance / reference_norm (NaN if that is 0).
    Raises ValueError when the scan had no merge.
    """
    if scan.distances is None:
        raise ValueError("no merge was given to the scan; pass merged={name: tensor} to measure distances")
    out = grouped_sum(scan.distances, by, ["target"], ["dist_sq", "ref_sq"])
    out["distance"], out["reference_norm"] = np.sqrt(out["dist_sq"]), np.sqrt(out["ref_sq"])
    out["relative"] = out["distance"] / out["reference_norm"].where(out["reference_norm"] > 0)
    return with_attrs(out.drop(columns=["dist_sq", "ref_sq"]), scan, True, "exact sums of squares tensor by tensor")
