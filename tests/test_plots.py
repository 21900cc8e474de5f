"""Every Inspect figure draws exactly the statistics table it is given; ``inspect_panels`` fills every slot."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch

import explorer.methods  # noqa: F401  (registers the methods the session merges with)
from explorer.inspect import plots, stats
from explorer.session import MergeSession
from tests.tiny import tiny_family


@pytest.fixture(scope="module")
def session(tmp_path_factory) -> MergeSession:
    base, experts = tiny_family(tmp_path_factory.mktemp("plots_family"), n_experts=3)
    return MergeSession(base, experts)


@pytest.fixture(scope="module")
def merged(session):
    recipe = session.recipe("ties", {"lambda": 1.0}, [{"weight": 1.0, "density": 0.4}] * 3)
    return session.merge(recipe)


@pytest.fixture(scope="module")
def scan(session, merged) -> stats.Scan:
    return stats.scan(session, 0.4, merged, sample=64)  # sampled: most tiny tensors exceed 64 entries


def _close(actual, expected) -> None:
    np.testing.assert_allclose(
        np.asarray(actual, dtype=float), np.asarray(expected, dtype=float), rtol=1e-12, equal_nan=True
    )


def _assert_heatmap(fig, wide: pd.DataFrame) -> None:
    (trace,) = fig.data
    _close(trace.z, wide.to_numpy(dtype=float))
    assert list(trace.x) == [str(c) for c in wide.columns] and list(trace.y) == [str(i) for i in wide.index]


def test_histogram_figure_draws_the_table(scan):
    table = stats.histogram(scan)
    fig = plots.histogram_figure(table)
    assert [t.name for t in fig.data] == scan.labels and fig.layout.yaxis.type == "log"
    for trace, (_, rows) in zip(fig.data, table.groupby("expert", sort=False), strict=True):
        _close(trace.x, (rows["left"] + rows["right"]) / 2)
        _close(trace.y, rows["count"])
    assert "sampled: 64 entries per tensor" in fig.layout.title.text


def test_dare_figure_draws_both_stages(scan):
    table = stats.dare_effect(scan)
    fig = plots.histogram_figure(table, "DARE")
    assert len(fig.data) == 2 * len(scan.labels)
    for trace, (key, rows) in zip(fig.data, table.groupby(["expert", "stage"], sort=False), strict=True):
        assert trace.name == " ".join(key) and trace.line.dash == ("dash" if key[1] == "after" else "solid")
        _close(trace.y, rows["count"])


def test_heatmaps_draw_their_tables(scan):
    _assert_heatmap(plots.layer_norms_figure(table := stats.layer_norms(scan)), table)
    assert list(table.index) == ["embed", "0", "1", "norm", "head"]
    _assert_heatmap(plots.layer_stats_figure(table := stats.layer_stats(scan)), table)
    _assert_heatmap(plots.cosine_figure(table := stats.cosine_similarity(scan)), table)
    _assert_heatmap(plots.jaccard_figure(table := stats.jaccard(scan)), table)


def test_sign_conflict_figure(scan):
    table = stats.sign_conflict(scan)
    fig = plots.sign_conflict_figure(table)
    wide = plots.conflict_matrix(table)
    _assert_heatmap(fig, wide)
    assert list(wide.columns) == ["all", "expert0 | expert1", "expert0 | expert2", "expert1 | expert2"]
    for _, row in table.iterrows():
        _close(wide.loc[row["layer"], row["pair"]], row["conflict_rate"])


def test_quantiles_figure(scan):
    table = stats.delta_quantiles(scan, "layer")
    fig = plots.quantiles_figure(table)
    for trace, (expert, rows) in zip(fig.data, table.groupby("expert", sort=False), strict=True):
        assert trace.name == expert and list(trace.x) == rows["layer"].tolist()
        for attribute, column in (
            ("q1", "q0.25"),
            ("median", "q0.5"),
            ("q3", "q0.75"),
            ("lowerfence", "q0.01"),
            ("upperfence", "q0.99"),
        ):
            _close(getattr(trace, attribute), rows[column])


def test_kept_mass_figure_marks_the_density(scan):
    table = stats.kept_mass(scan)
    fig = plots.kept_mass_figure(table)
    (line,) = fig.layout.shapes
    assert line.x0 == line.x1 == 0.4
    for i, (_expert, rows) in enumerate(table.groupby("expert", sort=False)):
        curve, current = fig.data[2 * i], fig.data[2 * i + 1]
        _close(curve.x, rows.loc[~rows["current"], "density"])
        _close(curve.y, rows.loc[~rows["current"], "kept_mass"])
        _close(current.y, rows.loc[rows["current"], "kept_mass"])


def test_merge_distance_figure(scan):
    table = stats.merge_distance_table(scan)
    fig = plots.merge_distance_figure(table)
    assert [t.name.split(" (")[0] for t in fig.data] == [*scan.labels, "base"]
    for trace, (_, rows) in zip(fig.data, table.groupby("target", sort=False), strict=True):
        layers = rows[rows["layer"] != "all"]
        assert list(trace.x) == layers["layer"].tolist()
        _close(trace.y, layers["relative"])


def test_inspect_panels_fills_every_slot(session, merged):
    panels = plots.inspect_panels(session, 0.4, merged, threshold=0.002, sample=64)
    assert tuple(p.key for p in panels) == plots.PANEL_KEYS
    for panel in panels:
        assert not panel.table.empty, panel.key
        assert panel.title and panel.caption and panel.figure.data
    layer_stats = panels[plots.PANEL_KEYS.index("layer_stats")].table
    assert "expert0: |x|<0.002" in layer_stats.columns
    with pytest.raises(dataclasses.FrozenInstanceError):
        panels[0].key = "other"


def test_panels_without_a_merge_or_a_base(session, tmp_path):
    panels = {p.key: p for p in plots.inspect_panels(session, 0.4, sample=64)}
    assert panels["merge_distance"].table.empty and not panels["merge_distance"].figure.data
    assert "Merge first" in panels["merge_distance"].figure.layout.annotations[0].text
    assert not panels["histogram"].table.empty
    no_base = MergeSession(None, session.model_paths)
    panels = plots.inspect_panels(no_base, 0.4)
    assert tuple(p.key for p in panels) == plots.PANEL_KEYS
    assert all(p.table.empty and "base model" in p.figure.layout.annotations[0].text for p in panels)
    vectors = stats.TensorTaskVectors({"model.layers.0.w": torch.ones(2, 4)})
    panels = {p.key: p for p in plots.inspect_panels(vectors, 0.5, merged={"model.layers.0.w": torch.ones(4)})}
    assert "base weights" in panels["merge_distance"].figure.layout.annotations[0].text


@pytest.mark.parametrize("density", [0.0, 1.0])
def test_one_expert_and_extreme_densities(density):
    names = ("model.layers.0.w", "model.norm.weight")
    vectors = {
        names[0]: torch.randn(1, 50, 40, generator=torch.Generator().manual_seed(0)),
        names[1]: torch.zeros(1, 40),
    }
    base = {names[0]: torch.zeros(50, 40), names[1]: torch.ones(40)}
    panels = plots.inspect_panels(stats.TensorTaskVectors(vectors, base=base), density, merged=base, sample=100)
    assert all(p.table.empty == (p.key in plots.PAIR_PANELS) for p in panels)
    for p in panels:  # the pair panels of one expert say so instead of a trivial 1 x 1 plot
        notes = [a.text for a in p.figure.layout.annotations if not a.text.startswith("density ")]
        assert notes == (
            ["Choose two or more experts: this panel compares experts with each other."]
            if p.key in plots.PAIR_PANELS
            else []
        ), (p.key, notes)
    kept = panels[plots.PANEL_KEYS.index("layer_stats")].table["expert 0: kept mass"]
    assert kept.loc["0"] == (1.0 if density else 0.0) and np.isnan(kept.loc["norm"])  # an all-zero task vector


def test_colorbars_have_units_and_histogram_counts_say_what_they_count(session, merged):
    """Colorbars are titled, count axes say what they count, identical histograms stay visible.

    A sampled histogram's counts are whole-model estimates (each expert's add up to its entries) and its
    axis says so; the first trace drawn is the widest.
    """
    session_panels = plots.inspect_panels(session, 0.5, merged=merged, sample=100)
    for panel in session_panels:
        for trace in panel.figure.data:
            if trace.type == "heatmap":
                assert trace.colorbar.title.text, panel.key
    histogram = next(p for p in session_panels if p.key == "histogram")
    sampled = not histogram.table.attrs.get("exact", True)
    assert histogram.figure.layout.yaxis.title.text == (
        "entries, estimated from the sample (log scale)" if sampled else "entries (log scale)"
    )
    entries = sum(t.numel() for t in session.base.values())
    for expert, rows in histogram.table.groupby("expert"):
        assert rows["count"].sum() == pytest.approx(entries, rel=1e-6), expert
    widths = [t.line.width for t in histogram.figure.data]
    assert widths == sorted(widths, reverse=True) and widths[0] > widths[-1]
