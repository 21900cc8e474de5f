"""FedAvg, MWA, WiSE-FT and checkpoint averaging: identities, hand-computed weights, errors."""

from __future__ import annotations

import pytest
import torch

from explorer.methods.averaging import fedavg, mwa, mwa_weights, wise_ft
from explorer.methods.checkpoint_averaging import (
    ema,
    ema_weights,
    every_kth_weights,
    last_k_weights,
)
from explorer.methods.linear import linear
from tests.helpers import assert_expected


def _models(n: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn((n, 7, 4), generator=torch.Generator().manual_seed(seed))


def _uniform(x: torch.Tensor) -> torch.Tensor:
    return linear(x, base=None, generator=None, weight=torch.ones(x.shape[0]))


def test_fedavg_equal_counts_is_the_uniform_average_and_counts_weight():
    x = _models()
    assert_expected(fedavg(x, base=None, generator=None, examples=torch.full((3,), 500.0)), _uniform(x))
    out = fedavg(x, base=None, generator=None, examples=torch.tensor([100.0, 300.0, 0.0]))
    assert_expected(out, 0.25 * x[0] + 0.75 * x[1])
    assert torch.equal(fedavg(x[:1], base=None, generator=None, examples=torch.ones(1)), x[0])


def test_fedavg_zero_examples_is_a_clear_error():
    with pytest.raises(ValueError, match="sum to zero"):
        fedavg(_models(), base=None, generator=None, examples=torch.zeros(3))


def test_mwa_weights_formula():
    loss = torch.tensor([2.0, 1.0, 4.0])
    assert_expected(mwa_weights(loss, 0.0), torch.full((3,), 1 / 3))
    raw = loss**-1.5
    assert_expected(mwa_weights(loss, 1.5), raw / raw.sum())
    assert_expected(mwa_weights(10 * loss, 1.5), raw / raw.sum())  # scale-free
    steps = torch.tensor([0.0, 100.0, 300.0])
    assert_expected(mwa_weights(steps, 2.0, "step"), torch.tensor([0.0, 0.1, 0.9]))
    assert mwa_weights(loss, 200.0).argmax() == 1  # p -> inf picks the lowest loss


@pytest.mark.parametrize(
    "metric, kind",
    [
        ([1.0, 0.0], "loss"),
        ([1.0, -2.0], "loss"),
        ([-1.0, 5.0], "step"),
        ([0.0, 0.0], "step"),
        ([1.0, float("nan")], "loss"),
        ([1.0, 2.0], "accuracy"),
    ],
)
def test_mwa_rejects_metrics_outside_the_domain(metric, kind):
    with pytest.raises(ValueError, match="mwa"):
        mwa_weights(torch.tensor(metric), 1.0, kind)


def test_mwa_merge_p_zero_is_uniform_and_one_model_is_itself():
    x = _models()
    assert_expected(mwa(x, base=None, generator=None, metric=torch.tensor([3.0, 1.0, 2.0]), p=0.0), _uniform(x))
    assert torch.equal(mwa(x[:1], base=None, generator=None, metric=torch.tensor([0.7]), p=3.0), x[0])


def test_wise_ft_endpoints_are_exact_and_midpoint_by_hand():
    base, x = _models(1, seed=1)[0], _models(1, seed=2)
    assert torch.equal(wise_ft(x, base=base, generator=None, alpha=0.0), base)
    assert torch.equal(wise_ft(x, base=base, generator=None, alpha=1.0), x[0])
    assert_expected(wise_ft(x, base=base, generator=None, alpha=0.25), 0.75 * base + 0.25 * x[0])
    with pytest.raises(ValueError, match="exactly one"):
        wise_ft(_models(2), base=base, generator=None, alpha=0.5)


def test_ema_weights_match_the_recursion():
    x = _models(5, seed=3)
    running = x[0]
    for m in x[1:]:
        running = 0.8 * running + 0.2 * m
    assert_expected(ema(x, base=None, generator=None, decay=0.8), running)
    assert sum(ema_weights(5, 0.8)) == pytest.approx(1.0)
    assert ema_weights(3, 0.0) == [0.0, 0.0, 1.0]
    assert torch.equal(ema(x[:1], base=None, generator=None, decay=0.9), x[0])
    with pytest.raises(ValueError, match="decay"):
        ema_weights(3, 1.5)


def test_checkpoint_selection_weights():
    assert last_k_weights(5, 2) == [0.0, 0.0, 0.0, 0.5, 0.5]
    assert every_kth_weights(6, 2) == [0.0, 1 / 3, 0.0, 1 / 3, 0.0, 1 / 3]
    assert every_kth_weights(3, 3) == [0.0, 0.0, 1.0]
    assert last_k_weights(1, 1) == [1.0]
    for bad in (0, 6):
        with pytest.raises(ValueError, match="between 1"):
            last_k_weights(5, bad)
