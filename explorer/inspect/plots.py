"""Plotly figures of the stats tables, and ``inspect_panels``, the Inspect view's single entry point.

Figures only draw: each ``*_figure`` takes the DataFrame a ``stats`` function returned and plots its
values unchanged (``conflict_matrix`` only pivots one for a heatmap); ``inspect_panels`` draws the
tables ``stats.inspect_tables`` computed. Sampled tables say their sample size in the figure title.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import pandas as pd
import plotly.graph_objects as go
import torch

from explorer.inspect import stats
from explorer.progress import Progress

PANEL_KEYS = stats.PANEL_KEYS  # the Inspect view's panels, in display order


@dataclass(frozen=True)
class Panel:
    """One slot of the Inspect view."""

    key: str  # one of PANEL_KEYS
    title: str  # short heading
    caption: str  # one or two sentences: what the figure measures
    figure: go.Figure
    table: pd.DataFrame  # the data behind the figure (CSV download); empty when the panel has none


def _title(text: str, table: pd.DataFrame) -> str:
    """``text`` plus the sample size when ``table`` was computed from samples."""
    if table.attrs.get("exact", True):
        return text
    return f"{text} <sup>(sampled: {table.attrs['sample_size']:,} entries per tensor, {table.attrs['samples']:,} in all)</sup>"


def _layout(fig: go.Figure, title: str, **axes: str) -> go.Figure:
    fig.update_layout(title=title, margin={"l": 60, "r": 20, "t": 60, "b": 50}, legend_title_text="")
    fig.update_xaxes(title=axes.get("x"))
    fig.update_yaxes(title=axes.get("y"))
    return fig


def _heatmap(
    table: pd.DataFrame,
    title: str,
    zmin: float,
    zmax: float,
    unit: str,
    colorscale: str = "Viridis",
    text: bool = False,
) -> go.Figure:
    """Heatmap of a wide table: y = index (categories, first row on top), x = columns, z = values.

    ``unit`` titles the colorbar.
    """
    trace = go.Heatmap(
        z=table.to_numpy(dtype=float),
        x=[str(c) for c in table.columns],
        y=[str(i) for i in table.index],
        zmin=zmin,
        zmax=zmax,
        colorscale=colorscale,
        texttemplate="%{z:.2f}" if text else None,
        colorbar={"title": {"text": unit, "side": "right"}},
    )
    fig = _layout(go.Figure(trace), title, x=table.columns.name or "", y=table.index.name or "")
    fig.update_yaxes(type="category", autorange="reversed")
    fig.update_xaxes(type="category")
    return fig


def message_figure(message: str) -> go.Figure:
    """An empty figure that says ``message`` (a panel with nothing to draw yet)."""
    fig = go.Figure()
    fig.add_annotation(text=message, x=0.5, y=0.5, xref="paper", yref="paper", showarrow=False, font={"size": 14})
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return fig


def histogram_figure(table: pd.DataFrame, title: str = "Task-vector values") -> go.Figure:
    """Step lines of ``stats.histogram`` (or ``dare_effect``) counts at bin centres, log count axis.

    One trace per expert (and stage, dashed after), all on the same bins; earlier traces are drawn
    wider so that identical histograms stay visible. The count axis says whether it counts every
    entry or the sampled ones.
    """
    fig = go.Figure()
    keys = ["expert", "stage"] if "stage" in table else ["expert"]
    groups = list(table.groupby(keys, sort=False))
    for i, (key, rows) in enumerate(groups):
        dash = "dash" if "stage" in table and key[1] == "after" else "solid"
        width = 1.5 + 2.5 * (len(groups) - 1 - i) / max(
            len(groups) - 1, 1
        )  # earlier traces wider: coinciding lines stay visible
        fig.add_trace(
            go.Scatter(
                x=(rows["left"] + rows["right"]) / 2,
                y=rows["count"],
                name=" ".join(key),
                mode="lines",
                line_shape="hvh",
                line={"dash": dash, "width": width},
            )
        )
    # a sampled entry counts for numel / sample of its tensor: the counts are whole-model estimates
    counted = (
        "entries (log scale)" if table.attrs.get("exact", True) else "entries, estimated from the sample (log scale)"
    )
    fig = _layout(fig, _title(title, table), x="task-vector value (M_i - B)", y=counted)
    return fig.update_yaxes(type="log")


def layer_norms_figure(table: pd.DataFrame) -> go.Figure:
    """Heatmap layer x expert of ``stats.layer_norms``."""
    return _heatmap(
        table, "L2 norm of the task vector per layer", 0, float(table.max().max()), "L2 norm (weight units)"
    )


def quantiles_figure(table: pd.DataFrame) -> go.Figure:
    """Per-layer box of ``stats.delta_quantiles`` (by layer), one trace per expert.

    Box from q0.25 to q0.75 with the median, whiskers at q0.01 and q0.99.
    """
    fig = go.Figure()
    for expert, rows in table.groupby("expert", sort=False):
        fig.add_trace(
            go.Box(
                x=rows["layer"],
                q1=rows["q0.25"],
                median=rows["q0.5"],
                q3=rows["q0.75"],
                lowerfence=rows["q0.01"],
                upperfence=rows["q0.99"],
                name=expert,
            )
        )
    fig = _layout(
        fig, _title("Task-vector quantiles per layer (whiskers q0.01-q0.99)", table), x="layer", y="task-vector value"
    )
    return fig.update_layout(boxmode="group").update_xaxes(type="category")


def layer_stats_figure(table: pd.DataFrame) -> go.Figure:
    """Heatmap layer x statistic of ``stats.layer_stats`` (all shares in [0, 1])."""
    return _heatmap(table, "Per-layer shares: small deltas, zeros, kept mass, sign conflict", 0, 1, "share (0-1)")


def cosine_figure(table: pd.DataFrame) -> go.Figure:
    """Heatmap expert x expert of ``stats.cosine_similarity``, values written in the cells."""
    return _heatmap(table, "Cosine similarity of task vectors", -1, 1, "cosine (-1 to 1)", colorscale="RdBu", text=True)


def jaccard_figure(table: pd.DataFrame) -> go.Figure:
    """Heatmap expert x expert of ``stats.jaccard``, values written in the cells."""
    return _heatmap(
        table,
        f"Overlap (Jaccard) of kept entries at density {table.attrs['density']:g}",
        0,
        1,
        "Jaccard (0-1)",
        text=True,
    )


def conflict_matrix(table: pd.DataFrame) -> pd.DataFrame:
    """``stats.sign_conflict`` (by layer) as a wide table: layer x pair of conflict_rate, in table order."""
    wide = table.pivot(index="layer", columns="pair", values="conflict_rate")
    wide = wide.reindex(index=list(dict.fromkeys(table["layer"])), columns=list(dict.fromkeys(table["pair"])))
    wide.attrs = dict(table.attrs)
    return wide


def sign_conflict_figure(table: pd.DataFrame) -> go.Figure:
    """Heatmap layer x pair of the conflict rate in ``stats.sign_conflict`` (by layer)."""
    return _heatmap(
        conflict_matrix(table),
        f"Sign conflicts among kept entries at density {table.attrs['density']:g}",
        0,
        1,
        "conflict rate (share of kept entries)",
    )


def kept_mass_figure(table: pd.DataFrame) -> go.Figure:
    """``stats.kept_mass``: one curve per expert over the density grid, marked at the current density.

    The exact value at the current density is a marker, with a vertical line at that density.
    """
    fig = go.Figure()
    for expert, rows in table.groupby("expert", sort=False):
        curve, now = rows[~rows["current"]], rows[rows["current"]]
        fig.add_trace(
            go.Scatter(x=curve["density"], y=curve["kept_mass"], name=expert, mode="lines+markers", legendgroup=expert)
        )
        fig.add_trace(
            go.Scatter(
                x=now["density"],
                y=now["kept_mass"],
                name=f"{expert} (exact, current)",
                mode="markers",
                marker={"size": 11, "symbol": "diamond"},
                legendgroup=expert,
            )
        )
    density = table.attrs["density"]
    fig.add_vline(x=density, line_dash="dot", annotation_text=f"density {density:g}")
    fig = _layout(
        fig,
        _title("L1 mass kept by the magnitude trim", table),
        x="density (share of entries kept)",
        y="share of L1 mass kept",
    )
    return fig.update_yaxes(range=[0, 1.02])


def merge_distance_figure(table: pd.DataFrame) -> go.Figure:
    """Relative distance of the merge from each target per layer.

    Rows of ``stats.merge_distance_table``: by layer; rows with layer "all" hold the totals shown in
    the legend.
    """
    fig = go.Figure()
    for target, rows in table.groupby("target", sort=False):
        layers, total = rows[rows["layer"] != "all"], rows.loc[rows["layer"] == "all", "relative"]
        name = f"{target} (total {float(total.iloc[0]):.2%})" if len(total) else target
        fig.add_trace(go.Scatter(x=layers["layer"], y=layers["relative"], name=name, mode="lines+markers"))
    fig = _layout(fig, "How far the merge moved: ||merged - W|| / ||W|| per layer", x="layer", y="relative L2 distance")
    return fig.update_xaxes(type="category")


PAIR_PANELS = ("cosine", "sign_conflict", "jaccard")  # panels about pairs of experts: need two or more

_TEXT = {
    "histogram": (
        "Delta histogram",
        "Distribution of task-vector values M_i - B for each expert over the whole model, counts on a log scale and the same bins for every expert.",
    ),
    "layer_norms": (
        "Task-vector norm per layer",
        "L2 norm of each expert's task vector per layer: where fine-tuning moved the weights most.",
    ),
    "quantiles": (
        "Delta quantiles per layer",
        "Spread of task-vector values per layer and expert: box from the 25th to the 75th percentile, whiskers at the 1st and 99th.",
    ),
    "layer_stats": (
        "Per-layer statistics",
        "Per layer: share of deltas below the threshold, exact zeros and L1 mass kept by the magnitude trim per expert, and the sign conflict and agreement among kept entries.",
    ),
    "cosine": (
        "Cosine similarity",
        "Cosine similarity between the experts' whole-model task vectors; near 0 means nearly orthogonal updates, negative means opposing ones.",
    ),
    "sign_conflict": (
        "Sign conflicts by layer",
        "Share of entries kept by the magnitude trim in two or more experts whose signs disagree, per layer, for all experts and each pair; TIES resolves these by sign election.",
    ),
    "jaccard": (
        "Kept-entry overlap",
        "Jaccard overlap between the entries each expert keeps at the current density: 1 means the trims keep the same entries.",
    ),
    "kept_mass": (
        "Mass kept vs density",
        "Share of each task vector's L1 mass that the magnitude trim keeps as density varies; the marker is the exact value at the current density.",
    ),
    "merge_distance": (
        "Distance of the merge",
        "How far the merged weights moved from the base and from each expert, as L2 distance relative to that model's norm, per layer.",
    ),
    "dare_effect": (
        "DARE drop and rescale",
        "Task-vector distribution before and after DARE's random drop at the current density and 1/density rescale (dashed): dropped entries pile up at zero, kept ones spread out.",
    ),
}


def _panel(key: str, figure: go.Figure, table: pd.DataFrame) -> Panel:
    title, caption = _TEXT[key]
    return Panel(key=key, title=title, caption=caption, figure=figure, table=table)


def _placeholder(key: str, message: str) -> Panel:
    return _panel(key, message_figure(message), pd.DataFrame())


_FIGURES: dict[str, Callable[[pd.DataFrame], go.Figure]] = {
    "histogram": histogram_figure,
    "layer_norms": layer_norms_figure,
    "quantiles": quantiles_figure,
    "layer_stats": layer_stats_figure,
    "cosine": cosine_figure,
    "sign_conflict": sign_conflict_figure,
    "jaccard": jaccard_figure,
    "kept_mass": kept_mass_figure,
    "merge_distance": merge_distance_figure,
    "dare_effect": lambda t: histogram_figure(t, "DARE: before and after drop + rescale"),
}


def inspect_panels(
    source: stats.TaskVectorSource,
    density: float,
    merged: Mapping[str, torch.Tensor] | None = None,
    threshold: float = 0.005,
    sample: int = stats.DEFAULT_SAMPLE,
    seed: int = 0,
    progress: Progress | None = None,
) -> list[Panel]:
    """All Inspect panels, in ``PANEL_KEYS`` order: the figures of ``stats.inspect_tables``.

    Arguments as ``stats.inspect_tables`` (source: a MergeSession, ``stats.DiskTaskVectors`` or any
    ``stats.TaskVectorSource``; density in [0, 1]; merged: the current merge or None; threshold: the
    |delta| of the share-below statistic; sample: entries sampled per tensor). Panels that cannot be
    drawn (no merge yet; merge distances without base weights; a source with no base, hence no task
    vectors; the pair panels of a single expert) hold a figure saying why and an empty table, so every
    key is always present. A source with a ``scan_cache`` (a MergeSession) keeps the panels that do
    not depend on the merge there, per settings: a refresh after a new merge draws only the merge's.
    Raises ValueError on out-of-range arguments (see ``stats.scan``).
    """
    cache = getattr(source, "scan_cache", None)
    settings = ("panels", density, threshold, sample, seed)
    kept = cache.get(settings, {}) if cache is not None else {}
    wanted = [key for key in stats.PANEL_KEYS if key not in kept]
    tables = stats.inspect_tables(source, density, merged, threshold, sample, seed, progress, keys=wanted)
    if "cosine" in tables and isinstance(tables["cosine"], pd.DataFrame) and len(tables["cosine"]) < 2:
        tables.update(  # one expert: nothing to compare
            dict.fromkeys(PAIR_PANELS, "Choose two or more experts: this panel compares experts with each other.")
        )
    drawn = {
        key: _placeholder(key, table) if isinstance(table, str) else _panel(key, _FIGURES[key](table), table)
        for key, table in tables.items()
    }
    if cache is not None:
        cache[settings] = {key: panel for key, panel in drawn.items() if key not in stats.MERGE_TABLES} | kept
    return [kept.get(key) or drawn[key] for key in stats.PANEL_KEYS]
