"""Shared test helpers: one comparison function for every oracle check."""

from __future__ import annotations

import itertools

import torch


def assert_expected(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """assert_close with float32 tolerances; shapes and dtypes must match."""
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def fixed_bernoulli(monkeypatch, seed: int = 0) -> None:
    """Make every ``torch.bernoulli`` draw a function of its call number only (generators ignored).

    The k-th call after this keeps entry j where U_k[j] < p[j], U_k ~ uniform from Generator(seed + k).
    Call it again before each implementation so both see the same masks in the same call order.
    """
    calls = itertools.count()

    def draw(p: torch.Tensor, *args, generator=None, **kwargs) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed + next(calls))
        return (torch.rand(p.shape, generator=g) < p).to(p.dtype)

    monkeypatch.setattr(torch, "bernoulli", draw)
