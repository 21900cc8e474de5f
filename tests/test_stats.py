"""Inspect statistics on hand-made task vectors with answers computed by hand.

Oracle checks against ``sparsify.magnitude_mask`` (the trim the merge methods use) and torch.kthvalue.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

import explorer.methods  # noqa: F401  (registers the methods the session merges with)
from explorer import registry
from explorer.choices import Sparsification
from explorer.executor import merge_tensor
from explorer.inspect import plots, stats
from explorer.methods.sparsify import magnitude_count, magnitude_mask, sparsify
from explorer.recipe import MergeRecipe
from explorer.registry import tensor_generator
from explorer.session import MergeSession
from tests.helpers import assert_expected
from tests.tiny import tiny_family
from tests.tiny_formats import llama_with_tokenizer

# Two experts, one tensor of 8 entries; at density 0.5 each keeps its 4 largest |x|:
# expert a keeps entries 0, 1, 2, 3 and b keeps 0, 1, 2, 4. Both keep 0 (signs +,+), 1 (-,+), 2 (+,-).
TAU_A = [4.0, -3.0, 2.0, -1.0, 0.5, 0.0, 0.0, 0.0]
TAU_B = [3.0, 2.0, -5.0, 0.1, -1.0, 0.0, 0.0, 0.0]
NAME = "model.layers.0.mlp.down_proj.weight"


@pytest.fixture
def pair_scan() -> stats.Scan:
    source = stats.TensorTaskVectors({NAME: torch.tensor([TAU_A, TAU_B]).reshape(2, 2, 4)}, labels=["a", "b"])
    return stats.scan(source, density=0.5, thresholds=(0.2,))


def _three() -> stats.TensorTaskVectors:
    """Three experts at density 1 (kept = nonzero). Entry 0 signs (+,+,-), entry 1 (+,-,-), entry 2 (+,0,+)."""
    return stats.TensorTaskVectors(
        {"model.layers.3.w": torch.tensor([[1.0, 1.0, 1.0], [2.0, -1.0, 0.0], [-1.0, -3.0, 2.0]])},
        labels=["a", "b", "c"],
    )


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return tiny_family(tmp_path_factory.mktemp("stats_family"), n_experts=2)


def test_layer_of_and_model_order():
    names = [
        "lm_head.weight",
        "model.layers.10.mlp.up_proj.weight",
        "model.norm.weight",
        "model.layers.2.self_attn.q_proj.weight",
        "model.embed_tokens.weight",
        "transformer.h.1.attn.c_attn.weight",
        "transformer.ln_f.bias",
        "rotary.inv_freq",
    ]
    labels = [stats.layer_of(n) for n in names]
    assert labels == ["head", "10", "norm", "2", "embed", "1", "norm", "other"]
    assert sorted(set(labels), key=stats.layer_rank) == ["embed", "1", "2", "10", "norm", "head", "other"]


def test_hand_made_interference(pair_scan):
    conflict = stats.sign_conflict(pair_scan, "model")
    assert conflict["pair"].tolist() == ["all", "a | b"]
    assert conflict["kept"].tolist() == [3, 3] and conflict["conflicts"].tolist() == [2, 2]
    assert conflict["conflict_rate"].tolist() == pytest.approx([2 / 3, 2 / 3])
    # kept by either: 0..4; r = 1 except entries 1 and 2 (opposite signs): 3 / 5
    agreement = stats.sign_agreement(pair_scan, "model")
    assert agreement["kept_any"].item() == 5 and agreement["agreement"].item() == pytest.approx(3 / 5)
    assert stats.jaccard(pair_scan).loc["a", "b"] == pytest.approx(3 / 5)
    dot = sum(x * y for x, y in zip(TAU_A, TAU_B, strict=True))
    cosine = stats.cosine_similarity(pair_scan)
    assert cosine.loc["a", "b"] == pytest.approx(dot / (5.5 * math.sqrt(39.01)), rel=1e-6)
    assert cosine.loc["b", "a"] == cosine.loc["a", "b"] and cosine.loc["a", "a"] == pytest.approx(1.0)
    assert cosine.attrs["exact"] is True


def test_hand_made_summary(pair_scan):
    summary = stats.delta_summary(pair_scan, "tensor").set_index("expert")
    assert summary.loc["a", "l2"] == pytest.approx(5.5) and summary.loc["b", "l2"] == pytest.approx(math.sqrt(39.01))
    assert summary["sparsity"].tolist() == [3 / 8, 3 / 8]
    assert summary["share_below_0.2"].tolist() == [3 / 8, 4 / 8]  # b also has 0.1
    assert summary["kept_share"].tolist() == [0.5, 0.5]
    assert summary["kept_mass"].tolist() == pytest.approx([10 / 10.5, 11 / 11.1])
    assert summary["mean_abs"].tolist() == pytest.approx([10.5 / 8, 11.1 / 8])
    norms = stats.layer_norms(pair_scan)
    assert norms.index.tolist() == ["0"] and norms.columns.tolist() == ["a", "b"]
    assert norms.loc["0"].tolist() == pytest.approx([5.5, math.sqrt(39.01)])


def test_three_experts_all_versus_pairs():
    s = stats.scan(_three(), density=1.0)
    conflict = stats.sign_conflict(s, "layer").set_index("pair")
    assert conflict.loc["all", "kept"] == 3 and conflict.loc["all", "conflicts"] == 2
    assert conflict.loc["a | b", ["kept", "conflicts"]].tolist() == [2, 1]
    assert conflict.loc["a | c", ["kept", "conflicts"]].tolist() == [3, 2]
    assert conflict.loc["b | c", ["kept", "conflicts"]].tolist() == [2, 1]
    # r per entry: |1 + 1 - 1| / 3, |1 - 1 - 1| / 3, 2 / 2
    assert stats.sign_agreement(s, "model")["agreement"].item() == pytest.approx((1 / 3 + 1 / 3 + 1) / 3)
    assert stats.jaccard(s).loc["a", "b"] == pytest.approx(2 / 3)


@pytest.mark.parametrize("density", [0.03, 0.5])
def test_trim_matches_magnitude_mask(density):
    """Sampled tensors (bracketed selection) keep exactly the entries sparsify.magnitude_mask keeps."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 300, 170, generator=g)
    s = stats.scan(stats.TensorTaskVectors({"model.layers.0.w": x}), density, sample=300)
    masks = [magnitude_mask(t, density).bool() for t in x]
    both = masks[0] & masks[1]
    assert s.experts["kept"].tolist() == [int(m.sum()) for m in masks]
    assert stats.jaccard(s).iloc[0, 1] == pytest.approx(int(both.sum()) / int((masks[0] | masks[1]).sum()))
    conflicts = int((both & (x[0].sign() != x[1].sign())).sum())
    assert stats.sign_conflict(s, "model")["conflicts"].tolist() == [conflicts, conflicts]
    kept_mass = float((x.abs() * torch.stack(masks)).sum(dim=(1, 2)).div(x.abs().sum(dim=(1, 2)))[0])
    assert stats.delta_summary(s, "model")["kept_mass"].iloc[0] == pytest.approx(kept_mass, rel=1e-5)


