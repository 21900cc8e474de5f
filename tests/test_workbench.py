"""The Workbench (what the app and a notebook drive): history labels, export targets, trainer metadata."""

from __future__ import annotations

import json

import pytest

from explorer.io.checkpoint import CheckpointError
from explorer.workbench import Workbench
from tests.tiny import save_tiny_llama, tiny_family
from tests.tiny_formats import trainer_run


@pytest.fixture()
def bench(tmp_path) -> Workbench:
    base, experts = tiny_family(tmp_path / "models")
    bench = Workbench(tmp_path / "models")
    bench.load(str(base), [str(e) for e in experts])
    return bench


def test_history_labels_show_what_differs_from_the_defaults(bench):
    bench.merge("ties", {}, [{}, {}])
    bench.merge("ties", {"lambda": 1.5}, [{"density": 0.5}, {}])
    assert [e.label for e in bench.history] == ["#1 ties", "#2 ties (lambda=1.5, density=0.5,1)"]
    assert bench.merged_tensors(1).keys() == bench.merged.keys()
    assert all((bench.merged_tensors(1)[k] != bench.merged[k]).any() for k in bench.merged if "layers.0.mlp" in k)
    bench.load(str(bench.session.base_ckpt.path), [str(p) for p in bench.session.model_paths])
    assert bench.history == [] and bench.merged is None


def test_one_per_model_dict_per_expert_or_a_sentence_saying_so(bench):
    with pytest.raises(ValueError, match=r"per_model has 1 dict\(s\) but 2 experts are loaded: give one dict"):
        bench.merge("ties", {}, [{}])
    assert bench.merged is None and bench.history == []


def test_close_frees_inputs_merges_and_history(bench):
    bench.merge("linear", {}, [{}, {}])
    bench.close()
    assert (bench.session, bench.merged, bench.recipe, bench.history) == (None, None, None, [])


def test_export_targets(bench, tmp_path):
    root = (tmp_path / "models").resolve()
    with pytest.raises(ValueError, match="nothing merged yet"):
        bench.export("merges/a")
    bench.merge("linear", {}, [{}, {}])
    for folder, error in (
        ("", "no output folder given"),
        ("  ", "no output folder given"),
        (".", "is the models folder"),
        (str(tmp_path), "is the models folder or holds it"),
        (str(tmp_path / "no" / "such"), "does not exist; create it first"),
    ):
        with pytest.raises(ValueError, match=error):
            bench.export(folder, overwrite=True)
    assert bench.describe_target("merges/a") == f"Will write a new folder {root / 'merges' / 'a'}."
    assert bench.export("merges/a") == root / "merges" / "a"
    assert "holds an earlier merge" in bench.describe_target("merges/a")
    bench.export("merges/a", overwrite=True)
    (root / "merges" / "a" / "mine.txt").write_text("user data")
    assert "holds other files: it will not be replaced" in bench.describe_target("merges/a")
    with pytest.raises(CheckpointError, match="this tool did not write"):
        bench.export("merges/a", overwrite=True)
    assert (root / "merges" / "a" / "mine.txt").read_text() == "user data"
    assert not (tmp_path / "no").exists()


def test_trainer_state_gives_fedavg_examples_and_mwa_losses(tmp_path):
    base = save_tiny_llama(tmp_path / "models" / "base")
    run = trainer_run(tmp_path / "models" / "run", base, steps=(10, 20))
    state = json.loads((run / "checkpoint-20" / "trainer_state.json").read_text())
    (run / "checkpoint-20" / "trainer_state.json").write_text(json.dumps({**state, "train_batch_size": 8}))
    bench = Workbench(tmp_path / "models")
    bench.load(str(base), [str(run / "checkpoint-10"), str(run / "checkpoint-20")])
    assert bench.training_metadata() == {
        "run/checkpoint-10": {"metric": 0.3},
        "run/checkpoint-20": {"examples": 160.0, "metric": 0.2},
    }
