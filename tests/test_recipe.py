"""MergeRecipe: mergekit-style YAML in and out, validation with clear messages."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from explorer.cli import main as cli_main
from explorer.recipe import MergeRecipe
from explorer.recipe_keys import UNSUPPORTED
from explorer.recipe_layout import TensorPlace

MERGEKIT_DARE_TIES = """
models:
  - model: /m/base
  - model: /m/math
    parameters: {weight: 0.5, density: 0.53}
  - model: /m/code
    parameters: {weight: 0.3, density: 0.4}
merge_method: dare_ties
base_model: /m/base
parameters:
  int8_mask: true
  normalize: true
  rescale: true
dtype: bfloat16
"""


def test_reads_a_mergekit_recipe():
    recipe = MergeRecipe.from_yaml(MERGEKIT_DARE_TIES)
    assert [e.model for e in recipe.models] == ["/m/math", "/m/code"]  # the base listed in models is the base
    params = recipe.resolved_params()
    assert params["rescale"] == "l1"  # mergekit's rescale: true
    torch.testing.assert_close(params["density"], torch.tensor([0.53, 0.4]))
    assert recipe.torch_dtype == torch.bfloat16


def test_yaml_round_trip():
    recipe = MergeRecipe.from_yaml(MERGEKIT_DARE_TIES)
    assert MergeRecipe.from_yaml(recipe.to_yaml()) == recipe


def test_global_per_model_param_applies_to_every_model():
    recipe = MergeRecipe(
        merge_method="ties",
        base_model="b",
        models=[{"model": "a"}, {"model": "c", "parameters": {"density": 0.2}}],
        parameters={"density": 0.7},
    )
    torch.testing.assert_close(recipe.resolved_params()["density"], torch.tensor([0.7, 0.2]))


@pytest.mark.parametrize(
    "data, message",
    [
        ({"merge_method": "tie", "models": [{"model": "a"}]}, "Did you mean ties"),
        ({"merge_method": "ties", "models": [{"model": "a"}]}, "needs base_model"),
        (
            {"merge_method": "ties", "base_model": "b", "models": [{"model": "a", "parameters": {"density": 1.5}}]},
            r"a: density=1.5 is outside",
        ),
        (
            {"merge_method": "linear", "models": [{"model": "a"}], "parameters": {"densty": 0.5}},
            "has no parameter 'densty'",
        ),
        ({"merge_method": "linear", "models": []}, "at least one model"),
        ({"merge_method": "slerp", "base_model": "b", "models": [{"model": "a"}, {"model": "c"}]}, "takes 1 model"),
    ],
)
def test_bad_recipes_say_what_is_wrong(data, message):
    with pytest.raises((ValidationError, KeyError), match=message):
        MergeRecipe.model_validate(data)


# mergekit's configuration language: gradients, filters, slices, refusals -------------------------------

GRADIENT_TIES = """
models:
  - model: /m/a
    parameters: {density: [1, 0.7, 0.1], weight: [0, 0.3, 0.7, 1]}
  - model: /m/c
    parameters: {weight: 3.0, density: 0.5}
merge_method: ties
base_model: /m/b
parameters:
  lambda: [{filter: mlp, value: [0.5, 1]}, {value: 0.9}]