def test_density_zero_keeps_nothing(pair_scan):
    s = stats.scan(stats.TensorTaskVectors({NAME: torch.tensor([TAU_A, TAU_B])}), density=0.0)
    assert s.experts["kept"].tolist() == [0, 0]
    assert stats.sign_conflict(s, "model")["conflict_rate"].isna().all()


def test_paths_agree(family):
    """The way task vectors are read (weights, stacks, disk) does not change results."""
    base, experts = family
    session = MergeSession(base, experts)
    scans = [
        stats.scan(session, 0.3, sample=100),
        stats.scan(
            stats.TensorTaskVectors({n: session.task_vectors(n) for n in session.names}, labels=["expert0", "expert1"]),
            0.3,
            sample=100,
        ),
        stats.scan(stats.DiskTaskVectors(base, experts), 0.3, sample=100),
    ]
    for other in scans[1:]:
        for frame in ("experts", "entries", "pairs"):
            pd.testing.assert_frame_equal(getattr(scans[0], frame), getattr(other, frame), rtol=1e-5, atol=1e-6)
        assert torch.equal(scans[0].samples, other.samples)
    assert scans[0].labels == ["expert0", "expert1"]


def test_a_refresh_after_a_new_merge_reuses_the_measurements_and_equals_a_fresh_scan(family):
    """The session keeps each tensor's measurements (scan_cache); only the merge's distances are new."""
    base, experts = family
    session = MergeSession(base, experts)
    merges = [session.merge(session.recipe("ties", {"lambda": lam}, [{"density": 0.3}] * 2)) for lam in (1.0, 0.5)]
    stats.scan(session, 0.3, merged=merges[0], sample=100)
    held = len(session.scan_cache)
    refreshed = stats.scan(session, 0.3, merged=merges[1], sample=100)
    assert held == len(session.scan_cache) > 0  # the second scan measured nothing new
    stacks = stats.TensorTaskVectors({n: session.task_vectors(n) for n in session.names}, labels=["expert0", "expert1"])
    stacks.base = session.base  # distances need the base; no models: the scan reads the stacks, no cache
    fresh = stats.scan(stacks, 0.3, merged=merges[1], sample=100)
    for frame in ("experts", "entries", "pairs", "distances"):
        pd.testing.assert_frame_equal(getattr(refreshed, frame), getattr(fresh, frame), rtol=1e-9, atol=1e-12)


