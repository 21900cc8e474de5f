"""SLERP and Model Stock: endpoints, hand-solved cases, degenerate inputs, clear errors."""

from __future__ import annotations

import math

import pytest
import torch

from explorer.methods.geometry import model_stock, slerp
from tests.helpers import assert_expected


def _pair(seed: int = 0, shape=(6, 5)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


def test_slerp_endpoints_are_exact():
    base, model = _pair()
    assert torch.equal(slerp(model[None], base=base, generator=None, t=0.0), base)
    assert torch.equal(slerp(model[None], base=base, generator=None, t=1.0), model)


def test_slerp_quarter_circle_by_hand():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
    out = slerp(b[None], base=a, generator=None, t=0.5)
    s = math.sin(math.pi / 4) / math.sin(math.pi / 2)  # sin((1 - t) theta) / sin(theta), theta = pi / 2
    assert_expected(out, torch.tensor([s, 2 * s]))


@pytest.mark.parametrize("make", [lambda b: b.clone(), lambda b: 3 * b, lambda b: torch.zeros_like(b)])
def test_slerp_degenerate_pairs_are_finite_and_linear(make):
    base, _ = _pair(1)
    model = make(base)
    out = slerp(model[None], base=base, generator=None, t=0.3)
    assert torch.isfinite(out).all()
    if torch.count_nonzero(model):  # colinear: mergekit's fallback to (1 - t) a + t b
        assert_expected(out, 0.7 * base + 0.3 * model)


def test_slerp_needs_a_base_and_one_model():
    base, model = _pair()
    with pytest.raises(ValueError, match="exactly one"):
        slerp(torch.stack([model, model]), base=base, generator=None, t=0.5)
    with pytest.raises(ValueError, match="base"):
        slerp(model[None], base=None, generator=None, t=0.5)


def test_model_stock_hand_case():
    """Offsets at 60 degrees: cos = 0.5, t = 2 * 0.5 / (1 + 0.5) = 2/3 toward the average."""
    base = torch.tensor([1.0, 1.0])
    x = base + torch.tensor([[1.0, 0.0], [0.5, math.sqrt(3) / 2]])
    expected = (2 / 3) * x.mean(dim=0) + (1 / 3) * base
    assert_expected(model_stock(x, base=base, generator=None), expected)


def test_model_stock_identical_experts_give_the_expert_and_zero_offsets_the_base():
    base, model = _pair(2)
    assert_expected(model_stock(torch.stack([model, model, model]), base=base, generator=None), model)
    out = model_stock(torch.stack([base, base]), base=base, generator=None)
    assert torch.equal(out, base)


def test_model_stock_orthogonal_offsets_stay_at_the_base():
    base = torch.zeros(3)
    x = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    assert torch.equal(model_stock(x, base=base, generator=None), base)


def test_model_stock_needs_two_models():
    base, model = _pair()
    with pytest.raises(ValueError, match="at least 2"):
        model_stock(model[None], base=base, generator=None)
