"""Two merges compared per layer: hand-computed distances."""

from __future__ import annotations

import pytest
import torch

from explorer.inspect.compare import merge_comparison, merge_comparison_figure

NAMES = ["model.layers.0.mlp.weight", "model.layers.1.mlp.weight"]


def test_distances_per_layer_and_in_total():
    base = {NAMES[0]: torch.tensor([3.0, 4.0]), NAMES[1]: torch.tensor([0.0, 1.0])}
    a = {NAMES[0]: torch.tensor([3.0, 4.0]), NAMES[1]: torch.tensor([0.0, 2.0])}  # moved only layer 1, by 1
    b = {
        NAMES[0]: torch.tensor([0.0, 4.0]).half(),
        NAMES[1]: torch.tensor([0.0, 1.0]).half(),
    }  # moved only layer 0, by 3
    table = merge_comparison(base, ("#1", a), ("#2", b), NAMES)
    got = {(r.layer, r.pair): r.relative for r in table.itertuples()}
    assert got[("0", "#1 vs base")] == 0.0 and got[("1", "#1 vs base")] == pytest.approx(1.0)
    assert got[("0", "#2 vs base")] == pytest.approx(3 / 5) and got[("1", "#2 vs base")] == 0.0
    assert got[("0", "#1 vs #2")] == pytest.approx(3 / 4) and got[("1", "#1 vs #2")] == pytest.approx(1.0)
    assert got[("all", "#1 vs base")] == pytest.approx(1 / 26**0.5)
    assert got[("all", "#1 vs #2")] == pytest.approx((9 + 1) ** 0.5 / (16 + 1) ** 0.5)
    assert list(table["layer"])[:3] == ["0", "0", "0"]
    fig = merge_comparison_figure(table)
    assert [t.name for t in fig.data] == [
        "#1 vs base (total 19.61%)",
        "#2 vs base (total 58.83%)",
        "#1 vs #2 (total 76.70%)",
    ]
    assert len({t.line.dash for t in fig.data}) == 3