def test_a_refresh_after_a_new_merge_redraws_only_the_merge_panel_and_equals_a_fresh_view(family):
    """A session keeps the panels that do not depend on the merge; the merge's panel is drawn anew."""
    base, experts = family
    session = MergeSession(base, experts)
    merges = [session.merge(session.recipe("ties", {"lambda": lam}, [{"density": 0.3}] * 2)) for lam in (1.0, 0.5)]
    first = plots.inspect_panels(session, 0.3, merges[0], sample=100)
    refreshed = plots.inspect_panels(session, 0.3, merges[1], sample=100)
    fresh = plots.inspect_panels(MergeSession(base, experts), 0.3, merges[1], sample=100)
    assert [p.key for p in refreshed] == [p.key for p in fresh] == list(stats.PANEL_KEYS)
    for before, now, new in zip(first, refreshed, fresh, strict=True):
        assert (now is before) == (now.key not in stats.MERGE_TABLES)  # only the merge's panel is redrawn
        assert now.figure.to_json() == new.figure.to_json(), now.key
        pd.testing.assert_frame_equal(now.table, new.table)
    other_density = plots.inspect_panels(session, 0.5, merges[1], sample=100)
    assert all(p is not q for p, q in zip(other_density, refreshed, strict=True))  # other settings: drawn anew


def test_merge_distance_hand_made():
    base = {NAME: torch.full((8,), 2.0)}
    tau = torch.tensor([TAU_A, TAU_B])
    source = stats.TensorTaskVectors({NAME: tau}, labels=["a", "b"], base=base)
    merged = {NAME: (base[NAME] + tau[0]).to(torch.bfloat16).float()}  # the merge is expert a (exact in bf16)
    table = stats.merge_distance(stats.scan(source, 0.5, merged), "model").set_index("target")
    assert table.loc["a", "distance"] == pytest.approx(0.0, abs=1e-6)
    assert table.loc["b", "distance"] == pytest.approx(float((tau[0] - tau[1]).norm()))
    assert table.loc["base", "distance"] == pytest.approx(5.5)
    assert table.loc["base", "reference_norm"] == pytest.approx(float(base[NAME].norm()))
    assert table.loc["b", "relative"] == pytest.approx(
        table.loc["b", "distance"] / float((base[NAME] + tau[1]).norm()), rel=1e-6
    )


