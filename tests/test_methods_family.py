"""Task-vector family: identities, edge cases, DARE in distribution, and whole-model trimming."""

from __future__ import annotations

import pytest
import torch

from explorer import registry
from explorer.methods.trim_scope import count_threshold, magnitude_histograms
from tests.helpers import assert_expected

VARIANTS = [
    "task_arithmetic",
    "ties",
    "dare_linear",
    "dare_ties",
    "breadcrumbs",
    "breadcrumbs_ties",
    "della",
    "della_linear",
]


def _run(method: str, deltas: torch.Tensor, seed: int = 0, extra: dict | None = None, **params) -> torch.Tensor:
    """Merge task vectors (N, *S) with ``method``: defaults, then ``params`` (lists become (N,) tensors)."""
    spec = registry.get(method)
    full = {p.name: p.default for p in spec.params}
    full.update({k: torch.tensor(v, dtype=torch.float32) if isinstance(v, list) else v for k, v in params.items()})
    for p in spec.per_model_params:
        if not isinstance(full[p.name], torch.Tensor):
            full[p.name] = torch.full((deltas.shape[0],), float(full[p.name]))
    return registry.call(
        spec, deltas.clone(), None, torch.Generator().manual_seed(seed), full, extra
    )  # methods may overwrite x


def _deltas(n: int = 3, shape=(12, 10), seed: int = 0) -> torch.Tensor:
    return 0.05 * torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("method", VARIANTS)
def test_one_model_weight_one_density_one_returns_its_task_vector(method):
    d = _deltas(1)
    assert torch.equal(_run(method, d, weight=[1.0]), d[0])


@pytest.mark.parametrize(
    "dropped, undropped",
    [
        ("dare_linear", "task_arithmetic"),
        ("della_linear", "task_arithmetic"),
        ("breadcrumbs", "task_arithmetic"),
        ("dare_ties", "ties"),
        ("della", "ties"),
        ("breadcrumbs_ties", "ties"),
    ],
)
@pytest.mark.parametrize("normalize", [True, False])
def test_density_one_equals_the_undropped_method(dropped, undropped, normalize):
    d, w = _deltas(), [0.5, 1.2, -0.4]
    assert torch.equal(
        _run(dropped, d, weight=w, density=[1.0] * 3, normalize=normalize),
        _run(undropped, d, weight=w, normalize=normalize),
    )


@pytest.mark.parametrize("method", VARIANTS[1:])
def test_density_zero_gives_zeros(method):
    assert torch.equal(_run(method, _deltas(), density=[0.0] * 3), torch.zeros(12, 10))


@pytest.mark.parametrize("method", VARIANTS)
@pytest.mark.parametrize("weights", [[1.0, -1.0, 0.0], [-0.5, -1.5, 0.7]])
def test_zero_sum_and_negative_weights_stay_finite(method, weights):
    params = {"density": [0.5] * 3} if method != "task_arithmetic" else {}
    out = _run(method, _deltas(), weight=weights, normalize=True, **params)
    assert torch.isfinite(out).all()
    if method == "task_arithmetic" and sum(weights) == 0:  # a zero divisor counts as 1: the plain weighted sum
        assert_expected(out, torch.tensordot(torch.tensor(weights), _deltas(), dims=1))


def test_della_epsilon_outside_the_density_range_is_a_clear_error():
    with pytest.raises(ValueError, match="density - epsilon"):
        _run("della", _deltas(), density=[0.1] * 3)


def test_randomness_comes_only_from_the_generator():
    d = _deltas()
    torch.manual_seed(123)
    a = _run("dare_ties", d, seed=7, density=[0.4] * 3)
    torch.manual_seed(999)
    assert torch.equal(a, _run("dare_ties", d, seed=7, density=[0.4] * 3))
    assert not torch.equal(a, _run("dare_ties", d, seed=8, density=[0.4] * 3))


