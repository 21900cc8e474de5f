"""The app's handlers called as the browser calls them (no browser: ``tests/test_ui_*`` drive one)."""

from __future__ import annotations

import gradio as gr

import ui_handlers as ui
from explorer.inspect import plots
from explorer.workbench import Workbench
from tests.tiny import tiny_family


def _figures(outputs: list) -> dict[str, object]:
    """Inspect's outputs by panel key: the figure's update, or gr.skip() when the browser keeps its figure."""
    return {key: outputs[3 + 3 * i + 1] for i, key in enumerate(plots.PANEL_KEYS)}


def test_inspect_sends_only_the_panels_a_new_merge_changed(tmp_path):
    """After a lambda move only the merge's distances are redrawn; after new models, every panel again."""
    base, experts = tiny_family(tmp_path / "models")
    bench = Workbench(tmp_path / "models")
    bench.load(str(base), [str(e) for e in experts])
    bench.merge("ties", {"lambda": 1.0}, [{}, {}])
    first = _figures(ui.inspect(bench, 0.5, "0.005", bench.history[-1].label))
    assert all(isinstance(update, dict) and update["visible"] for update in first.values())
    bench.merge("ties", {"lambda": 0.5}, [{}, {}])
    moved = _figures(ui.inspect(bench, 0.5, "0.005", bench.history[-1].label))
    assert [key for key, update in moved.items() if update != gr.skip()] == ["merge_distance"]
    ui.inspect_placeholder("new models", bench)  # as a load does: every panel hidden
    again = _figures(ui.inspect(bench, 0.5, "0.005", bench.history[-1].label))
    assert all(isinstance(update, dict) and update["visible"] for update in again.values())