def test_merge_distance_errors():
    source = stats.TensorTaskVectors({NAME: torch.tensor([TAU_A, TAU_B])})
    with pytest.raises(ValueError, match="base weights"):
        stats.scan(source, 0.5, merged={NAME: torch.zeros(8)})
    with_base = stats.TensorTaskVectors({NAME: torch.tensor([TAU_A, TAU_B])}, base={NAME: torch.zeros(8)})
    with pytest.raises(ValueError, match="lack tensor"):
        stats.scan(with_base, 0.5, merged={})
    with pytest.raises(ValueError, match="entries"):
        stats.scan(with_base, 0.5, merged={NAME: torch.zeros(9)})
    with pytest.raises(ValueError, match="no merge"):
        stats.merge_distance(stats.scan(with_base, 0.5))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"density": 1.5},
        {"density": -0.1},
        {"density": 0.5, "thresholds": (0.0,)},
        {"density": 0.5, "sample": 0},
        {"density": 0.5, "grid": (0.0,)},
    ],
)
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        stats.scan(_three(), **kwargs)


def test_bad_grouping(pair_scan):
    with pytest.raises(ValueError, match="by must be"):
        stats.delta_summary(pair_scan, "block")


def test_weighted_quantiles_and_histogram():
    values = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    assert stats.weighted_quantiles(values, torch.ones(4), [0.0, 0.5, 1.0]).tolist() == [[1.0, 2.0, 4.0]]
    assert stats.weighted_quantiles(values, torch.tensor([1.0, 1.0, 1.0, 5.0]), [0.5]).tolist() == [[4.0]]
    edges = torch.tensor([-1.0, -1 / 3, 1 / 3, 1.0], dtype=torch.float64)
    counts = stats.weighted_histogram(torch.tensor([[-1.0, 0.0, 1.0, 0.9]]), torch.tensor([1.0, 2.0, 3.0, 4.0]), edges)
    assert counts.tolist() == [[1.0, 2.0, 7.0]]  # the last bin is closed


def test_histogram_shared_edges_and_counts(pair_scan, family):
    table = stats.histogram(pair_scan, bins=5)
    a, b = (table[table["expert"] == e] for e in ("a", "b"))
    assert a["left"].tolist() == b["left"].tolist() and a["right"].tolist() == b["right"].tolist()
    assert a["left"].iloc[0] == -5.0 and b["right"].iloc[-1] == 5.0  # symmetric, spanning max |x| = 5
    assert a["count"].tolist() == [0, 1, 5, 1, 1]  # bins of width 2 from -5: [-3,-1) holds -3
    assert table.attrs["exact"] is True and table.attrs["sample_size"] is None
    session = MergeSession(*family)
    sampled = stats.scan(session, 0.3, sample=50)
    table = stats.histogram(sampled)
    numel = sampled.experts.groupby("expert")["numel"].sum()
    assert table.groupby("expert")["count"].sum().tolist() == pytest.approx(numel.tolist())
    assert table.attrs["exact"] is False and table.attrs["sample_size"] == 50


def test_quantiles_exact_when_tensors_are_whole(pair_scan):
    table = stats.delta_quantiles(pair_scan, "layer", quantiles=(0.25, 0.5, 0.9)).set_index("expert")
    for label, tau in (("a", TAU_A), ("b", TAU_B)):
        expected = np.quantile(tau, [0.25, 0.5, 0.9], method="inverted_cdf")
        assert table.loc[label, ["q0.25", "q0.5", "q0.9"]].tolist() == pytest.approx(expected.tolist())
    assert table["exact"].all()


def test_kept_mass_curve(pair_scan):
    table = stats.kept_mass(pair_scan)
    a = table[(table["expert"] == "a") & ~table["current"]].set_index("density")["kept_mass"]
    # whole tensors: at d the trim keeps max(1, int(8 d)) largest |x| of TAU_A (4, 3, 2, 1, 0.5, 0, ...)
    assert a[0.1] == pytest.approx(4 / 10.5) and a[0.5] == pytest.approx(10 / 10.5) and a[1.0] == 1.0
    assert (a.diff().dropna() >= 0).all()
    current = table[table["current"]].set_index("expert")["kept_mass"]
    assert current.tolist() == pytest.approx([10 / 10.5, 11 / 11.1])


