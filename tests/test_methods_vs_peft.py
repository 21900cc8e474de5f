"""TIES and DARE against PEFT ``peft.utils.merge_utils`` under PEFT's conventions.

PEFT elects signs on the unweighted trimmed task vectors, divides the disjoint sum by the agreeing
count, and rescales DARE by 1/density; ours does the same with election="unweighted",
divisor="count", rescale="inverse_density". DARE draws from torch's global generator in both (PEFT
always does; ours is handed it), reseeded before each, so the masks are the same real draws.
"""

from __future__ import annotations

import pytest
import torch
from peft.utils import merge_utils

from explorer import registry
from explorer.methods.task_arithmetic import generalized_task_arithmetic
from tests.helpers import assert_expected

_PEFT = {"election": "unweighted", "divisor": "count", "lambda": 1.0}


def _deltas(seed: int = 0, shape=(16, 9), n: int = 3) -> torch.Tensor:
    return 0.1 * torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed))


def _call(method: str, deltas: torch.Tensor, weights: torch.Tensor, density: float, **params) -> torch.Tensor:
    spec = registry.get(method)
    full = {p.name: p.default for p in spec.params}
    full.update(weight=weights, density=torch.full((deltas.shape[0],), density), **params)
    return registry.call(
        spec, deltas.clone(), None, torch.default_generator, full
    )  # x may be overwritten; PEFT's stream


@pytest.mark.filterwarnings("ignore:The density 1.0 is greater")
@pytest.mark.parametrize("density", [0.2, 0.5, 1.0])
@pytest.mark.parametrize("sign_method", ["total", "frequency"])
def test_ties_matches_peft(density, sign_method):
    deltas, weights = _deltas(1), torch.tensor([0.6, 1.4, -0.3])
    expected = merge_utils.ties(list(deltas), weights, density, majority_sign_method=sign_method)
    ours = generalized_task_arithmetic(
        deltas,
        base=None,
        generator=None,
        weight=weights,
        density=torch.full((3,), density),
        normalize=True,
        sparsification="magnitude",
        consensus="sum" if sign_method == "total" else "count",
        election="unweighted",
        divisor="count",
    )
    assert_expected(ours, expected)


@pytest.mark.parametrize("density", [0.3, 0.7])
def test_dare_matches_peft(density):
    deltas, weights = _deltas(2), torch.tensor([0.5, 1.0, 0.8])
    torch.manual_seed(0)
    expected_linear = merge_utils.dare_linear(list(deltas), weights, density)
    torch.manual_seed(0)
    ours_linear = _call("dare_linear", deltas, weights, density, rescale="inverse_density")
    assert_expected(ours_linear, expected_linear)
    torch.manual_seed(0)
    expected_ties = merge_utils.dare_ties(list(deltas), weights, density)
    torch.manual_seed(0)
    ours_ties = _call("dare_ties", deltas, weights, density, rescale="inverse_density", normalize=True, **_PEFT)
    assert_expected(ours_ties, expected_ties)


def test_magnitude_prune_and_task_arithmetic_match_peft():
    deltas, weights = _deltas(3), torch.tensor([1.0, -0.5, 0.25])
    pruned = generalized_task_arithmetic(
        deltas, base=None, generator=None, weight=weights, density=torch.full((3,), 0.4), sparsification="magnitude"
    )
    assert_expected(pruned, merge_utils.magnitude_prune(list(deltas), weights, 0.4))
    plain = _call("task_arithmetic", deltas, weights, 1.0)
    assert_expected(plain, merge_utils.task_arithmetic(list(deltas), weights))


def test_peft_and_mergekit_conventions_differ_on_weighted_inputs():
    """The settings matter: with unequal weights the mergekit defaults do not reproduce PEFT."""
    deltas, weights = _deltas(4), torch.tensor([0.2, 1.7, 0.9])
    peft = merge_utils.ties(list(deltas), weights, 0.5)
    mergekit_style = _call("ties", deltas, weights, 0.5)
    assert not torch.allclose(peft, mergekit_style, atol=1e-4)
    assert_expected(_call("ties", deltas, weights, 0.5, **_PEFT), peft)
