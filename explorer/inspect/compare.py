"""Two merges side by side: how far each moved from the base, and how far apart they are, per layer.

Exact (every entry), one pass over the tensor names; holds one tensor of each merge at a time.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pandas as pd
import plotly.graph_objects as go
import torch

from explorer.inspect.stats import layer_of, layer_rank


def merge_comparison(
    base: Mapping[str, torch.Tensor],
    first: tuple[str, Mapping[str, torch.Tensor]],
    second: tuple[str, Mapping[str, torch.Tensor]],
    names: Sequence[str],
) -> pd.DataFrame:
    """Relative L2 distances per layer: each merge from the base, and the first merge from the second.

    Args:
        base: {name: (*S) tensor} base weights.
        first: (label, {name: (*S) tensor}) of a merge of the same models (any float dtype).
        second: the same for the other merge.
        names: tensor names to compare (the merge's names).

    Returns:
        Rows (layer, pair, relative) in model order, then the whole-model rows with layer "all":
        ``relative`` = ||X - Y|| / ||Y|| (float, >= 0) for the pairs "A vs base", "B vs base" and
        "A vs B" (relative to B). Raises KeyError when a name is missing from an input.
    """
    (a_label, a), (b_label, b) = first, second
    pairs = {f"{a_label} vs base": (a, base), f"{b_label} vs base": (b, base), f"{a_label} vs {b_label}": (a, b)}
    squares: dict[tuple[str, str], list[float]] = {}  # (layer, pair) -> [||X - Y||^2, ||Y||^2]
    for name in names:
        layer = layer_of(name)
        for pair, (x, y) in pairs.items():
            x32, y32 = x[name].float(), y[name].float()
            acc = squares.setdefault((layer, pair), [0.0, 0.0])
            acc[0] += float(torch.sum((x32 - y32) ** 2))
            acc[1] += float(torch.sum(y32**2))
    rows = [{"layer": layer, "pair": pair, "diff2": d, "ref2": r} for (layer, pair), (d, r) in squares.items()]
    table = pd.DataFrame(rows)
    total = table.groupby("pair", sort=False, as_index=False)[["diff2", "ref2"]].sum().assign(layer="all")
    table = table.sort_values("layer", key=lambda s: s.map(layer_rank), kind="stable")
    table = pd.concat([table, total], ignore_index=True)
    table["relative"] = (table["diff2"] / table["ref2"].where(table["ref2"] > 0)).pow(0.5).fillna(0.0)
    return table[["layer", "pair", "relative"]]


def merge_comparison_figure(table: pd.DataFrame) -> go.Figure:
    """Lines per pair over the layers of ``merge_comparison``'s table; totals in the legend."""
    fig = go.Figure()
    for i, (pair, rows) in enumerate(table.groupby("pair", sort=False)):
        layers, total = rows[rows["layer"] != "all"], float(rows.loc[rows["layer"] == "all", "relative"].iloc[0])
        dash = "dot" if " vs base" not in pair else ("solid" if i == 0 else "dash")  # coinciding lines stay visible
        fig.add_trace(
            go.Scatter(
                x=layers["layer"],
                y=layers["relative"],
                name=f"{pair} (total {total:.2%})",
                mode="lines+markers",
                line={"dash": dash},
            )
        )
    fig.update_layout(
        title="Two merges: distance from the base and from each other, per layer",
        margin={"l": 60, "r": 20, "t": 60, "b": 50},
    )
    fig.update_xaxes(title="layer", type="category")
    fig.update_yaxes(title="relative L2 distance ||X - Y|| / ||Y||")
    return fig