def test_dare_inverse_density_is_unbiased_in_distribution():
    """E[dare_linear] = task arithmetic with 1/density rescaling: mean over 400 seeds within 4 standard errors."""
    d, w, p = _deltas(2, shape=(40,)), [0.7, 0.3], 0.3
    draws = torch.stack(
        [_run("dare_linear", d, seed=s, weight=w, density=[p, p], rescale="inverse_density") for s in range(400)]
    )
    target = _run("task_arithmetic", d, weight=w)
    stderr = draws.std(dim=0) / 400**0.5
    assert ((draws.mean(dim=0) - target).abs() <= 4 * stderr + 1e-7).float().mean() >= 0.99


def test_dare_l1_rescale_keeps_each_task_vectors_l1_norm():
    d = _deltas(1)
    out = _run("dare_linear", d, seed=3, density=[0.25], rescale="l1")
    assert (out != 0).float().mean() < 0.4
    assert_expected(out.abs().sum(), d[0].abs().sum())


# --- trim_scope="model": one magnitude band per task vector over all of its tensors --------------------


def _spaced_model(seed: int) -> dict[str, torch.Tensor]:
    """Two tensors of 2 task vectors whose 70 magnitudes per model are 1.1^j, distinct, shuffled."""
    g = torch.Generator().manual_seed(seed)
    per_model = []
    for _ in range(2):
        values = 1.1 ** torch.arange(-35, 35, dtype=torch.float32)
        signs = torch.randint(0, 2, (70,), generator=g) * 2 - 1
        per_model.append((values * signs)[torch.randperm(70, generator=g)])
    flat = torch.stack(per_model)
    return {"a.weight": flat[:, :40].reshape(2, 8, 5), "b.bias": flat[:, 40:]}


def _hand_band_mask(flat: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Keep the int(density * n) magnitudes just below the top int(gamma * n), over the flat model."""
    n = flat.numel()
    order = flat.abs().argsort(descending=True)
    mask = torch.zeros(n)
    top = int(gamma * n)
    mask[order[top : top + int(density * n)]] = 1
    return mask


@pytest.mark.parametrize("method, gamma", [("ties", 0.0), ("breadcrumbs", 0.1), ("breadcrumbs_ties", 0.05)])
def test_model_scope_trims_over_the_whole_flattened_model(method, gamma):
    model = _spaced_model(0)
    density = [0.3, 0.6]
    params = {"density": torch.tensor(density), "trim_scope": "model", "gamma": torch.full((2,), gamma)}
    extra = registry.get(method).prepare(params, iter(model.items()))
    flat = torch.cat([x.reshape(2, -1) for x in model.values()], dim=1)
    for i in range(2):
        expected = flat[i] * _hand_band_mask(flat[i], density[i], gamma)
        kept = torch.cat(
            [
                _run(
                    method,
                    x[i : i + 1],
                    extra={"bands": extra["bands"][i : i + 1]},
                    weight=[1.0],
                    density=[density[i]],
                    trim_scope="model",
                    gamma=[gamma],
                ).reshape(-1)
                for x in model.values()
            ]
        )
        assert torch.equal(kept, expected)


def test_model_scope_keeps_the_target_fraction_on_dense_data():
    x = torch.randn(2, 200_000, generator=torch.Generator().manual_seed(1)) * torch.tensor([[0.01], [3.0]])
    hist = magnitude_histograms([x])
    for i in range(2):
        for density in (0.05, 0.2, 0.5):
            threshold = count_threshold(hist[i], int(density * x.shape[1]))
            assert abs(float((x[i].abs() >= threshold).float().mean()) - density) < 0.002


def test_tensor_scope_needs_no_pre_pass_and_model_scope_needs_the_hook():
    def items():
        raise AssertionError("the pre-pass must not read tensors for trim_scope='tensor'")
        yield  # pragma: no cover

    spec = registry.get("ties")
    assert spec.prepare({"trim_scope": "tensor", "density": torch.ones(2)}, items()) == {}
    assert registry.get("dare_ties").prepare is None
    with pytest.raises(ValueError, match="pre-pass"):
        _run("ties", _deltas(), trim_scope="model", density=[0.5] * 3)


def test_count_threshold_limits():
    hist = magnitude_histograms([torch.tensor([[0.0, 1.0, 2.0, 4.0]])])[0]
    assert count_threshold(hist, 0) == float("inf")
    assert count_threshold(hist, 4) == 0.0
    assert count_threshold(hist, 2) == 2.0
