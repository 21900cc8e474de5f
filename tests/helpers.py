"""Shared test helpers: one comparison function for every oracle check."""

from __future__ import annotations

import torch


def assert_expected(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """assert_close with float32 tolerances; shapes and dtypes must match."""
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)
