"""The torch kernels (the device path) against the compiled CPU kernels, on CPU tensors, and the dispatch to them.

Bit for bit (signed zeros too) where the kernels promise it; the float64 norms within 1e-7 relative,
the scan's float64 sums within their stated tolerances and its counts exactly.
"""

from __future__ import annotations

import importlib
import math
import struct

import numpy as np
import pytest
import torch

from explorer.inspect import scan_kernel, scan_torch
from explorer.methods import kernels, torch_kernels


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit: same shape, same float32 patterns (so -0.0 != 0.0 and NaN == the same NaN)."""
    return a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))


def _float_bits(v: float) -> int:
    return struct.unpack("<q", struct.pack("<d", v))[0]


def _inputs(seed: int) -> list[torch.Tensor]:
    """float32 tensors: odd sizes and shapes, tied magnitudes, zeros and -0.0, subnormals, inf and NaN."""
    g = torch.Generator().manual_seed(seed)
    ties = torch.randn(4099, generator=g).round(decimals=1)  # many |x| equal, +-x pairs, zeros
    ties[::7] = -0.0
    special = torch.randn(3, 37, generator=g)
    special[0, 5], special[1, 9], special[2, 0], special[2, 1] = math.inf, -math.inf, math.nan, -0.0
    return [
        torch.randn(1, generator=g),
        torch.tensor([-0.0, 0.0, -1.0, 1.0, 2.0, -2.0, 0.0]),
        torch.randn(33, 17, generator=g),
        ties,
        torch.randn(2, 3, 5, generator=g) * 1e-40,  # subnormals
        torch.zeros(64),
        special,
    ]


@pytest.mark.parametrize("x", _inputs(0), ids=lambda x: "x".join(map(str, x.shape)))
def test_magnitude_cut_equals_the_compiled_kernel(x):
    n = x.numel()
    for k in sorted({k for k in (1, 2, n // 3 + 1, n // 2 + 1, n - 1, n) if 1 <= k <= n}):
        v, cut = torch_kernels.magnitude_cut(x, k)
        expected_v, expected_cut = kernels.magnitude_cut(x, k)
        assert (_float_bits(v), cut) == (_float_bits(expected_v), expected_cut), k
        assert isinstance(v, float) and isinstance(cut, int)


def test_magnitude_cut_refuses_k_outside_the_tensor():
    for k in (0, 4):
        with pytest.raises(ValueError, match=rf"k={k} is outside \[1, 3\]"):
            torch_kernels.magnitude_cut(torch.ones(3), k)


@pytest.mark.parametrize("x", _inputs(1), ids=lambda x: "x".join(map(str, x.shape)))
@pytest.mark.parametrize("scale", [0.7, -1.3, 0.0])
def test_finish_equals_the_compiled_kernel(x, scale):
    base = torch.randn(x.shape)
    base.view(-1)[:2] = -0.0
    ours, theirs = torch_kernels.finish(x, scale, base), kernels.finish(x, scale, base)
    assert _same(ours.weights, theirs.weights)
    assert _float_bits(ours.peak) == _float_bits(theirs.peak)
    buffer = torch.empty_like(x)
    assert torch_kernels.finish(x, scale, base, out=buffer).weights is buffer and _same(buffer, theirs.weights)
    in_place = x.clone()
    assert torch_kernels.finish(in_place, scale, base, out=in_place).weights is in_place
    assert _same(in_place, theirs.weights)


def test_finish_of_nothing_and_its_errors():
    done = torch_kernels.finish(torch.zeros(0), 2.0, torch.zeros(0))
    assert done.weights.shape == (0,) and done.peak == 0.0
    with pytest.raises(ValueError, match="contiguous float32"):
        torch_kernels.finish(torch.randn(4, 4).t(), 1.0, torch.randn(4, 4))
    with pytest.raises(ValueError, match="contiguous float32"):
        torch_kernels.finish(torch.randn(4), 1.0, torch.randn(5))


def _ties_inputs(n: int) -> tuple[torch.Tensor, list[tuple[float, int]]]:
    """(n, 61, 67) deltas with ties, zeros and -0.0, and cuts of every kind: top k (k = 1, some, numel), all, none."""
    g = torch.Generator().manual_seed(n)
    d = torch.randn(n, 61, 67, generator=g)
    d[:, :20] = d[:, :20].round(decimals=1)
    d[:, 30:33] = 0.0
    d[:, 33:35] = -0.0
    numel = d[0].numel()
    choices = [(kernels.magnitude_cut, numel // 3), (kernels.keep_all, None), (kernels.magnitude_cut, 1)]
    choices += [(kernels.keep_none, None), (kernels.magnitude_cut, numel)]  # N = 1, 2, 3 take 1, 2, 3 from n - 1
    cuts = [cut(d[i], k) if k else cut() for i, (cut, k) in enumerate(choices[n - 1 : 2 * n - 1])]
    return d, cuts


# N = 1, 2, 3; negative and zero weights (a zero one first: its agreeing products are -0 or +0), sums of 0
WEIGHTS = [[0.7], [0.0], [0.5, -0.5], [0.6, 0.0, -0.3], [0.0, -0.0, 1.2]]


@pytest.mark.parametrize("weights", WEIGHTS, ids=str)
@pytest.mark.parametrize("weighted", [True, False])
@pytest.mark.parametrize("count", [True, False])
@pytest.mark.parametrize("divide", [None, "weights", "ones"])
@pytest.mark.parametrize("with_base", [False, True])
def test_ties_merge_equals_the_compiled_kernel(weights, weighted, count, divide, with_base):
    n = len(weights)
    d, cuts = _ties_inputs(n)
    divisor = None if divide is None else (weights if divide == "weights" else [1.0] * n)
    base = torch.randn(d.shape[1:]) if with_base else None
    args = (d, cuts, weights, weighted, count, divisor)
    theirs = kernels.ties_merge(*args, base=base, scale=1.7)
    ours = torch_kernels.ties_merge(*args, base=base, scale=1.7)
    if not with_base:
        assert _same(ours, theirs)
        return
    assert _same(ours[0], theirs[0]) and _same(ours[1].weights, theirs[1].weights)
    assert _float_bits(ours[1].peak) == _float_bits(theirs[1].peak)


def test_ties_merge_reuses_a_fitting_out_buffer_and_checks_its_base():
    d, cuts = _ties_inputs(3)
    w = [0.6, 0.0, -0.3]
    args = (d, cuts, w, False, False, w)
    expected = kernels.ties_merge(*args)
    buffer = torch.full(d.shape[1:], 5.0)
    assert torch_kernels.ties_merge(*args, out=buffer) is buffer and _same(buffer, expected)
    unfit = torch.empty(3)
    fresh = torch_kernels.ties_merge(*args, out=unfit)
    assert fresh is not unfit and _same(fresh, expected)
    with pytest.raises(ValueError, match="ties_merge's base needs contiguous float32"):
        torch_kernels.ties_merge(*args, base=torch.zeros(2))


@pytest.mark.parametrize("c", [[1.0], [0.3, -0.7], [0.3, -0.7, 1.1], [0.0, -0.7, 1.1]], ids=str)
@pytest.mark.parametrize("subtract", [False, True])
def test_weighted_sum_equals_the_compiled_kernel(c, subtract):
    """Rounded products summed left to right (another order differs), signed zeros from exact cancellations."""
    g = torch.Generator().manual_seed(len(c))
    xs = torch.randn(len(c), 1001, generator=g)
    xs[:, :300] = xs[:, :300].round(decimals=1)
    xs[:, :5] = -0.0
    minus = torch.randn(1001, generator=g).round(decimals=1) if subtract else None
    assert _same(torch_kernels.weighted_sum(list(xs), c, minus), kernels.weighted_sum(list(xs), c, minus))


def test_weighted_sum_refuses_what_the_compiled_kernel_refuses():
    with pytest.raises(ValueError, match="N >= 1 contiguous float32"):
        torch_kernels.weighted_sum([], [])
    with pytest.raises(ValueError, match="contiguous float32"):
        torch_kernels.weighted_sum([torch.randn(4, 4).t()], [1.0])
    with pytest.raises(ValueError, match="minus must be"):
        torch_kernels.weighted_sum([torch.randn(4)], [1.0], minus=torch.randn(5))


@pytest.mark.parametrize("x", [*_inputs(2)[:-1], torch.randn(300, 701)], ids=lambda x: "x".join(map(str, x.shape)))
def test_l1_norm_is_the_compiled_kernels_within_1e_7(x):
    ours = torch_kernels.l1_norm(x)
    assert ours.dtype == torch.float32 and ours.shape == ()
    torch.testing.assert_close(ours, kernels.l1_norm(x), rtol=1e-7, atol=0)
    with pytest.raises(ValueError, match="l1_norm needs a float32 tensor"):
        torch_kernels.l1_norm(x.double())


@pytest.mark.parametrize(
    ("shape", "density"), [((10,), 0.3), ((623,), 0.5), ((31, 41), 1 / 3), ((700,), 0.0), ((1249,), 1.0), ((1,), 0.9)]
)
def test_bernoulli_drop_draws_what_the_compiled_kernel_draws(shape, density):
    """Same kept entries, same signed zeros, generators left in the same state, norms within 1e-7."""
    x = torch.randn(shape)
    x.view(-1)[::5] = -x.view(-1)[::5]
    theirs, ours = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    for _ in range(2):  # the second drop starts where the first left the generator
        expected, dropped = x.clone(), x.clone()
        norms = kernels.bernoulli_drop_(expected, density, theirs)
        before, after = torch_kernels.bernoulli_drop_(dropped, density, ours)
        assert _same(dropped, expected)
        assert before.dtype == after.dtype == torch.float32
        torch.testing.assert_close((before, after), norms, rtol=1e-7, atol=0)
    assert torch.equal(ours.get_state(), theirs.get_state())


def test_bernoulli_drop_uses_the_default_generator_and_refuses_a_strided_tensor():
    x = torch.randn(1000)
    torch.manual_seed(11)
    expected = x.clone()
    kernels.bernoulli_drop_(expected, 0.4, None)
    torch.manual_seed(11)
    dropped = x.clone()
    torch_kernels.bernoulli_drop_(dropped, 0.4, None)
    assert _same(dropped, expected)
    with pytest.raises(ValueError, match="bernoulli_drop_ needs a contiguous float32 tensor"):
        torch_kernels.bernoulli_drop_(torch.randn(4, 4).t(), 0.5, None)


COUNTS = ("zeros", "below", "inter", "sdot", "kept_any", "kept_2plus", "conflicts")
SUMS = ("l1", "kept_l1", "gram", "agreement_sum")


@pytest.mark.parametrize("n", [1, 2, 3])
def test_scan_sums_equal_the_compiled_scan(n):
    """Counts exactly; float sums within 1e-6 of the compiled scan's (float32 blocks) and 1e-12 of exact ones."""
    d, cuts = _ties_inputs(n)
    x = d.reshape(n, -1)
    thresholds = (0.05, 0.5, 1.0)
    theirs = scan_kernel.scan_sums(x, cuts, thresholds)
    ours = scan_torch.scan_sums(x, cuts, thresholds)
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert type(ours[key]) is type(theirs[key]) and np.shape(ours[key]) == np.shape(theirs[key]), key
        assert ours[key].dtype == np.float64, key
    for key in COUNTS:
        np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)
    for key in SUMS:
        scale = np.abs(theirs[key]).max()  # gram's off-diagonal sums cancel: their error is relative to it
        np.testing.assert_allclose(ours[key], theirs[key], rtol=1e-6, atol=1e-6 * scale, err_msg=key)
    exact = x.double()
    np.testing.assert_allclose(ours["l1"], exact.abs().sum(1).numpy(), rtol=1e-12)
    np.testing.assert_allclose(ours["gram"], (exact @ exact.T).numpy(), rtol=1e-12)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_merge_distances_equal_the_compiled_pass(n):
    g = torch.Generator().manual_seed(n)
    rows, minus, base, merged = list(torch.randn(n, 5003, generator=g)), *torch.randn(3, 5003, generator=g)
    theirs = scan_kernel.merge_distances(rows, minus, base, merged)
    ours = scan_torch.merge_distances(rows, minus, base, merged)
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert type(ours[key]) is type(theirs[key]) and np.shape(ours[key]) == np.shape(theirs[key]), key
        np.testing.assert_allclose(ours[key], theirs[key], rtol=1e-9, atol=1e-9 * abs(theirs["bb"]), err_msg=key)


