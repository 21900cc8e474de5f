"""Shared test helpers: one comparison function for every oracle check."""

from __future__ import annotations

import torch


def assert_expected(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """assert_close with float32 tolerances; shapes and dtypes must match."""
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def content_mask(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep an entry when the fractional part of |delta| * 2^21 is below density.

    As random as a Bernoulli(density) draw for fine-tuning deltas, but the same in any
    implementation and order.
    """
    return torch.frac(delta.abs().double() * 2**21) < density


def force_equal_dare_masks(monkeypatch) -> None:
    """Ours and mergekit 0.1.5 draw their DARE masks from ``content_mask``; the rest is their own code."""
    import mergekit.sparsify  # a dev requirement, imported by the tests that compare with it

    from explorer.choices import Sparsification
    from explorer.methods import sparsify as our_sparsify
    from explorer.methods.kernels import l1_norm

    def drop(kept, density, *_):  # as ``sparsify.random_drop``: thin in place, return the L1 norms before and after
        before = l1_norm(kept)
        kept.masked_fill_(~content_mask(kept, density), 0)
        return before, l1_norm(kept)

    monkeypatch.setitem(our_sparsify._DROPS, Sparsification.random, drop)

    def bernoulli(tensor, density, rescale_norm=None):  # mergekit.sparsify.bernoulli with the mask replaced
        if density >= 1:
            return tensor
        mask = content_mask(tensor, density).to(torch.float32)
        return mergekit.sparsify.rescaled_masked_tensor(tensor.to(torch.float32), mask, rescale_norm).to(tensor.dtype)

    monkeypatch.setattr(mergekit.sparsify, "bernoulli", bernoulli)


def shape_seeded_bernoulli(monkeypatch) -> None:
    """Make ``torch.bernoulli(p)`` keep entry j where U[j] < p[j], U uniform seeded by ``p``'s shape only.

    Both implementations of DELLA draw one Bernoulli per model and tensor over probabilities of the
    same (rows, columns) shape, in whatever order they visit tensors: this makes their masks equal
    (up to probabilities that differ in the last bit right at U[j]).
    """

    def draw(p: torch.Tensor, *args, generator=None, **kwargs) -> torch.Tensor:
        g = torch.Generator().manual_seed(hash(tuple(p.shape)) & (2**63 - 1))
        return (torch.rand(p.shape, generator=g) < p).to(p.dtype)

    monkeypatch.setattr(torch, "bernoulli", draw)
