"""The Sweep tab's handlers: a grid or a search over the Merge tab's method (``evals.study``), drawn as it runs.

Studies live in ``<models folder>/.merge-studies/merge_studies.db`` (hidden: never listed as a model),
so they survive a restart; running the same settings again resumes the study and reuses every cached
score. The best recipe goes to the Merge tab's import box, which merges it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import gradio as gr
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go

from evals import study
from explorer import registry
from explorer.workbench import Workbench
from ui_handlers import DOWNLOADS, _settings, readable, task_folders

STUDIES = ".merge-studies"  # folder of the studies database inside the models folder
GRID, SEARCH = "Grid (1 or 2 parameters)", "Search (every parameter)"
MIX = "mix"  # the grid's weight between two experts


def storage(bench: Workbench) -> Path:
    """The folder of the studies database for the current models folder."""
    return Path(bench.models_dir) / STUDIES


def parameters(method: str, loaded: dict, first: Optional[str] = None, second: Optional[str] = None):
    """The grid's parameter choices for ``method``: its numeric parameters, and ``mix`` with two experts.

    ``first`` and ``second`` (the parameters chosen now) stay chosen while they are among them (a load
    or an imported best recipe keeps the grid as it was); otherwise the first choice and none.
    """
    names = [p.name for p in registry.get(method).params if p.low is not None and not p.setup]
    names += [MIX] if len(loaded.get("labels", [])) == 2 else []
    first = first if first in names else (names[0] if names else None)
    return gr.update(choices=names, value=first), gr.update(
        choices=["", *names], value=second if second in names else ""
    )


def suggested_values(method: str, name: Optional[str]) -> str:
    """Three values to start a grid of ``name`` with; "" for no parameter.

    Half, once and one and a half times its default when those lie in its slider's range (weight,
    lambda: 0.5, 1, 1.5), else a quarter, half and three quarters across that range (density, mix),
    rounded to its step if it has one.
    """
    if not name:
        return ""
    if name == MIX:
        default, low, high, step = 0.5, 0.0, 1.0, 0.05
    else:
        p = registry.get(method).param(name)
        high = p.high if p.high is not None else max(p.low + 1, 2 * p.default)  # open above: twice the default
        default, low, high, step = float(p.default), float(p.low), float(high), p.step
    around = [default * f for f in (0.5, 1.0, 1.5)]
    inside = default and low <= min(around) and max(around) <= high
    points = around if inside else [low + (high - low) * f for f in (0.25, 0.5, 0.75)]
    return ", ".join(f"{round(round(v / step) * step, 6) if step else v:g}" for v in points)


def _values(text: str, name: str) -> list[float]:
    try:
        values = [float(v) for v in text.replace(";", ",").split(",") if v.strip()]
    except ValueError as e:
        raise ValueError(f"values of {name}: give numbers separated by commas, e.g. 0.5, 1, 1.5 ({e})") from None
    if not values:
        raise ValueError(f"give at least one value for {name}")
    return values


def _fixed(bench: Workbench, values: dict, method: str, swept: list[str]) -> dict:
    """The Merge tab's settings of every parameter not swept, in the study's names (``density[0]``)."""
    parameters, per_model = _settings(bench, values, method)
    fixed = {k: v for k, v in parameters.items() if k not in swept}
    for i, settings in enumerate(per_model):
        fixed.update(
            {f"{k}[{i}]": v for k, v in settings.items() if k not in swept and not (MIX in swept and k == "weight")}
        )
    return fixed


def figure(table: pd.DataFrame) -> go.Figure:
    """A grid of two parameters as heatmaps (held-in, held-out), of one as curves; a search as the trials' scores."""
    done = table[table["state"] == "COMPLETE"]
    params = [c for c in table.columns if c.startswith("params_")]
    kind = table.attrs.get("kind")
    scores = ["held_in_mean"] + (["held_out_mean"] if done["held_out_mean"].notna().any() else [])
    if kind == "grid" and len(params) == 2:
        long = done.melt(id_vars=params, value_vars=scores, var_name="score", value_name="mean")
        fig = px.density_heatmap(
            long, x=params[1], y=params[0], z="mean", facet_col="score", histfunc="avg", text_auto=".2f"
        )
    elif kind == "grid":
        long = done.melt(id_vars=params, value_vars=scores, var_name="score", value_name="mean")
        fig = px.line(long.sort_values(params[0]), x=params[0], y="mean", color="score", markers=True)
    else:
        long = done.melt(id_vars=["trial"], value_vars=scores, var_name="score", value_name="mean")
        fig = px.scatter(long, x="trial", y="mean", color="score")
    fig.update_layout(title=f"{table.attrs.get('method')} {kind}: mean primary score per trial")
    return fig


def run(
    bench: Workbench,
    values: dict,
    method: str,
    kind: str,
    first: str,
    first_values: str,
    second: str,
    second_values: str,
    trials: float,
    sampler: str,
    held_in: list[str],
    held_out: list[str],
    limit: float,
    progress=gr.Progress(),
):
    """Run (or resume) the study: (status, table, figure, CSV file, JSON file, study name).

    The Cancel button (``ui_handlers.cancel``) stops it after the current trial; what finished stays in the study.
    """
    try:
        session = bench.require_session()
        if not held_in:
            raise ValueError("tick at least one held-in task: their mean score is what the study maximizes")
        bench.cancel_requested = False
        common = dict(
            held_out=held_out,
            limit=int(limit) or None,
            progress=lambda f, m: progress(f, desc=m),
            cancel=lambda: bench.cancel_requested,
        )
        if kind == GRID:
            grid = {first: _values(first_values, first)}
            if second:
                grid[second] = _values(second_values, second)
            fixed = _fixed(bench, values, method, list(grid))
            run_study = study.run_grid(
                session, method, grid, held_in, task_folders(bench), storage(bench), fixed=fixed, **common
            )
        else:
            run_study = study.run_search(
                session, method, int(trials), held_in, task_folders(bench), storage(bench), sampler=sampler, **common
            )
        table = study.study_table(storage(bench), run_study.study_name)
    except Exception as e:
        return readable(e), gr.update(), gr.update(), gr.update(), gr.update(), gr.update()
    stem = DOWNLOADS / run_study.study_name
    csv, json_file = (
        study.export_table(table, stem.with_suffix(".csv")),
        study.export_table(table, stem.with_suffix(".json")),
    )
    finished = int((table["state"] == "COMPLETE").sum())
    best = table.loc[table["held_in_mean"].idxmax()] if finished else None
    cancelled, bench.cancel_requested = bench.cancel_requested, False
    message = f"Study **{run_study.study_name}**: {finished} finished trial(s)" + (" (cancelled)" if cancelled else "")
    if best is not None:
        message += f"; best held-in mean {best['held_in_mean']:.3f} (trial {best['trial']})"
    shown = table.drop(columns=["recipe"]).round(4)
    return message, shown, figure(table), str(csv), str(json_file), run_study.study_name


def best_recipe(bench: Workbench, name: str) -> tuple[str, str]:
    """(status, the best trial's recipe as YAML for the Merge tab's import box)."""
    try:
        if not name:
            raise ValueError("run a sweep or a search first")
        recipe = study.best_recipe(storage(bench), name)
    except Exception as e:
        return readable(e), gr.update()
    return f"Loaded the best recipe of {name} into the Merge tab.", recipe.to_yaml()