def _call(module, name: str, device: str):
    """module.name called with small valid arguments on ``device``."""
    x, y = torch.ones(2, 3, device=device), torch.zeros(3, device=device)
    calls = {
        "magnitude_cut": lambda f: f(x, 1),
        "finish": lambda f: f(y, 1.0, y),
        "ties_merge": lambda f: f(x, [kernels.keep_all()] * 2, [1.0, 1.0], True, False, None),
        "weighted_sum": lambda f: f([y, y], [1.0, 1.0]),
        "l1_norm": lambda f: f(y),
        "bernoulli_drop_": lambda f: f(y, 0.5, torch.Generator()),
        "scan_sums": lambda f: f(x, [kernels.keep_all()] * 2, (0.5,)),
        "merge_distances": lambda f: f([y, y], y, y, y),
    }
    return calls[name](getattr(module, name))


KERNELS = [
    (kernels, torch_kernels, name)
    for name in ("magnitude_cut", "finish", "ties_merge", "weighted_sum", "l1_norm", "bernoulli_drop_")
] + [
    (scan_kernel, scan_torch, "scan_sums"),
    (scan_kernel, scan_torch, "merge_distances"),
]


@pytest.mark.parametrize(("compiled", "device_path", "name"), KERNELS, ids=[k[2] for k in KERNELS])
def test_a_tensor_off_the_cpu_goes_to_the_torch_kernel(monkeypatch, compiled, device_path, name):
    """A meta tensor (device type "meta", as "cuda" would be) reaches the torch version; a CPU one does not."""
    calls = []
    monkeypatch.setattr(device_path, name, lambda *args: calls.append(args) or "torch path")
    assert _call(compiled, name, "meta") == "torch path" and len(calls) == 1
    _call(compiled, name, "cpu")
    assert len(calls) == 1