def test_dare_effect():
    source = stats.TensorTaskVectors({NAME: torch.randn(2, 1000, generator=torch.Generator().manual_seed(2))})
    table = stats.dare_effect(stats.scan(source, 0.3), bins=11)
    totals = table.groupby(["expert", "stage"])["count"].sum()
    assert (totals == 1000).all()
    after = table[(table["stage"] == "after") & (table["left"] < 0) & (table["right"] > 0)]
    assert (after["count"] > 600).all()  # about 70% dropped to zero
    same = stats.dare_effect(stats.scan(source, 1.0), bins=11)
    assert same[same["stage"] == "before"]["count"].tolist() == same[same["stage"] == "after"]["count"].tolist()
    assert_expected(
        torch.tensor(table["count"].to_numpy()),
        torch.tensor(stats.dare_effect(stats.scan(source, 0.3), bins=11)["count"].to_numpy()),
    )


def test_expert_labels():
    paths = SimpleNamespace(model_paths=["/m/run", "/n/run", "/o/other"])
    assert stats.expert_labels(paths, 3) == ["run", "run (2)", "other"]
    with pytest.raises(ValueError, match="names 3 experts"):
        stats.expert_labels(paths, 2)


def test_layer_stats_columns(pair_scan):
    table = stats.layer_stats(pair_scan)
    assert table.columns.tolist() == [
        "a: |x|<0.2",
        "a: zeros",
        "a: kept mass",
        "b: |x|<0.2",
        "b: zeros",
        "b: kept mass",
        "sign conflict",
        "sign agreement",
    ]
    assert table.loc["0"].tolist() == pytest.approx([3 / 8, 3 / 8, 10 / 10.5, 4 / 8, 3 / 8, 11 / 11.1, 2 / 3, 3 / 5])


def _merge_one_tensor(method: str, x: torch.Tensor, params: dict, seed: int = 0) -> torch.Tensor:
    """The registered method's merge of task vectors ``x`` (N, *S) over a zero base, for tensor NAME."""
    recipe = MergeRecipe(
        merge_method=method,
        base_model="base",
        models=[{"model": f"m{i}"} for i in range(x.shape[0])],
        parameters=params,
        seed=seed,
    )
    return merge_tensor(
        registry.get(method), recipe.resolved_params(), NAME, torch.zeros(x.shape[1:]), x.clone(), seed
    )[0]


@pytest.mark.parametrize(("density", "sample"), [(0.3, 10_000), (0.3, 200), (0.55, 200), (0.9, 200)])
def test_kept_mass_is_the_ties_trim_exactly(density, sample):
    """Inspect's kept mass, kept counts and Jaccard at density d are those of the TIES method's own trim.

    Integer task vectors with many ties in magnitude and many zeros (sums are exact in float32), read
    whole (sample >= numel) or sampled: the trim keeps
    exactly magnitude_count(d, n) entries, ties by flat index, like the merge.
    """
    g = torch.Generator().manual_seed(3)
    x = torch.randint(-3, 4, (2, 60, 50), generator=g).float()
    x[:, :10] = 0  # a block of zeros on top of the random ones
    s = stats.scan(stats.TensorTaskVectors({NAME: x}, labels=["a", "b"]), density, sample=sample)
    trimmed = [
        _merge_one_tensor("ties", x[i : i + 1], {"density": density}) for i in range(2)
    ]  # TIES of one expert = its trim
    for i, t in enumerate(trimmed):
        assert torch.equal(t, sparsify(x[i].clone(), density, Sparsification.magnitude))
        assert int(magnitude_mask(x[i], density).sum()) == magnitude_count(density, x[i].numel())
    expected = [float(t.abs().sum()) / float(x[i].abs().sum()) for i, t in enumerate(trimmed)]  # integer sums: exact
    summary = stats.delta_summary(s, "model")
    assert summary["kept_mass"].tolist() == expected  # exact
    current = stats.kept_mass(s).query("current")
    assert current["kept_mass"].tolist() == expected
    kept = [t != 0 for t in trimmed]
    assert s.experts["kept"].tolist() == [int(k.sum()) for k in kept]
    both = int((kept[0] & kept[1]).sum())
    assert stats.jaccard(s).loc["a", "b"] == both / int((kept[0] | kept[1]).sum())
    conflicts = int((kept[0] & kept[1] & (x[0].sign() != x[1].sign())).sum())
    assert stats.sign_conflict(s, "model")["conflicts"].tolist() == [conflicts, conflicts]


