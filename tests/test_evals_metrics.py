"""Every metric lm-eval reports (generation, multiple choice, perplexity, groups), labels that never collide.

Tasks are the held-out suite (``evals.heldout``) and groups written in the test; the model is the tiny
zoo's upper expert. Values are checked against lm-eval's own ``simple_evaluate`` on the same model.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import pytest
import yaml
from lm_eval import simple_evaluate
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager

from evals.__main__ import main as evals_main
from evals.heldout import COPY, HELDOUT_TASKS, NEXT_WORD, PERPLEXITY, heldout_task_dir
from evals.labels import distinct_labels
from evals.lm_eval_runner import TaskDataMissing, task_metrics, task_scores
from explorer.zoo.testbed import load_model

LIMIT = 12


@pytest.fixture(scope="module")
def suite(tmp_path_factory) -> Path:
    return heldout_task_dir(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def upper(zoo_dir: Path):
    return load_model(zoo_dir / "expert-upper")


@pytest.fixture(scope="module")
def metrics(upper, suite: Path):
    return task_metrics(*upper, list(HELDOUT_TASKS), suite, limit=LIMIT)


def test_every_kind_reports_all_its_metrics_with_direction(metrics):
    assert list(metrics[NEXT_WORD]) == ["acc", "acc_norm"]
    assert list(metrics[COPY]) == ["exact_match (remove_whitespace)"]
    assert list(metrics[PERPLEXITY]) == ["word_perplexity", "byte_perplexity", "bits_per_byte"]
    for score in [*metrics[NEXT_WORD].values(), *metrics[COPY].values()]:
        assert 0.0 <= score.value <= 1.0 and score.higher_is_better and score.n == LIMIT
        assert math.isfinite(score.stderr)
    for score in metrics[PERPLEXITY].values():
        assert not score.higher_is_better and math.isnan(score.stderr) and score.n == LIMIT
    assert metrics[PERPLEXITY]["word_perplexity"].value > metrics[PERPLEXITY]["byte_perplexity"].value > 1.0


def test_values_equal_lm_evals_own_results(upper, suite: Path, metrics):
    model, tokenizer = upper
    manager = TaskManager(include_path=[str(suite)], include_defaults=False)
    specs = [{**yaml.safe_load((suite / f"{t}.yaml").read_text())} for t in HELDOUT_TASKS]
    for spec in specs:  # lm-eval itself resolves data files against the working directory: make them absolute
        spec["dataset_kwargs"]["data_files"]["test"] = str(suite / spec["dataset_kwargs"]["data_files"]["test"])
    own = simple_evaluate(
        model=HFLM(pretrained=model, tokenizer=tokenizer),
        tasks=specs,
        task_manager=manager,
        limit=LIMIT,
        bootstrap_iters=100,
    )["results"]
    assert metrics[NEXT_WORD]["acc_norm"].value == own[NEXT_WORD]["acc_norm,none"]
    assert metrics[NEXT_WORD]["acc"].stderr == own[NEXT_WORD]["acc_stderr,none"]
    assert metrics[COPY]["exact_match (remove_whitespace)"].value == own[COPY]["exact_match,remove_whitespace"]
    assert metrics[PERPLEXITY]["bits_per_byte"].value == pytest.approx(own[PERPLEXITY]["bits_per_byte,none"], rel=1e-9)


def test_primary_metric_is_the_first_reported(upper, suite: Path, metrics):
    scores = task_scores(*upper, [COPY, PERPLEXITY], suite, limit=LIMIT)
    assert scores[COPY] == metrics[COPY]["exact_match (remove_whitespace)"]
    assert scores[PERPLEXITY] == metrics[PERPLEXITY]["word_perplexity"]


def test_a_group_reports_its_aggregate_and_its_subtasks(upper, zoo_dir: Path, tmp_path: Path):
    folder = tmp_path / "tasks"
    shutil.copytree(zoo_dir / "tasks", folder)
    group = {
        "group": "zoo_all",
        "task": ["zoo_add", "zoo_upper"],
        "aggregate_metric_list": [{"metric": "acc", "aggregation": "mean", "weight_by_size": True}],
    }
    (folder / "zoo_all.yaml").write_text(yaml.safe_dump(group))
    metrics = task_metrics(*upper, ["zoo_all"], folder, limit=LIMIT)
    assert set(metrics) == {"zoo_all", "zoo_add", "zoo_upper"}
    mean = (metrics["zoo_add"]["acc"].value + metrics["zoo_upper"]["acc"].value) / 2
    assert metrics["zoo_all"]["acc"].value == pytest.approx(mean)
    assert metrics["zoo_all"]["acc"].n == 2 * LIMIT


def test_a_task_whose_data_is_not_here_fails_fast_with_the_fix(upper, zoo_dir: Path):
    start = time.perf_counter()
    with pytest.raises(TaskDataMissing, match="arc_easy.*not on this machine.*nothing is downloaded"):
        task_metrics(*upper, ["arc_easy"], zoo_dir / "tasks", limit=1)
    assert time.perf_counter() - start < 120  # indexing lm-eval's ~15k built-in tasks, then no network wait
    with pytest.raises(KeyError, match="neither defined in .* nor built into lm-eval; did you mean 'arc_easy'"):
        task_metrics(*upper, ["arc_eazy"], zoo_dir / "tasks", limit=1)


def test_distinct_labels_are_the_shortest_distinguishing_ends(tmp_path: Path):
    a, b = tmp_path / "runs" / "a" / "checkpoint-100", tmp_path / "runs" / "b" / "checkpoint-100"
    assert distinct_labels([a, b]) == ["a/checkpoint-100", "b/checkpoint-100"]
    assert distinct_labels([a, tmp_path / "other"]) == ["checkpoint-100", "other"]
    deep = [tmp_path / "x" / "run" / "ck", tmp_path / "y" / "run" / "ck"]
    assert distinct_labels(deep) == ["x/run/ck", "y/run/ck"]
    with pytest.raises(ValueError, match="same model"):
        distinct_labels([a, a.parent / ".." / "a" / "checkpoint-100"])


def test_cli_keeps_both_same_named_checkpoints_and_prints_every_metric(zoo_dir: Path, tmp_path: Path, capsys):
    a, b = tmp_path / "runs" / "a" / "checkpoint-100", tmp_path / "runs" / "b" / "checkpoint-100"
    shutil.copytree(zoo_dir / "expert-upper", a)
    shutil.copytree(zoo_dir / "base", b)
    suite = heldout_task_dir(tmp_path / "cache")
    code = evals_main([str(a), str(b), "--task-dir", str(zoo_dir / "tasks"), "--tasks", "zoo_upper", "--limit", "10"])
    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-2].strip().startswith("a/checkpoint-100") and lines[-1].strip().startswith("b/checkpoint-100"), lines
    assert "zoo_upper acc" in lines[0] and " ± " in lines[-1]
    code = evals_main([str(a), "--task-dir", str(suite), "--tasks", f"{COPY},{NEXT_WORD}", "--limit", "5"])
    assert code == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert f"{COPY} exact_match (remove_whitespace)" in header and f"{NEXT_WORD} acc_norm" in header
    assert evals_main([str(a), str(a), "--task-dir", str(zoo_dir / "tasks")]) == 2
    assert "same model" in capsys.readouterr().err


def test_f1_and_mcc_of_a_two_choice_task_are_reported(upper, suite: Path, tmp_path: Path):
    rows = [json.loads(line) for line in (suite / f"{NEXT_WORD}.jsonl").read_text().splitlines()]
    pairs = []
    for i, row in enumerate(rows):  # the right next word beside one distractor, first or second in turn
        answer = row["choices"][row["gold"]]
        other = next(c for c in row["choices"] if c != answer)
        choices = [answer, other] if i % 2 else [other, answer]
        pairs.append({"context": row["context"], "choices": choices, "gold": choices.index(answer)})
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    config = yaml.safe_load((suite / f"{NEXT_WORD}.yaml").read_text())
    config.update(task="pair_next_word", dataset_kwargs={"data_files": {"test": str(tmp_path / "pairs.jsonl")}})
    config["metric_list"] = [
        {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
        {"metric": "f1", "aggregation": "f1", "higher_is_better": True},
        {"metric": "mcc", "aggregation": "matthews_corrcoef", "higher_is_better": True},
    ]
    (tmp_path / "pair.yaml").write_text(yaml.safe_dump(config))
    metrics = task_metrics(*upper, ["pair_next_word"], tmp_path, limit=LIMIT)["pair_next_word"]
    assert list(metrics) == ["acc", "f1", "mcc"]
    assert 0.0 <= metrics["f1"].value <= 1.0 and -1.0 <= metrics["mcc"].value <= 1.0