def _through_the_kernels(d: torch.Tensor, base: torch.Tensor, cuts: list[tuple[float, int]]) -> dict:
    """Every public kernel run on ``d`` (3, *S) and ``base`` (*S), on their device; tensors copied to the CPU."""
    w = [0.6, 0.0, -0.3]
    mixed, done = kernels.ties_merge(d, cuts, w, True, True, w, base=base, scale=0.9)
    dropped = d[1].clone()
    norms = kernels.bernoulli_drop_(dropped, 0.3, torch.Generator().manual_seed(1))
    flat, merged = d.reshape(3, -1), mixed.reshape(-1)
    return {
        "cut": kernels.magnitude_cut(d[0], 700),
        "peak": done.peak,
        "tensors": [t.cpu() for t in (mixed, done.weights, kernels.finish(d[2], -1.3, base).weights, dropped)],
        "sum": kernels.weighted_sum(list(d), [0.5, 0.2, -1.0], d[0]).cpu(),
        "norms": torch.stack([*norms, kernels.l1_norm(d)]).cpu(),
        "scan": scan_kernel.scan_sums(flat, cuts, (0.5,)),
        "distances": scan_kernel.merge_distances(list(flat), torch.zeros_like(merged), base.reshape(-1), merged),
    }


def test_the_public_kernels_on_the_torch_path_give_the_compiled_results(monkeypatch):
    """The public kernels down the torch path against the same calls compiled, on the same tensors.

    On a CUDA machine the tensors go to the GPU (the dispatch sends them down the torch path); on a
    CPU-only one the dispatch is told to take the torch path for CPU tensors too.
    """
    d, cuts = _ties_inputs(3)
    base = torch.randn(d.shape[1:])
    theirs = _through_the_kernels(d, base, cuts)
    if torch.cuda.is_available():
        d, base = d.cuda(), base.cuda()
    else:
        forced = lambda _x, module: importlib.import_module(module)  # noqa: E731
        monkeypatch.setattr(kernels, "torch_path", forced)
        monkeypatch.setattr(scan_kernel, "torch_path", forced)
    _assert_same_results(_through_the_kernels(d, base, cuts), theirs)


def _assert_same_results(ours: dict, theirs: dict) -> None:
    """Bit for bit where the kernels promise it, within the stated tolerances elsewhere."""
    assert ours["cut"] == theirs["cut"] and _float_bits(ours["peak"]) == _float_bits(theirs["peak"])
    assert all(_same(a, b) for a, b in zip(ours["tensors"], theirs["tensors"], strict=True))
    assert _same(ours["sum"], theirs["sum"])
    torch.testing.assert_close(ours["norms"], theirs["norms"], rtol=1e-7, atol=0)
    for key in COUNTS:
        np.testing.assert_array_equal(ours["scan"][key], theirs["scan"][key], err_msg=key)
    for key in SUMS:
        np.testing.assert_allclose(ours["scan"][key], theirs["scan"][key], rtol=1e-6, atol=1e-6, err_msg=key)
    for key, value in theirs["distances"].items():
        np.testing.assert_allclose(ours["distances"][key], value, rtol=1e-9, err_msg=key)
