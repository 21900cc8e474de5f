"""Our methods against mergekit 0.1.5 ``merge_tensors`` on the same tensors (the oracle)."""

from __future__ import annotations

import pytest
import torch
from mergekit.merge_methods.api import merge_tensors

from explorer import registry
from tests.helpers import assert_expected


def _tensors(n: int, shape=(16, 12), seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    models = [base + 0.1 * torch.randn(shape, generator=g) for _ in range(n)]
    return base, models


def _ours(method: str, base, models, params: dict, per_model: dict):
    spec = registry.get(method)
    stacked = torch.stack(models)
    full = {p.name: p.default for p in spec.params}
    full.update(params)
    full.update({k: torch.tensor(v, dtype=torch.float32) for k, v in per_model.items()})
    for p in spec.per_model_params:
        if not isinstance(full[p.name], torch.Tensor):
            full[p.name] = torch.full((len(models),), float(full[p.name]))
    x = stacked - base if spec.space == "delta" else stacked
    out = registry.call(spec, x, base, torch.Generator().manual_seed(0), full)
    return base + out if spec.space == "delta" else out


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("n", [1, 2, 3])
def test_linear_matches_mergekit(n, normalize):
    _, models = _tensors(n)
    weights = [0.3, 0.5, 1.2][:n]
    expected = merge_tensors(models, "linear", parameters={"weight": weights, "normalize": normalize})
    assert_expected(_ours("linear", None, models, {"normalize": normalize}, {"weight": weights}), expected)


@pytest.mark.parametrize("lam", [1.0, 0.7])
@pytest.mark.parametrize("n", [1, 3])
def test_task_arithmetic_matches_mergekit(n, lam):
    base, models = _tensors(n, seed=1)
    weights = [0.5, -0.25, 1.0][:n]
    expected = merge_tensors([base, *models], "task_arithmetic", parameters={"weight": weights, "lambda": lam}, base_index=0)
    assert_expected(_ours("task_arithmetic", base, models, {"lambda": lam}, {"weight": weights}), expected)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("density", [[0.2, 0.5, 0.9], [1.0, 1.0, 1.0], [0.0, 0.3, 0.6]])
def test_ties_matches_mergekit(density, normalize):
    base, models = _tensors(3, shape=(32, 8), seed=2)
    weights = [0.4, 0.8, 0.6]
    expected = merge_tensors(
        [base, *models], "ties",
        parameters={"weight": weights, "density": density, "normalize": normalize, "lambda": 0.9},
        base_index=0,
    )
    ours = _ours("ties", base, models, {"normalize": normalize, "lambda": 0.9}, {"weight": weights, "density": density})
    assert_expected(ours, expected)


def test_one_model_weight_one_returns_it():
    base, models = _tensors(1, seed=3)
    assert torch.equal(_ours("linear", None, models, {}, {"weight": [1.0]}), models[0])
    assert_expected(_ours("task_arithmetic", base, models, {}, {"weight": [1.0]}), models[0])
    assert_expected(_ours("ties", base, models, {}, {"weight": [1.0], "density": [1.0]}), models[0])


def test_linear_zero_weight_sum_is_an_error():
    _, models = _tensors(2)
    with pytest.raises(ValueError, match="sum to zero"):
        _ours("linear", None, models, {}, {"weight": [1.0, -1.0]})


def test_ties_peft_conventions_differ_from_mergekit_only_where_documented():
    base, models = _tensors(2, seed=4)
    deltas = torch.stack(models) - base
    spec = registry.get("ties")
    common = {"weight": torch.tensor([1.0, 1.0]), "density": torch.tensor([1.0, 1.0]), "lambda": 1.0,
              "normalize": True, "rescale": "none"}
    # With equal unit weights, weighted and unweighted election coincide, and so do both divisors.
    a = registry.call(spec, deltas, base, None, {**common, "election": "weighted", "divisor": "weights"})
    b = registry.call(spec, deltas, base, None, {**common, "election": "unweighted", "divisor": "count"})
    assert_expected(a, b)


def test_registry_refuses_duplicates_and_suggests():
    with pytest.raises(ValueError, match="already registered"):
        registry.register(registry.get("ties"))
    with pytest.raises(KeyError, match="Did you mean ties"):
        registry.get("tie")
