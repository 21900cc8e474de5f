"""String settings are enums (``explorer.choices``): typos are refused with a suggestion, never taken as the other branch."""

from __future__ import annotations

import pytest
import torch
import yaml

from explorer import registry
from explorer.choices import (
    Choice,
    Consensus,
    Divisor,
    Election,
    FisherLabels,
    MetricKind,
    Remask,
    Rescale,
    Space,
    TrimScope,
    parse_choice,
)
from explorer.executor import cast_output
from explorer.fisher import FisherSettings
from explorer.methods.averaging import mwa_weights
from explorer.methods.kernels import keep_all
from explorer.methods.sparse_soup import sparse_soup
from explorer.methods.sparsify import sparsify
from explorer.methods.task_arithmetic import elect_, generalized_task_arithmetic
from explorer.methods.trim_scope import model_bands
from explorer.recipe import MergeRecipe
from explorer.registry import MethodSpec, Param

# Every choice parameter of the registered methods and the enum it must use.
EXPECTED_ENUMS = {
    "rescale": Rescale,
    "trim_scope": TrimScope,
    "election": Election,
    "divisor": Divisor,
    "remask": Remask,
    "metric_kind": MetricKind,
    "fisher_labels": FisherLabels,
}


def test_every_string_parameter_is_an_enum_and_its_choices_are_plain_values():
    seen = set()
    for spec in registry.all_methods():
        assert isinstance(spec.space, Space)
        for p in spec.params:
            if isinstance(p.default, str):
                assert p.enum is EXPECTED_ENUMS[p.name], (spec.name, p.name)
                assert p.choices == tuple(m.value for m in p.enum) and all(type(c) is str for c in p.choices)
                assert isinstance(p.default, p.enum) and p.default in p.choices
                seen.add(p.name)
            else:
                assert p.enum is None and p.choices == ()
    assert seen == set(EXPECTED_ENUMS)


def test_a_string_param_without_enum_or_with_a_bad_default_is_refused():
    with pytest.raises(ValueError, match="a string parameter is a choice"):
        Param("mode", "fast", "How.")
    with pytest.raises(ValueError, match=r"did you mean 'l1'"):
        Param("rescale", "L1", "How.", enum=Rescale)
    with pytest.raises(ValueError, match="alias target"):
        Param("rescale", "l1", "How.", enum=Rescale, aliases=((True, "l2"),))
    with pytest.raises(
        ValueError, match=r"space must be one of \['delta', 'weight'\], got 'detla'; did you mean 'delta'"
    ):
        MethodSpec("x", "X", "", "detla", lambda x, *, base, generator: x)


@pytest.mark.parametrize(
    "kind, typo, suggestion",
    [
        (Rescale, "inverse-density", "inverse_density"),
        (Election, "Unweighted", "unweighted"),
        (Divisor, "weight", "weights"),
        (TrimScope, "models", "model"),
        (Remask, "intersect", "intersection"),
        (FisherLabels, "emprical", "empirical"),
    ],
)
def test_parse_choice_suggests_the_closest_value(kind, typo, suggestion):
    with pytest.raises(ValueError, match=rf"got '{typo}'; did you mean '{suggestion}'\?"):
        parse_choice(kind, typo, "setting")
    assert parse_choice(kind, suggestion, "setting") is kind(suggestion)


def test_parse_choice_aliases_match_their_own_type_only():
    aliases = ((True, "l1"), (False, "none"))
    assert parse_choice(Rescale, True, "rescale", aliases) is Rescale.l1
    assert parse_choice(Rescale, False, "rescale", aliases) is Rescale.none
    with pytest.raises(ValueError, match="got 1"):
        parse_choice(Rescale, 1, "rescale", aliases)  # 1 == True in Python, but is not mergekit's spelling


def test_members_are_plain_strings_to_the_outside():
    assert isinstance(Rescale.l1, str) and isinstance(Rescale.l1, Choice)
    assert Rescale.l1 == "l1" and str(Rescale.l1) == "l1" and f"{Rescale.l1}" == "l1" and repr(Rescale.l1) == "'l1'"


def _deltas():
    g = torch.Generator().manual_seed(0)
    return torch.randn(3, 40, generator=g), torch.tensor([1.0, 0.5, 2.0])


@pytest.mark.parametrize(
    "setting, value",
    [
        ("election", "Weighted"),
        ("divisor", "weight"),
        ("rescale", "L1"),
        ("trim_scope", "Model"),
        ("consensus", "majority"),
        ("sparsification", "topk"),
    ],
)
def test_methods_refuse_unknown_settings_instead_of_taking_the_other_branch(setting, value):
    """Before the enums, election="Weighted" silently elected unweighted and divisor="weight" divided by count."""
    x, w = _deltas()
    kwargs = {"sparsification": "magnitude", "consensus": "sum", "density": torch.full((3,), 0.5), setting: value}
    with pytest.raises(ValueError, match=rf"{setting} must be one of .* got '{value}'"):
        generalized_task_arithmetic(x, base=None, generator=None, weight=w, normalize=True, **kwargs)


