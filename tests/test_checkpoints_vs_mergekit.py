"""Whole checkpoints: our streaming merge and mergekit 0.1.5's ``run_merge`` on the same YAML and tiny Llamas.

Every output tensor is compared. DARE is random: at density 1 it must equal TIES / task arithmetic;
below 1 both implementations get the same masks, a function of each task-vector entry's value
(``tests.helpers.content_mask``), so everything around the mask (rescale, election, disjoint mean, lambda, the
reading and writing of checkpoints) is compared exactly.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions

from explorer.executor import merge_to_folder
from explorer.recipe import MergeRecipe
from tests.helpers import assert_expected, force_equal_dare_masks
from tests.tiny import tiny_family
from tests.tiny_formats import state

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = [0.7, 0.4, 1.1]


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return tiny_family(tmp_path_factory.mktemp("family"), n_experts=3)


def _yaml(family, method: str, per_model: dict, **parameters) -> str:
    base, experts = family
    models = [
        {"model": str(e), "parameters": {"weight": WEIGHTS[i], **{k: v[i] for k, v in per_model.items()}}}
        for i, e in enumerate(experts)
    ]
    if method == "linear":
        return yaml.safe_dump({"merge_method": method, "models": models, "parameters": parameters, "dtype": "float32"})
    return yaml.safe_dump(
        {
            "merge_method": method,
            "base_model": str(base),
            "models": models,
            "parameters": parameters,
            "dtype": "float32",
        }
    )


def _mergekit(text: str, out: Path) -> dict[str, torch.Tensor]:
    options = MergeOptions(device="cpu", copy_tokenizer=False, quiet=True, lazy_unpickle=False, write_model_card=False)
    run_merge(MergeConfiguration.model_validate(yaml.safe_load(text)), str(out), options)
    return state(out)


def _ours(text: str, out: Path) -> dict[str, torch.Tensor]:
    merge_to_folder(MergeRecipe.from_yaml(text), out)
    return state(out)


def _assert_same_checkpoint(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    assert sorted(ours) == sorted(theirs) and len(ours) == 21  # 2 layers x 9 + embed, norm, head
    for name in theirs:
        assert ours[name].dtype == theirs[name].dtype == torch.float32, name
        assert_expected(ours[name], theirs[name])


def test_ties_through_our_cli_equals_mergekit(family, tmp_path):
    text = _yaml(family, "ties", {}, density=0.5, normalize=True, **{"lambda": 0.9})
    recipe = tmp_path / "ties.yaml"
    recipe.write_text(text)
    run = subprocess.run(
        [sys.executable, "-m", "explorer", "merge", str(recipe), "--out", str(tmp_path / "ours")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    ours, theirs = state(tmp_path / "ours"), _mergekit(text, tmp_path / "mergekit")
    _assert_same_checkpoint(ours, theirs)
    base = state(family[0])
    assert all(not torch.equal(ours[n], base[n]) for n in base)  # the merge moved every tensor


@pytest.mark.parametrize(
    "method, per_model, parameters",
    [
        ("ties", {"density": [0.3, 0.6, 0.9]}, {"normalize": False}),
        ("ties", {"density": [1.0, 1.0, 1.0]}, {"normalize": True}),
        ("ties", {"density": [0.0, 0.5, 1.0]}, {"normalize": True, "lambda": 1.3}),
        ("dare_ties", {"density": [1.0, 1.0, 1.0]}, {"normalize": True}),
        ("dare_ties", {"density": [1.0, 1.0, 1.0]}, {"normalize": False, "rescale": False}),
        ("dare_linear", {"density": [1.0, 1.0, 1.0]}, {}),
        ("task_arithmetic", {}, {"lambda": 0.8}),
        ("linear", {}, {"normalize": True}),
    ],
)
def test_checkpoint_merge_equals_mergekit(family, tmp_path, method, per_model, parameters):
    text = _yaml(family, method, per_model, **parameters)
    _assert_same_checkpoint(_ours(text, tmp_path / "ours"), _mergekit(text, tmp_path / "mergekit"))


def test_dare_at_density_one_is_ties_and_task_arithmetic(family, tmp_path):
    """Nothing is dropped at density 1, so the random draw plays no part.

    DARE-TIES is TIES, DARE-linear is task arithmetic, tensor for tensor (and mergekit agrees, see
    above).
    """
    ones = {"density": [1.0, 1.0, 1.0]}
    pairs = [("dare_ties", "ties", ones, {"normalize": True}), ("dare_linear", "task_arithmetic", ones, {})]
    for dare, plain, per_model, parameters in pairs:
        a = _ours(_yaml(family, dare, per_model, **parameters), tmp_path / dare)
        b = _ours(_yaml(family, plain, per_model if plain == "ties" else {}, **parameters), tmp_path / plain)
        assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a), dare


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear"])
@pytest.mark.parametrize("rescale", [True, False])
def test_dare_with_equal_masks_equals_mergekit(family, tmp_path, monkeypatch, method, rescale):
    force_equal_dare_masks(monkeypatch)
    text = _yaml(family, method, {"density": [0.3, 0.5, 0.8]}, rescale=rescale, normalize=method == "dare_ties")
    ours, theirs = _ours(text, tmp_path / "ours"), _mergekit(text, tmp_path / "mergekit")
    _assert_same_checkpoint(ours, theirs)
    dense = _ours(
        _yaml(family, method, {"density": [1.0, 1.0, 1.0]}, rescale=rescale, normalize=method == "dare_ties"),
        tmp_path / "dense",
    )
    assert not torch.equal(
        ours["model.layers.0.mlp.up_proj.weight"], dense["model.layers.0.mlp.up_proj.weight"]
    )  # entries were dropped
