"""A recipe's per-layer values: gradients and filters drawn as one curve per parameter, model and tensor group.

``recipe_curves`` evaluates every parameter the recipe varies (``MergeRecipe.varying``) at each layer
tensor of the merge, exactly as the merge does (``MergeRecipe.params_at`` over ``MergeRecipe.layout``);
tensors of a layer whose curves are equal over every layer are grouped, so a recipe with filters
``self_attn`` and ``mlp`` draws one curve for each filter. ``recipe_curves_figure`` only draws the table.
"""

from __future__ import annotations

from collections import defaultdict

import pandas as pd
import plotly.graph_objects as go

from explorer import registry
from explorer.recipe import MergeRecipe
from explorer.recipe_layout import layer_index

COLUMNS = ["param", "model", "tensors", "layer", "value"]


def recipe_curves(recipe: MergeRecipe, names: list[str]) -> pd.DataFrame:
    """One row per (varying param, model, group of tensors, output layer) with the value the merge uses.

    names: the input tensor names (``MergeSession.names``). ``model`` is "" for a global param;
    ``tensors`` names the group by its tensors' names after the layer index (``self_attn.q_proj.weight``,
    joined with ", "). Values of choices and flags are their strings. Empty when nothing varies.
    """
    varied = {key.rpartition(".")[2] for key in recipe.varying()}
    spec = registry.get(recipe.merge_method)
    curves: dict[tuple[str, str, str], list[tuple[int, object]]] = defaultdict(list)
    for place in recipe.layout(names):
        layer = layer_index(place.name)
        if layer is None:
            continue
        suffix = place.name.split(f".{layer}.", 1)[1]
        params = recipe.params_at(place)
        for p in spec.params:
            if p.name not in varied:
                continue
            if p.per_model:
                for (model, _), value in zip(place.inputs, params[p.name].tolist(), strict=True):
                    curves[(p.name, model, suffix)].append((layer, value))
            else:
                curves[(p.name, "", suffix)].append((layer, params[p.name]))
    return _grouped(curves)


def _grouped(curves: dict[tuple[str, str, str], list[tuple[int, object]]]) -> pd.DataFrame:
    """The curves with equal points merged into one row set per (param, model), tensors joined."""
    groups: dict[tuple[str, str, tuple], list[str]] = defaultdict(list)
    for (param, model, suffix), points in curves.items():
        groups[(param, model, tuple(points))].append(suffix)
    rows = [
        {"param": param, "model": model, "tensors": ", ".join(suffixes), "layer": layer, "value": value}
        for (param, model, points), suffixes in groups.items()
        for layer, value in points
    ]
    return pd.DataFrame(rows, columns=COLUMNS)


def recipe_curves_figure(table: pd.DataFrame) -> go.Figure:
    """Lines of ``recipe_curves``: value against output layer, one per (param, model, tensor group)."""
    figure = go.Figure()
    for (param, model, tensors), rows in table.groupby(["param", "model", "tensors"], sort=False):
        label = " · ".join(part for part in (param, model.rsplit("/", 1)[-1], _short(tensors)) if part)
        figure.add_trace(go.Scatter(x=rows["layer"], y=rows["value"], mode="lines+markers", name=label))
    figure.update_layout(
        title="Values per layer in this recipe (gradients and filters)",
        xaxis_title="output layer",
        yaxis_title="value",
        legend={"font": {"size": 10}},
    )
    return figure


def _short(tensors: str) -> str:
    """A legend name for a tensor group: its first tensor and how many more."""
    parts = tensors.split(", ")
    return parts[0] + (f" +{len(parts) - 1}" if len(parts) > 1 else "")