def test_disjoint_sum_and_sparsify_refuse_unknown_settings():
    x, w = _deltas()
    with pytest.raises(ValueError, match="consensus must be 'sum' or 'count'"):
        elect_(x.clone(), [keep_all()] * len(w), w.tolist(), "none", "weighted", "weights")
    with pytest.raises(ValueError, match="divisor must be one of"):
        elect_(x.clone(), [keep_all()] * len(w), w.tolist(), "sum", "weighted", "count_")
    with pytest.raises(ValueError, match="sparsify: rescale must be one of"):
        sparsify(x[0], 0.5, "magnitude", "l2")


def test_enum_members_and_their_values_give_the_same_merge():
    x, w = _deltas()
    common = {"sparsification": "magnitude", "density": torch.full((3,), 0.4), "normalize": True}
    by_value = generalized_task_arithmetic(
        x.clone(),
        base=None,
        generator=None,
        weight=w,
        consensus="sum",
        election="unweighted",
        divisor="count",
        **common,
    )
    by_member = generalized_task_arithmetic(
        x.clone(),
        base=None,
        generator=None,
        weight=w,
        consensus=Consensus.sum,
        election=Election.unweighted,
        divisor=Divisor.count,
        **common,
    )
    assert torch.equal(by_value, by_member)
    default = generalized_task_arithmetic(x.clone(), base=None, generator=None, weight=w, consensus="sum", **common)
    assert not torch.equal(default, by_value)  # the settings are really read


def test_other_choice_arguments_are_checked():
    with pytest.raises(ValueError, match=r"remask must be one of .* did you mean 'union'"):
        sparse_soup(torch.ones(2, 3), base=None, generator=None, weight=torch.ones(2), remask="unoin")
    with pytest.raises(ValueError, match="metric_kind must be one of"):
        mwa_weights(torch.tensor([1.0, 2.0]), 1.0, "losses")
    with pytest.raises(ValueError, match="trim_scope must be one of"):
        model_bands({"trim_scope": "whole", "density": torch.ones(2)}, iter(()))
    with pytest.raises(ValueError, match=r"Fisher labels must be one of .* did you mean 'sampled'"):
        FisherSettings(labels="sample")
    with pytest.raises(ValueError, match="out_of_range must be one of"):
        cast_output("w", torch.full((2,), 1e6), torch.float16, "clip")
    assert torch.equal(
        cast_output("w", torch.full((2,), 1e6), torch.float16, "clamp"), torch.full((2,), 65504.0, dtype=torch.float16)
    )


RECIPE = {"merge_method": "dare_ties", "base_model": "b", "models": [{"model": "a", "parameters": {"density": 0.5}}]}


@pytest.mark.parametrize(
    "change, message",
    [
        (
            {"parameters": {"rescale": "l2"}},
            r"parameters: rescale must be one of \['none', 'l1', 'inverse_density'\], got 'l2'; did you mean 'l1'\?",
        ),
        ({"parameters": {"election": "unweigted"}}, r"did you mean 'unweighted'\?"),
        ({"parameters": {"divisor": 2}}, r"divisor must be one of \['weights', 'count'\], got 2"),
        ({"dtype": "fp16"}, r"dtype must be one of \['float32', 'float16', 'bfloat16'\], got 'fp16'"),
        ({"dtype": "bfloat_16"}, r"did you mean 'bfloat16'\?"),
        (
            {"tokenizer_source": "unoin"},
            r"tokenizer_source must be one of \['base', 'union'\], got 'unoin'; did you mean 'union'\?",
        ),
        ({"out_of_range": "clip"}, r"out_of_range must be one of \['refuse', 'clamp'\], got 'clip'"),
        ({"parameters": {"densty": 0.5}}, r"has no parameter 'densty'; did you mean 'density'\?"),
    ],
)
def test_recipe_refuses_typos_with_a_suggestion(change, message):
    with pytest.raises(ValueError, match=message):
        MergeRecipe.model_validate({**RECIPE, **change})


@pytest.mark.parametrize("spelling, value", [(True, "l1"), (False, "none"), ("inverse_density", "inverse_density")])
def test_recipe_accepts_mergekit_spellings_and_round_trips_them_as_plain_yaml(spelling, value):
    recipe = MergeRecipe.model_validate(
        {**RECIPE, "parameters": {"rescale": spelling}, "dtype": "bfloat16", "tokenizer_source": "union"}
    )
    assert recipe.resolved_params()["rescale"] is Rescale(value)
    text = recipe.to_yaml()
    data = yaml.safe_load(text)  # safe_load: no Python object tags, only plain scalars
    assert data["parameters"]["rescale"] == spelling and type(data["dtype"]) is str and data["dtype"] == "bfloat16"
    assert data["tokenizer_source"] == "union" and data["out_of_range"] == "refuse"
    assert MergeRecipe.from_yaml(text) == recipe
