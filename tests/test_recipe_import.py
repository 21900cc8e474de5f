"""A mergekit recipe pasted into the app: gradients and slices merge as written, or get a clear message."""

from __future__ import annotations

import pytest

import ui_handlers as ui
from explorer.workbench import Workbench
from tests.tiny import tiny_family


def _no_progress(*_args, **_kwargs) -> None:
    return None


@pytest.fixture()
def bench(tmp_path) -> Workbench:
    tiny_family(tmp_path / "models")
    return Workbench(tmp_path / "models")


def _import(bench: Workbench, text: str) -> tuple[dict, str]:
    values = {}
    out = ui.import_recipe(bench, values, text, None, {"version": 0}, progress=_no_progress)
    return values, out[3]  # bench, method, state, then the merge status


def test_gradient_recipe_merges_as_written_and_says_so(bench):
    root = bench.models_dir
    text = f"""
merge_method: ties
base_model: {root / "base"}
models:
  - model: {root / "expert0"}
    parameters: {{weight: [0.2, 1.0], density: [{{filter: mlp, value: 0.5}}, {{value: 0.9}}]}}
  - model: {root / "expert1"}
    parameters: {{weight: 3.0, density: 0.7}}
parameters: {{lambda: 0.9}}
"""
    values, message = _import(bench, text)
    assert message.startswith("Merged 2 model(s) with ties"), message
    assert "expert0.weight" in message and "expert0.density" in message and "Merged as written" in message
    assert values["lambda"] == 0.9 and values["weight · expert1"] == 3.0
    assert "weight · expert0" not in values  # a gradient is not a slider value
    assert bench.recipe.varying()


def test_layer_stacking_recipe_is_refused_with_what_to_do(bench):
    root = bench.models_dir
    text = f"""
merge_method: passthrough
slices:
  - sources: [{{model: {root / "expert0"}, layer_range: [0, 2]}}]
  - sources: [{{model: {root / "expert1"}, layer_range: [1, 2]}}]
"""
    _, message = _import(bench, text)
    assert "python -m explorer merge RECIPE.yaml --out DIR" in message
    assert bench.merged is None