def test_kept_mass_grid_uses_the_trim_count():
    """The sampled kept-mass curve takes magnitude_count(d, s) largest sampled |x| per density."""
    x = torch.tensor([[4.0, 3.0, 3.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    s = stats.scan(stats.TensorTaskVectors({NAME: x}), 0.5, grid=(0.1, 0.25, 1.0))
    expected = [
        float(sparsify(x[0].clone(), d, Sparsification.magnitude).abs().sum()) / float(x.abs().sum())
        for d in (0.1, 0.25, 1.0)
    ]
    assert stats.kept_mass(s).query("not current")["kept_mass"].tolist() == expected


@pytest.mark.parametrize("rescale", ["inverse_density", "l1"])
def test_dare_panel_is_the_methods_drop(rescale):
    """For tensors taken whole, the DARE panel's "after" values are the dare_linear merge's own drop (same seed)."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 12, 9, generator=g)
    density, seed = 0.4, 7
    s = stats.scan(stats.TensorTaskVectors({NAME: x}, labels=["a", "b"]), density, seed=seed)
    generator = tensor_generator(seed, NAME)  # the merge's generator for this tensor; experts drawn in order
    dropped = torch.stack(
        [sparsify(x[i].clone(), density, Sparsification.random, rescale, generator) for i in range(2)]
    )
    merged = _merge_one_tensor("dare_linear", x, {"density": density, "weight": 1.0, "rescale": rescale}, seed)
    assert_expected(merged, dropped.sum(0))  # the drop replayed here is the merge's
    table = stats.dare_effect(s, rescale=rescale)
    after = table[table["stage"] == "after"]
    edges = torch.tensor(
        [*after["left"].iloc[: stats.DEFAULT_BINS], after["right"].iloc[stats.DEFAULT_BINS - 1]], dtype=torch.float64
    )
    counts = stats.weighted_histogram(dropped.reshape(2, -1), torch.ones(x[0].numel()), edges)
    assert after["count"].tolist() == counts.reshape(-1).tolist()


@pytest.mark.parametrize("tokenizer_source", ["base", "union"])
def test_inspect_from_disk_aligns_vocabularies_like_the_session(tmp_path_factory, tokenizer_source):
    """Inspect from disk reads the merge's inputs (open_inputs), vocabularies aligned as in the session.

    Experts with added tokens and padded rows are aligned by token, and every table equals Inspect on
    the in-memory session of the same models.
    """
    root = tmp_path_factory.mktemp("inspect_vocab")
    base = llama_with_tokenizer(root / "base")
    added = llama_with_tokenizer(root / "added", seed=2, base=base, added=("<tool>", "<think>"))
    padded = llama_with_tokenizer(root / "padded", seed=3, base=base, pad_to=72)
    session = MergeSession(base, [added, padded], tokenizer_source=tokenizer_source)
    disk = stats.DiskTaskVectors(base, [added, padded], tokenizer_source=tokenizer_source)
    assert disk.names == session.names
    merged = session.merge(session.recipe("task_arithmetic", {}, [{}, {}]))
    in_memory = stats.inspect_tables(session, 0.3, merged, sample=100)
    from_disk = stats.inspect_tables(disk, 0.3, merged, sample=100)
    assert list(from_disk) == list(in_memory)
    for key, table in in_memory.items():
        pd.testing.assert_frame_equal(from_disk[key], table, obj=key)
    rows = 66 if tokenizer_source == "union" else 64
    assert disk.task_vectors("model.embed_tokens.weight").shape == (2, rows, 16)
    assert torch.equal(disk.task_vectors("lm_head.weight"), session.task_vectors("lm_head.weight"))