"""


def _place(name: str, t: float, models=("/m/a", "/m/c")) -> TensorPlace:
    return TensorPlace(name, tuple((m, name) for m in models), name, 0, t)


def test_gradients_interpolate_over_the_layers_and_filters_pick_by_name():
    recipe = MergeRecipe.from_yaml(GRADIENT_TIES)
    mlp = recipe.params_at(_place("model.layers.1.mlp.up_proj.weight", 0.5))
    # weight [0, 0.3, 0.7, 1] at t = 0.5 lies halfway between 0.3 and 0.7; density [1, 0.7, 0.1] at its middle
    torch.testing.assert_close(mlp["weight"], torch.tensor([0.5, 3.0]))
    torch.testing.assert_close(mlp["density"], torch.tensor([0.7, 0.5]))
    assert mlp["lambda"] == pytest.approx(0.75)
    attn = recipe.params_at(_place("model.layers.0.self_attn.q_proj.weight", 0.0))
    assert attn["lambda"] == 0.9  # no filter matches: the entry without one
    torch.testing.assert_close(attn["weight"], torch.tensor([0.0, 3.0]))


def test_layout_gives_each_layer_its_gradient_position():
    names = ["model.embed_tokens.weight", *(f"model.layers.{i}.mlp.up_proj.weight" for i in range(4)), "lm_head.weight"]
    recipe = MergeRecipe.from_yaml(GRADIENT_TIES)
    assert [p.t for p in recipe.layout(names)] == [0.0, 0.0, 1 / 3, 2 / 3, 1.0, 0.0]  # as mergekit: i / (L - 1)


def test_slices_renumber_layers_and_restart_the_gradient_per_slice():
    recipe = MergeRecipe.model_validate(
        {
            "merge_method": "passthrough",
            "slices": [
                {"sources": [{"model": "/m/a", "layer_range": [0, 2]}]},
                {"sources": [{"model": "/m/c", "layer_range": [1, 4]}]},
            ],
        }
    )
    names = ["model.embed_tokens.weight", *(f"model.layers.{i}.mlp.w" for i in range(4)), "model.norm.weight"]
    layout = {p.name: p for p in recipe.layout(names)}
    assert list(layout) == [
        "model.embed_tokens.weight",
        *(f"model.layers.{i}.mlp.w" for i in range(5)),
        "model.norm.weight",
    ]
    assert layout["model.layers.3.mlp.w"].inputs == (("/m/c", "model.layers.2.mlp.w"),)
    assert [layout[f"model.layers.{i}.mlp.w"].t for i in range(5)] == [0.0, 1.0, 0.0, 0.5, 1.0]
    assert layout["model.embed_tokens.weight"].inputs == (("/m/a", "model.embed_tokens.weight"),)
    assert layout["model.norm.weight"].inputs == (("/m/c", "model.norm.weight"),)
    assert recipe.input_models() == ["/m/a", "/m/c"]
    with pytest.raises(ValueError, match=r"slices\[1\]: layer_range \[1, 4\] of /m/c is outside its 3 layers"):
        recipe.layout([n for n in names if "layers.3" not in n])


def test_any_finite_weight_is_a_recipe_value_but_density_keeps_its_domain():
    recipe = MergeRecipe.model_validate(
        {"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": 3.0}}, {"model": "c"}]}
    )
    torch.testing.assert_close(recipe.resolved_params()["weight"], torch.tensor([3.0, 1.0]))
    with pytest.raises(ValidationError, match="weight is inf; give a finite number"):
        MergeRecipe.model_validate(
            {"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": "inf"}}]}
        )
    with pytest.raises(ValidationError, match=r"density=1.5 is outside \[0.0, 1.0\]"):
        MergeRecipe.model_validate(
            {"merge_method": "ties", "base_model": "b", "models": [{"model": "a", "parameters": {"density": [0, 1.5]}}]}
        )


def test_out_dtype_is_the_written_dtype_and_tokenizer_block_reads_as_tokenizer_source():
    recipe = MergeRecipe.model_validate(
        {
            "merge_method": "linear",
            "models": [{"model": "a"}],
            "dtype": "float32",
            "out_dtype": "bfloat16",
            "tokenizer": {"source": "union"},
        }
    )
    assert recipe.torch_dtype == torch.bfloat16 and recipe.tokenizer_source == "union"


LINEAR = {"merge_method": "linear", "models": [{"model": "a"}]}
SLICE = {"sources": [{"model": "a", "layer_range": [0, 2]}]}


@pytest.mark.parametrize(
    "data, message",
    [
        ({**LINEAR, "modules": {}}, "modules: per-module merges"),
        ({**LINEAR, "chat_template": "chatml"}, "chat_template: 'chatml': named templates"),
        ({**LINEAR, "tokenizer": {"source": "union", "tokens": {}}}, "tokenizer.tokens: per-token embedding"),
        ({**LINEAR, "tokenizer_source": "/m/other"}, "a tokenizer taken from one named model is not supported"),
        ({**LINEAR, "slices": [SLICE]}, "give either 'models' or 'slices', not both"),
        ({**LINEAR, "models": [], "slices": [{**SLICE, "residual_weight": 0.1}]}, r"slices\[0\].residual_weight"),
        ({**LINEAR, "models": [], "slices": [{**SLICE, "base_model": "b"}]}, r"slices\[0\].base_model: a base model"),
        ({**LINEAR, "dtpye": "float16"}, "unknown recipe key 'dtpye'; did you mean 'dtype'"),
        (
            {"merge_method": "slerp", "base_model": "b", "slices": [SLICE]},
            r"slices\[0\] has no source for base_model b",
        ),
        (
            {
                "merge_method": "linear",
                "slices": [{"sources": [*SLICE["sources"], {"model": "c", "layer_range": [0, 3]}]}],
            },
            "must each hold the same, positive number of layers",
        ),
        (
            {
                "merge_method": "ties",
                "base_model": "b",
                "models": [{"model": "a", "parameters": {"density": [1, 0.5]}}],
                "parameters": {"trim_scope": "model"},
            },
            "trim_scope: model ranks the whole model",
        ),
        ({"merge_method": "passthrough", "models": [{"model": "a"}, {"model": "c"}]}, "takes 1 model"),
    ],
)
def test_keys_we_cannot_honour_are_refused_by_name(data, message):
    with pytest.raises((ValidationError, ValueError), match=message):
        MergeRecipe.model_validate(data)


def test_a_refused_recipe_writes_nothing(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("merge_method: linear\nmodels: [{model: a}]\nchat_template: chatml\n")
    assert cli_main(["merge", str(recipe), "--out", str(tmp_path / "out")]) == 2
    assert "chat_template" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_readme_lists_every_refusal_message():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert all(message in readme for message in UNSUPPORTED.values())
