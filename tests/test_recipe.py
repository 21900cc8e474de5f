"""MergeRecipe: mergekit-style YAML in and out, validation with clear messages."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from explorer.recipe import MergeRecipe

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
        ({"merge_method": "slerp", "base_model": "b", "models": [{"model": "a"}, {"model": "c"}]}, "takes 1..1 models"),
    ],
)
def test_bad_recipes_say_what_is_wrong(data, message):
    with pytest.raises((ValidationError, KeyError), match=message):
        MergeRecipe.model_validate(data)
