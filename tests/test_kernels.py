"""The compiled merge kernels against plain torch: the exact top-k threshold and the fused TIES pass."""

from __future__ import annotations

import math

import pytest
import torch

from explorer.methods import kernels


def _top_k_reference(x: torch.Tensor, k: int) -> torch.Tensor:
    """Flat bool mask of the top-k |x|, ties at the k-th value taken by flat index (a stable sort)."""
    order = torch.sort(x.reshape(-1).abs(), descending=True, stable=True).indices
    mask = torch.zeros(x.numel(), dtype=torch.bool)
    mask[order[:k]] = True
    return mask


def _from_cut(x: torch.Tensor, v: float, cut: int) -> torch.Tensor:
    magnitude, index = x.reshape(-1).abs(), torch.arange(x.numel())
    return (magnitude > v) | ((magnitude == v) & (index < cut))


@pytest.mark.parametrize(
    "x",
    [
        torch.randn(1000),
        torch.randn(300, 700),  # several ranges on the thread pool
        torch.randn(5000).round(decimals=1),  # many ties at the threshold
        torch.randn(200_000).round(decimals=2),  # ties spread over many blocks and ranges
        torch.zeros(64),
        torch.tensor([-0.0, 0.0, -1.0, 1.0, 2.0, -2.0]),
        torch.randn(4, 4) * 1e-40,  # subnormals
    ],
)
def test_magnitude_cut_selects_exactly_the_top_k(x):
    n = x.numel()
    for k in sorted({1, 2, n // 7 + 1, n // 2, n - 1, n} - {0}):
        v, cut = kernels.magnitude_cut(x, k)
        mask = _from_cut(x, v, cut)
        assert int(mask.sum()) == k
        assert torch.equal(mask, _top_k_reference(x, k)), k
        assert v == float(x.reshape(-1).abs().sort(descending=True).values[k - 1])


def test_magnitude_cut_refuses_k_outside_the_tensor():
    with pytest.raises(ValueError, match=r"k=0 is outside \[1, 3\]"):
        kernels.magnitude_cut(torch.ones(3), 0)


def _ties_reference(d, masks, w, weighted, count, divisor):
    """TIES step by step in float32 torch ops (the order ``ties_merge`` keeps)."""
    t = d * masks
    u = t * w[:, None] if weighted else t
    votes = u.sign().sum(0) if count else u.sum(0)
    agree = torch.where(votes >= 0, u > 0, u < 0)
    mixed = torch.zeros(d.shape[1])
    total = torch.zeros(d.shape[1])
    for i in range(d.shape[0]):
        mixed += torch.where(agree[i], t[i] * w[i], 0.0)
        total += torch.where(agree[i], torch.tensor(divisor[i] if divisor else 0.0), 0.0)
    return mixed / torch.where(total == 0, 1.0, total) if divisor else mixed


@pytest.mark.parametrize("weighted", [True, False])
@pytest.mark.parametrize("count", [True, False])
@pytest.mark.parametrize("divide", [None, "weights", "count"])
@pytest.mark.parametrize("weights", [[0.6, 0.3, -0.2], [0.7], [0.5, 0.0], [0.4, 0.5, 0.0, 0.8]])
def test_ties_merge_equals_the_step_by_step_torch_computation(weighted, count, divide, weights):
    """Equal bit for bit (signed zeros too) for one model, a zero weight, a negative one, and N = 1..4."""
    torch.manual_seed(0)
    n = len(weights)
    d = torch.randn(n, 200_000)
    d[:, :1000] = d[:, :1000].round()  # ties and zeros
    w = torch.tensor(weights)
    cuts = [
        kernels.magnitude_cut(d[0], 50_000),
        kernels.keep_all(),
        kernels.keep_none(),
        kernels.magnitude_cut(d[-1], 9),
    ]
    masks = [_from_cut(d[0], *cuts[0]), torch.ones(d.shape[1], dtype=bool), torch.zeros(d.shape[1], dtype=bool)]
    masks.append(_from_cut(d[-1], *cuts[3]))
    divisor = None if divide is None else (w.tolist() if divide == "weights" else [1.0] * n)
    ours = kernels.ties_merge(d, cuts[:n], w.tolist(), weighted, count, divisor)
    expected = _ties_reference(d, torch.stack(masks[:n]).float(), w, weighted, count, divisor)
    assert torch.equal(ours.view(torch.int32), expected.view(torch.int32))


@pytest.mark.parametrize(
    ("n", "p", "skip"),
    [
        (10, 0.3, 7),
        (623, 0.5, 7),
        (624, 0.5, 7),
        (625, 0.9, 7),
        (70_000, 0.1, 7),
        (1, 0.0, 0),
        (1248, 1.0, 0),
        (1249, 1 / 3, 0),
        (5000, 0.2, 617),
    ],
)
def test_bernoulli_drop_draws_what_torch_bernoulli_draws(n, p, skip):
    """Same kept entries, same signed zeros, and the generator left where torch leaves it.

    ``skip`` draws come first (0: a freshly seeded generator, whose first draw twists; 617: 7 words
    before the next twist), then two drops in a row, so runs cross twists at every offset tested.
    """
    x = torch.randn(n)
    theirs, ours = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    torch.rand(skip, generator=theirs), torch.rand(skip, generator=ours)
    for _ in range(2):
        expected = x.clone().mul_(torch.bernoulli(torch.full_like(x, p), generator=theirs))
        dropped = x.clone()
        before, after = kernels.bernoulli_drop_(dropped, p, ours)
        assert torch.equal(dropped.view(torch.int32), expected.view(torch.int32))
        assert before.dtype == after.dtype == torch.float32
        torch.testing.assert_close(before, x.abs().double().sum().float(), rtol=1e-7, atol=0)
        torch.testing.assert_close(after, dropped.abs().double().sum().float(), rtol=1e-7, atol=0)
    assert torch.equal(torch.rand(100, generator=ours), torch.rand(100, generator=theirs))


def test_bernoulli_drop_refuses_a_strided_tensor():
    with pytest.raises(ValueError, match="contiguous float32"):
        kernels.bernoulli_drop_(torch.randn(4, 4).t(), 0.5, None)


def test_weighted_sum_forms_task_vectors_on_the_fly_with_the_bits_of_stored_ones():
    """sum_i c_i (x_i - b) from the weights equals the same sum over stored x_i - b, and is the weighted sum."""
    x, base = torch.randn(3, 70_001), torch.randn(70_001)
    c = [0.5, -0.25, 1.5]
    on_the_fly = kernels.weighted_sum(list(x), c, minus=base)
    stored = kernels.weighted_sum(list(x - base), c)
    assert torch.equal(on_the_fly.view(torch.int32), stored.view(torch.int32))
    expected = sum(ci * (xi.double() - base.double()) for ci, xi in zip(c, x, strict=True))
    torch.testing.assert_close(on_the_fly.double(), expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(kernels.weighted_sum([x[1]], [1.0]), x[1])  # one model with weight 1 is that model


def test_weighted_sum_refuses_strided_or_mismatched_inputs():
    with pytest.raises(ValueError, match="contiguous float32"):
        kernels.weighted_sum([torch.randn(4, 4).t()], [1.0])
    with pytest.raises(ValueError, match="minus must be"):
        kernels.weighted_sum([torch.randn(4)], [1.0], minus=torch.randn(5))


@pytest.mark.parametrize("size", [0, 5, 3000, kernels.RANGE + 7])
def test_finish_is_torch_mul_then_add_with_its_peak(size):
    """base + scale * x equals torch.mul then add_ bit for bit, in a new tensor or in place; peak is max |value|."""
    torch.manual_seed(1)
    x, base = torch.randn(size) * 3, torch.randn(size)
    expected = torch.mul(x, 0.7).add_(base)
    done = kernels.finish(x, 0.7, base)
    assert torch.equal(done.weights.view(torch.int32), expected.view(torch.int32))
    assert done.peak == (float(expected.abs().max()) if size else 0.0)
    in_place = kernels.finish(x, 0.7, base, out=x)
    assert in_place.weights is x and torch.equal(x.view(torch.int32), expected.view(torch.int32))


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_finish_peak_reports_a_value_that_is_not_finite(bad):
    x, base = torch.zeros(10_000), torch.ones(10_000)
    x[7777] = bad
    peak = kernels.finish(x, 2.0, base).peak
    assert math.isnan(peak) if math.isnan(bad) else peak == float("inf")


def test_ties_merge_with_a_base_also_writes_the_finished_weights():
    """One pass gives the election and base + scale * election, as ties_merge then finish would."""
    torch.manual_seed(2)
    d, base = torch.randn(3, kernels.RANGE + 99), torch.randn(kernels.RANGE + 99)
    cuts = [kernels.magnitude_cut(d[i], 100_000) for i in range(3)]
    alone = kernels.ties_merge(d, cuts, [0.5, 1.0, -0.3], True, False, [0.5, 1.0, -0.3])
    mixed, done = kernels.ties_merge(d, cuts, [0.5, 1.0, -0.3], True, False, [0.5, 1.0, -0.3], base=base, scale=1.7)
    expected = kernels.finish(alone, 1.7, base)
    assert torch.equal(mixed, alone) and torch.equal(done.weights.view(torch.int32), expected.weights.view(torch.int32))
    assert done.peak == expected.peak == float(expected.weights.abs().max())


def test_a_merge_hands_only_ranges_of_a_million_entries_to_other_threads_and_a_scan_smaller_ones(monkeypatch):
    """A merge runs in a pipeline of threads: a layer-sized tensor stays on its thread; Inspect's scan splits it."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    layer = 576 * 1536  # SmolLM2's largest layer tensor: under a million entries
    assert kernels._ranges(layer, kernels.MIN_RANGE) == [(0, layer)]
    assert len(kernels._ranges(layer, kernels.SCAN_MIN_RANGE)) == 4
    embedding = 49152 * 576  # split at most RANGE entries a piece
    pieces = kernels._ranges(embedding, kernels.MIN_RANGE)
    assert len(pieces) == math.ceil(embedding / kernels.RANGE) and pieces[-1][1] == embedding
    assert kernels._ranges(3 * kernels.MIN_RANGE, kernels.MIN_RANGE) == [
        (i * kernels.MIN_RANGE, (i + 1) * kernels.MIN_RANGE) for i in range(3)
    ]
