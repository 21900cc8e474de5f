"""The app's handlers called as the browser calls them (no browser: ``tests/test_ui_*`` drive one)."""

from __future__ import annotations

from types import SimpleNamespace

import gradio as gr
import pandas as pd

import ui_handlers as ui
import ui_sweep
from explorer.inspect import plots
from explorer.workbench import Workbench
from tests.tiny import save_tiny_llama, tiny_family


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


def test_inspect_csv_downloads_keep_their_row_labels(tmp_path):
    """A table whose rows are layers or experts (a pivot) keeps them as its first column; a plain table has none."""
    base, experts = tiny_family(tmp_path / "models")
    bench = Workbench(tmp_path / "models")
    bench.load(str(base), [str(e) for e in experts])
    bench.merge("ties", {"lambda": 1.0}, [{}, {}])
    outputs = ui.inspect(bench, 0.5, "0.005", bench.history[-1].label)
    csvs = {key: pd.read_csv(outputs[3 + 3 * i + 2]["value"]) for i, key in enumerate(plots.PANEL_KEYS)}
    norms = csvs["layer_norms"]
    assert list(norms.columns[:1]) == ["layer"] and norms["layer"].tolist()[:2] == ["embed", "0"], norms
    assert list(csvs["cosine"].columns)[0] == "expert" and list(csvs["layer_stats"].columns)[0] == "layer"
    assert list(csvs["histogram"].columns) == ["expert", "left", "right", "count"]  # row numbers are not written


def test_the_sweep_parameters_chosen_stay_while_the_method_has_them():
    """A load (or an imported best recipe) keeps the grid's parameters; a method without them resets them."""
    two = {"labels": ["a", "b"]}
    first, second = ui_sweep.parameters("ties", two)
    assert first["choices"] == ["weight", "lambda", "density", "mix"] and first["value"] == "weight", first
    assert second["value"] == ""
    first, second = ui_sweep.parameters("ties", two, "mix", "density")
    assert (first["value"], second["value"]) == ("mix", "density")
    first, second = ui_sweep.parameters("linear", two, "density", "lambda")  # linear has neither
    assert (first["value"], second["value"]) == ("weight", "")
    first, _ = ui_sweep.parameters("ties", {"labels": ["a", "b", "c"]}, "mix")  # mix needs two experts
    assert first["value"] == "weight" and "mix" not in first["choices"]


def test_sweep_values_follow_the_chosen_parameter():
    """Choosing a parameter offers values inside its range: around the default, or across the slider."""
    assert ui_sweep.suggested_values("ties", "weight") == "0.5, 1, 1.5"
    assert ui_sweep.suggested_values("ties", "density") == "0.25, 0.5, 0.75"  # 1.5 would be refused
    assert ui_sweep.suggested_values("ties", "mix") == "0.25, 0.5, 0.75"
    assert ui_sweep.suggested_values("fisher", "epsilon") == "5e-07, 1e-06, 1.5e-06"  # no step: not rounded to 0
    assert ui_sweep.suggested_values("ties", None) == ""


def test_progress_reaches_the_browser_at_most_every_tenth_of_a_second_and_at_the_end(monkeypatch):
    """A merge reports every tensor; gradio gets the first report, one per 0.1 s after it, and the last."""
    clock = iter([0.0, 0.02, 0.05, 0.11, 0.12, 0.25, 0.26])
    monkeypatch.setattr(ui.time, "monotonic", lambda: next(clock))
    sent = []
    report = ui._progress(lambda fraction, desc: sent.append((fraction, desc)))
    for k in range(1, 8):
        report(k / 7, f"tensor {k}")
    assert sent == [(1 / 7, "tensor 1"), (4 / 7, "tensor 4"), (6 / 7, "tensor 6"), (1.0, "tensor 7")]


def test_a_checkpoint_the_demo_build_adds_keeps_what_is_chosen_and_the_load_report(tmp_path):
    """The build's poll adds a new checkpoint to the choices without undoing the person's choice or Load's report."""
    models = tmp_path / "models"
    base, experts = tiny_family(models, n_experts=3)
    bench = Workbench(models)
    job = SimpleNamespace(status=lambda: "building: 50%", done=False)
    known = len(bench.checkpoints())
    chosen = ("base", ["expert2", "expert0"], [], [], [])
    idle = ui.build_tick(job, bench, str(models), known, *chosen)
    assert idle[1] == known and all(update == gr.update() for update in idle[5:])
    save_tiny_llama(models / "expert3", seed=9, base=base)
    polled = ui.build_tick(job, bench, str(models), known, *chosen)
    status, found, _timer, _bench, catalog, base_choice, expert_choice, message = polled[:8]
    assert status == "building: 50%" and found == known + 1 and "expert3" in set(catalog["checkpoint"])
    assert base_choice["value"] == "base" and expert_choice["value"] == ["expert2", "expert0"]
    assert "expert3" in expert_choice["choices"] and message == gr.update()  # the status line keeps Load's report
    fresh = ui.build_tick(job, bench, str(models), known, "", [], [], [], [])  # nothing chosen: the defaults
    assert fresh[5]["value"] == "base" and fresh[6]["value"] == ["expert0", "expert1"]
