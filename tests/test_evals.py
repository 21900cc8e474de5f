"""evals: lm-eval on in-memory models over the zoo's offline tasks."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

import evals
from evals.__main__ import main as evals_main

TASKS = ["zoo_add", "zoo_reverse", "zoo_upper"]
LIMIT = 40


def _load(path: Path):
    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def base(zoo_dir: Path):
    return _load(zoo_dir / "base")


@pytest.fixture(scope="module")
def upper(zoo_dir: Path):
    return _load(zoo_dir / "expert-upper")


def test_evaluate_model_returns_acc_in_unit_interval(zoo_dir: Path, upper):
    scores = evals.evaluate_model(*upper, TASKS, zoo_dir / "tasks", limit=LIMIT)
    assert list(scores) == TASKS
    assert all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in scores.values())
    assert scores["zoo_upper"] >= 0.5


def test_compare_table_and_expert_beats_base(zoo_dir: Path, base, upper):
    table = evals.compare({"base": base, "expert-upper": upper}, ["zoo_upper", "zoo_add"], zoo_dir / "tasks", LIMIT)
    assert list(table.columns) == ["model", "zoo_upper", "zoo_add"]
    assert list(table["model"]) == ["base", "expert-upper"] and table.shape == (2, 3)
    scores = table.set_index("model")
    assert scores.loc["expert-upper", "zoo_upper"] > scores.loc["base", "zoo_upper"] + 0.4


def test_scores_the_model_in_memory_not_a_file(zoo_dir: Path, base, upper):
    model, tok = _load(zoo_dir / "base")
    model.load_state_dict(upper[0].state_dict())  # the expert's weights, never saved as "base"
    in_memory = evals.evaluate_model(model, tok, ["zoo_upper"], zoo_dir / "tasks", limit=LIMIT)
    saved = evals.evaluate_model(*upper, ["zoo_upper"], zoo_dir / "tasks", limit=LIMIT)
    assert in_memory == saved


def test_list_tasks_and_task_dirs_follow_symlinks(zoo_dir: Path, tmp_path: Path):
    assert evals.list_tasks(zoo_dir / "tasks") == TASKS
    assert evals.list_tasks([zoo_dir / "tasks", tmp_path / "missing"]) == TASKS
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "zoo").symlink_to(zoo_dir, target_is_directory=True)
    assert evals.task_dirs(tmp_path / "models") == [tmp_path / "models" / "zoo" / "tasks"]
    assert evals.task_dirs(tmp_path / "missing") == []


def test_unknown_task_suggests_the_closest_name(zoo_dir: Path, base):
    with pytest.raises(KeyError, match="did you mean 'zoo_upper'"):
        evals.evaluate_model(*base, ["zoo_uper"], zoo_dir / "tasks", limit=5)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        evals.evaluate_model(*base, ["zoo_upper"], zoo_dir / "no-such-folder", limit=5)


def test_moved_task_folder_still_finds_its_data(zoo_dir: Path, tmp_path: Path, upper):
    moved = tmp_path / "tasks"
    shutil.copytree(zoo_dir / "tasks", moved)
    config_path = moved / "zoo_upper.yaml"
    config = yaml.safe_load(config_path.read_text())
    config["dataset_kwargs"]["data_files"]["test"] = "/gone/zoo_upper.jsonl"
    config_path.write_text(yaml.safe_dump(config))
    moved_scores = evals.evaluate_model(*upper, ["zoo_upper"], moved, limit=LIMIT)
    assert moved_scores == evals.evaluate_model(*upper, ["zoo_upper"], zoo_dir / "tasks", limit=LIMIT)


def test_command_prints_the_table(zoo_dir: Path, capsys: pytest.CaptureFixture[str]):
    evals_main(
        [
            str(zoo_dir / "base"),
            str(zoo_dir / "expert-add"),
            "--task-dir",
            str(zoo_dir / "tasks"),
            "--tasks",
            "zoo_add",
            "--limit",
            "20",
        ]
    )
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split() == ["model", "zoo_add", "acc"]  # every metric of the task, with its stderr
    assert [line.split()[0] for line in lines[1:]] == ["base", "expert-add"]


@pytest.mark.parametrize(
    ("option", "value", "said"),
    [
        (
            "--tasks",
            "zoo_ad",
            r"task 'zoo_ad' is neither defined in .*/tasks nor built into lm-eval; did you mean 'zoo_add'\?",
        ),
        ("--task-dir", "taskz", r"task folder .*/taskz does not exist"),
    ],
)
def test_command_says_a_wrong_task_or_folder_in_one_line(zoo_dir: Path, capsys, option, value, said):
    """A mistyped task or task folder: one ``error:`` line naming it (no traceback, no Python objects), status 2."""
    args = {"--task-dir": str(zoo_dir / "tasks"), "--tasks": "zoo_add"}
    args[option] = value if option == "--tasks" else str(zoo_dir / value)
    status = evals_main([str(zoo_dir / "base"), *(x for kv in args.items() for x in kv), "--limit", "5"])
    err = capsys.readouterr().err.strip()
    assert status == 2 and len(err.splitlines()) == 1 and re.fullmatch("error: " + said, err), err
    assert "PosixPath" not in err


def test_lm_eval_asks_for_a_git_commit_quietly_outside_a_repository(tmp_path: Path):
    """The commit lm-eval records is None outside a repository, and git's "fatal:" line is not printed."""
    code = "import evals.lm_eval_runner; from lm_eval import evaluator; print(evaluator.get_git_commit_hash())"
    env = {**os.environ, "PYTHONPATH": str(Path(evals.__file__).parents[1]), "GIT_CEILING_DIRECTORIES": str(tmp_path)}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert run.returncode == 0 and run.stdout.strip() == "None", run.stderr
    assert "fatal" not in run.stderr and "not a git repository" not in run.stderr
