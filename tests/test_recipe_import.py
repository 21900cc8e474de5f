"""A mergekit recipe pasted into the app: gradients and slices merge as written, or get a clear message."""

from __future__ import annotations

import pytest

import ui_handlers as ui
from explorer.inspect.recipe_curves import recipe_curves, recipe_curves_figure
from explorer.recipe import MergeRecipe
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
    return values, out[5], out[-1]  # bench, method, dtype, seed, state, the merge status, ..., the curves


def test_the_controls_take_the_imported_recipes_method_dtype_seed_and_values(bench):
    """The method, dtype and seed controls show the imported recipe, so the next Live move keeps them."""
    root = bench.models_dir
    text = f"""
merge_method: linear
models:
  - {{model: {root / "expert0"}, parameters: {{weight: 0.3}}}}
  - {{model: {root / "expert1"}, parameters: {{weight: 0.7}}}}
parameters: {{normalize: false}}
dtype: bfloat16
seed: 7
"""
    values = {}
    out = ui.import_recipe(bench, values, text, None, {"version": 0}, progress=_no_progress)
    assert out[1:4] == ("linear", "bfloat16", 7)
    assert out[5].startswith("Merged 2 model(s) with linear"), out[5]
    recipe, status = ui.current_recipe(bench, values, "linear", "bfloat16", 7)
    assert recipe == bench.recipe.to_yaml()  # normalize false and the weights: the controls make this recipe
    assert status == ui.gr.update()  # so no "Settings changed" over the merge's status


def _normalize(method: str):
    return next(p for p in ui.registry.get(method).params if p.name == "normalize")


def test_a_setting_carries_to_another_method_only_under_the_same_default():
    """dare_ties' normalize (default off) left as it was must not make linear (default on) a sum."""
    values = {}
    ui.remember(values, "dare_ties", "normalize", False)
    assert ui.remembered(values, _normalize("linear"), "normalize") is True
    ui.remember(values, "linear", "normalize", False)  # the user's own choice on linear ...
    assert ui.remembered(values, _normalize("linear"), "normalize") is False
    assert ui.remembered(values, _normalize("ties"), "normalize") is False  # ... carries to ties (default on too)
    assert ui.remembered(values, _normalize("task_arithmetic"), "normalize") is False  # its own default
    ui.remember(values, "ties", "lambda", 0.8)
    lam = next(p for p in ui.registry.get("dare_ties").params if p.name == "lambda")
    assert ui.remembered(values, lam, "lambda") == 0.8


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
    values, message, curves = _import(bench, text)
    assert message.startswith("Merged 2 model(s) with ties"), message
    assert "expert0.weight" in message and "expert0.density" in message and "Merged as written" in message
    assert values["lambda"] == 0.9 and values["weight · expert1"] == 3.0
    assert "weight · expert0" not in values  # a gradient is not a slider value
    assert bench.recipe.varying() and curves["visible"]
    assert bench.history[-1].label == "#1 ties (weight=per-layer,3, lambda=0.9, density=per-layer,0.7)"
    names = {trace.name for trace in curves["value"].data}
    assert "weight · expert0 · input_layernorm.weight +8" in names  # one curve for all 9 tensors of a layer
    assert {"density · expert0 · mlp.down_proj.weight +2", "density · expert0 · input_layernorm.weight +5"} <= names


def test_layer_stacking_recipe_is_refused_with_what_to_do(bench):
    root = bench.models_dir
    text = f"""
merge_method: passthrough
slices:
  - sources: [{{model: {root / "expert0"}, layer_range: [0, 2]}}]
  - sources: [{{model: {root / "expert1"}, layer_range: [1, 2]}}]
"""
    _, message, curves = _import(bench, text)
    assert curves["visible"] is False
    assert "python -m explorer merge RECIPE.yaml --out DIR" in message
    assert bench.merged is None


def test_curves_follow_the_gradient_and_split_by_filter():
    recipe = MergeRecipe.from_yaml(
        """
merge_method: ties
base_model: /m/b
models:
  - model: /m/a
    parameters: {weight: [0, 0.3, 0.7, 1]}
parameters:
  lambda: [{filter: mlp, value: [0.5, 1]}, {value: 0.9}]
"""
    )
    names = ["model.embed_tokens.weight"] + [f"model.layers.{i}.{m}.weight" for i in range(4) for m in ("mlp", "attn")]
    table = recipe_curves(recipe, names)
    weight = table[table["param"] == "weight"]
    assert weight["tensors"].unique().tolist() == ["mlp.weight, attn.weight"] and weight["model"].eq("/m/a").all()
    assert weight["value"].tolist() == pytest.approx([0.0, 0.3, 0.7, 1.0])
    lam = table[table["param"] == "lambda"].groupby("tensors")["value"].apply(list).to_dict()
    assert lam["attn.weight"] == [0.9] * 4 and lam["mlp.weight"] == pytest.approx([0.5, 2 / 3, 5 / 6, 1.0])
    assert len(recipe_curves_figure(table).data) == 3


def test_the_app_reads_and_writes_only_inside_its_models_folder(bench, tmp_path):
    """A recipe's model outside the models folder is refused before loading; so is an export there."""
    tiny_family(tmp_path / "elsewhere")
    text = f"""
merge_method: linear
models:
  - {{model: {tmp_path / "elsewhere" / "expert0"}}}
  - {{model: {bench.models_dir / "expert1"}}}
"""
    values, message, _ = _import(bench, text)
    assert "is outside the models folder" in message and bench.session is None, message
    _import(bench, text.replace(str(tmp_path / "elsewhere"), str(bench.models_dir)))
    assert bench.merged is not None
    for folder in ("../escape", str(tmp_path / "elsewhere" / "out"), "~/merge-explorer-out"):
        assert "is outside the models folder" in ui.describe_target(bench, folder)
        assert "is outside the models folder" in ui.export(bench, folder, False)[0]
    assert not (tmp_path / "escape").exists() and not (tmp_path / "elsewhere" / "out").exists()
    assert ui.export(bench, "merges/inside", False)[0].startswith("Saved")


def test_a_recipe_that_is_not_yaml_gets_its_line_and_column(bench):
    text = "merge_method: ties\nmodels:\n  - model: x\n   parameters: {}\n"
    _, message, _ = _import(bench, text)
    assert "the recipe is not valid YAML at line 4, column 4: expected &lt;block end>" in message, message
    assert "check the indentation" in message
