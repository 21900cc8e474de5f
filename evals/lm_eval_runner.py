"""lm-eval on models already in memory, over local task folders, offline.

Tasks come from folders of lm-eval YAML files (the zoo writes one per expert into ``<zoo>/tasks``);
models are ``(model, tokenizer)`` pairs wrapped in ``HFLM(pretrained=model, tokenizer=tokenizer)``,
so a merge is scored without being saved and reloaded. Nothing touches the network: the Hugging Face
offline switches are set before lm-eval (and ``datasets``) are imported.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import difflib
import functools
import logging
import math
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import pandas as pd
import yaml
from datasets.exceptions import DatasetNotFoundError
from huggingface_hub.errors import OfflineModeIsEnabled
from lm_eval import evaluator as lm_eval_evaluator
from lm_eval import simple_evaluate
from lm_eval.loggers.utils import get_commit_from_path
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager
from transformers import PreTrainedModel, PreTrainedTokenizerBase

TaskDirs = str | Path | Sequence[str | Path]  # one task folder or several
STDERR_ITERS = 100  # > 0 makes lm-eval report stderr; acc's mean has a closed form, nothing is resampled
MAX_SEARCH_DEPTH = 3  # task_dirs() looks this many folders deep

# lm-eval warns on every model object passed as `pretrained`: here that is the intended use.
EXPECTED_WARNINGS = (
    "`pretrained` model kwarg is not of type `str`",
    "Passed an already-initialized",
)


class _DropExpectedWarnings(logging.Filter):
    """Drops lm-eval's log records that start with one of ``EXPECTED_WARNINGS``."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(EXPECTED_WARNINGS)


logging.getLogger("lm_eval").setLevel(logging.WARNING)


@functools.cache
def _environment() -> dict:
    """What lm-eval's ``add_env_info`` records (torch's environment report, package versions), gathered once."""
    found: dict = {}
    _add_env_info(found)
    return found


def _add_env_info_once(storage: dict) -> None:
    """lm-eval's ``add_env_info`` with its result kept: it runs ``pip list`` in subprocesses (0.8 s) on every run."""
    storage.update(_environment())


@functools.cache
def _git_hash_quietly() -> str | None:
    """lm-eval's ``get_git_commit_hash`` (the working folder's commit, recorded with each run), asked once.

    Its ``git describe`` writes "fatal: not a git repository" on the terminal when the app runs outside
    a repository; here git's messages are dropped, and the result is None there, as lm-eval's is.
    """
    try:
        run = subprocess.run(["git", "describe", "--always"], capture_output=True, text=True, check=True)
    except (subprocess.CalledProcessError, FileNotFoundError):
        return get_commit_from_path(os.getcwd())
    return run.stdout.strip()


_add_env_info = lm_eval_evaluator.add_env_info
lm_eval_evaluator.add_env_info = _add_env_info_once
lm_eval_evaluator.get_git_commit_hash = _git_hash_quietly
logging.getLogger("lm_eval.models.huggingface").addFilter(_DropExpectedWarnings())


def _as_dirs(task_dir: TaskDirs) -> list[Path]:
    """``task_dir`` as a list of folders."""
    if isinstance(task_dir, (str, Path)):
        return [Path(task_dir)]
    return [Path(d) for d in task_dir]


def _read_yaml(path: Path) -> dict:
    """A YAML file as a dict; ``{}`` when it is not a plain mapping (e.g. uses ``!function``)."""
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, OSError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def task_dirs(models_dir: str | Path) -> list[Path]:
    """Folders holding lm-eval task YAML files (a mapping with a ``task`` key), sorted.

    Searched at most ``MAX_SEARCH_DEPTH`` levels under ``models_dir`` (itself included), following symlinks.
    """
    root = Path(models_dir)
    found = []
    for folder, subdirs, files in os.walk(root, followlinks=True):
        depth = len(Path(folder).relative_to(root).parts)
        subdirs[:] = sorted(d for d in subdirs if not d.startswith(".") and depth < MAX_SEARCH_DEPTH)
        yamls = [Path(folder) / f for f in files if f.endswith((".yaml", ".yml"))]
        if any("task" in _read_yaml(y) for y in yamls):
            found.append(Path(folder))
    return sorted(found)


def _local_manager(dirs: tuple[Path, ...]) -> TaskManager:
    """A TaskManager that knows only the tasks in ``dirs`` (not lm-eval's built-in ones)."""
    return TaskManager(include_path=[str(d) for d in dirs], include_defaults=False)


@functools.cache
def _builtin_manager() -> TaskManager:
    """A TaskManager of lm-eval's built-in tasks (indexing ~15k of them takes 10-20 s: built once per process)."""
    return TaskManager(include_defaults=True)


def warm_task_index() -> None:
    """Index lm-eval's built-in tasks now, so that naming one later answers at once (the app does it at start-up)."""
    _builtin_manager()


def warm_environment() -> None:
    """Gather lm-eval's environment report now (0.8 s), so that the first evaluation does not wait for it."""
    _environment()


def _task_managers(task_dir: TaskDirs, tasks: Sequence[str]) -> list[tuple[TaskManager, list[str]]]:
    """The TaskManager of each group of ``tasks``: those of the local folders, then lm-eval's built-in ones.

    Raises:
        FileNotFoundError: a task folder does not exist.
        KeyError: a task is neither in ``task_dir`` nor built into lm-eval (the message suggests the closest name).
    """
    dirs = tuple(_as_dirs(task_dir))
    for d in dirs:
        if not d.is_dir():
            raise FileNotFoundError(f"task folder {d} does not exist")
    local = _local_manager(dirs)
    mine = [t for t in tasks if t in local.all_tasks]
    if len(mine) == len(tasks):
        _check_names(tasks, sorted(local.all_tasks), task_dir)  # none given: ValueError
        return [(local, mine)]
    builtin = _builtin_manager()
    _check_names(tasks, [*local.all_tasks, *builtin.all_tasks], task_dir)
    return [(m, names) for m, names in ((local, mine), (builtin, [t for t in tasks if t not in mine])) if names]


def check_tasks(tasks: Sequence[str], task_dir: TaskDirs) -> None:
    """Raise as ``task_metrics`` would for these task names and folders, before any model is loaded.

    Raises:
        FileNotFoundError: a task folder does not exist.
        KeyError: a task is neither in ``task_dir`` nor built into lm-eval (the message suggests the closest name).
        ValueError: no task is given.
    """
    _task_managers(task_dir, tasks)


def list_tasks(task_dir: TaskDirs) -> list[str]:
    """Names of the lm-eval tasks defined in ``task_dir`` (one folder or several), sorted."""
    dirs = tuple(d for d in _as_dirs(task_dir) if d.is_dir())
    return sorted(_local_manager(dirs).all_subtasks) if dirs else []


def _check_names(tasks: Sequence[str], known: Sequence[str], task_dir: TaskDirs) -> None:
    """Raise a ``KeyError`` naming the folder and a close match for each unknown task."""
    if not tasks:
        raise ValueError("no tasks given; pick some of: " + ", ".join(known))
    for task in tasks:
        if task not in known:
            close = difflib.get_close_matches(task, known, n=1)
            hint = f"did you mean {close[0]!r}?" if close else "no task of a close name exists"
            where = " or ".join(str(d) for d in _as_dirs(task_dir))
            raise KeyError(f"task {task!r} is neither defined in {where} nor built into lm-eval; {hint}")


def _task_spec(manager: TaskManager, task: str) -> str | dict:
    """The task name, or its config with ``data_files`` re-pointed when the folder was moved.

    The zoo writes absolute ``data_files`` paths (``datasets`` resolves relative ones against the
    working directory). When such a file is missing but a file of the same name lies beside the
    task's YAML — the task folder was moved or copied — that file is used instead.
    """
    yaml_path = manager.task_index[task].yaml_path
    config = _read_yaml(Path(yaml_path)) if yaml_path else {}
    files = (config.get("dataset_kwargs") or {}).get("data_files")
    if not isinstance(files, dict):
        return task
    fixed = {}
    for split, file in files.items():
        beside = Path(yaml_path).parent / Path(str(file)).name
        fixed[split] = str(beside) if not Path(str(file)).exists() and beside.exists() else file
    if fixed == files:
        return task
    return {**config, "dataset_kwargs": {**config["dataset_kwargs"], "data_files": fixed}}


class Score(NamedTuple):
    """One metric of one task as lm-eval reports it.

    Attributes:
        value: the metric (acc and exact_match in [0, 1]; perplexities >= 1; bits_per_byte >= 0).
        stderr: lm-eval's standard error of ``value``; NaN where lm-eval reports none (e.g. perplexities).
        n: examples scored.
        higher_is_better: lm-eval's direction of the metric (False for perplexities and bits_per_byte).
    """

    value: float
    stderr: float
    n: int
    higher_is_better: bool = True


class TaskDataMissing(FileNotFoundError):
    """A task's dataset is neither a local file nor in the Hugging Face datasets cache (never downloaded here)."""


def _as_float(value) -> float:
    """lm-eval's number, or NaN for its ``"N/A"`` (no standard error computed)."""
    return float(value) if isinstance(value, (int, float)) else math.nan


def _metrics(entry: dict, higher: dict, n: int) -> dict[str, Score]:
    """Every ``metric,filter`` lm-eval reported in one task's (or group's) result entry, in its order.

    Labels are the metric name, with the filter in parentheses unless it is lm-eval's ``none``:
    ``acc``, ``acc_norm``, ``exact_match (strict-match)``, ``word_perplexity``.
    """
    scores = {}
    for key, value in entry.items():
        metric, _, filter_name = key.partition(",")
        if not filter_name or metric.endswith("_stderr") or not isinstance(value, (int, float)):
            continue
        label = metric if filter_name == "none" else f"{metric} ({filter_name})"
        stderr = _as_float(entry.get(f"{metric}_stderr,{filter_name}"))
        scores[label] = Score(float(value), stderr, n, bool(higher.get(metric, True)))
    return scores


def _evaluate(lm: HFLM, manager: TaskManager, tasks: Sequence[str], limit: int | None) -> dict:
    """lm-eval's ``simple_evaluate`` results; TaskDataMissing at once when a dataset would need the network."""
    try:
        return simple_evaluate(
            model=lm,
            tasks=[_task_spec(manager, t) for t in tasks],
            task_manager=manager,
            limit=limit,
            bootstrap_iters=STDERR_ITERS,
            log_samples=False,
        )
    except (ConnectionError, DatasetNotFoundError, OfflineModeIsEnabled) as e:
        raise TaskDataMissing(
            f"the data of task(s) {', '.join(tasks)} is not on this machine ({e}); nothing is downloaded here: "
            "run the same evaluation once on a machine with network (or datasets.load_dataset) and copy "
            "~/.cache/huggingface/datasets here, or pick a task defined in a local folder"
        ) from e


def task_metrics(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    tasks: Sequence[str],
    task_dir: TaskDirs,
    limit: int | None = None,
    batch_size: int = 32,
) -> dict[str, dict[str, Score]]:
    """Score an in-memory model with lm-eval: every metric every task reports, with its standard error.

    Args:
        model: a causal LM, left on its device (not saved, not reloaded).
        tokenizer: its tokenizer.
        tasks: lm-eval task or group names: defined in ``task_dir`` (e.g. ``["zoo_add"]``) or built into
            lm-eval (their data must be on this machine).
        task_dir: folder (or folders) of task YAML files.
        limit: evaluate only the first ``limit`` examples of each task; ``None`` for all.
        batch_size: sequences per forward pass.

    Returns:
        ``{task: {metric: Score}}`` for every task lm-eval reports (a group's subtasks too), in its order;
        metrics are labelled as in ``_metrics`` (``acc``, ``exact_match (strict-match)``, ...). For the
        zoo's loglikelihood tasks ``acc`` is the share of examples whose target is exactly the model's
        greedy continuation, with stderr ``sqrt(acc (1 - acc) / (n - 1))``.

    Raises:
        FileNotFoundError: a task folder does not exist.
        KeyError: a task is unknown (the message suggests the closest name).
        TaskDataMissing: a task's data is not on this machine (raised before the model runs).
    """
    groups = _task_managers(task_dir, tasks)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    scores = {}
    for manager, names in groups:
        results = _evaluate(lm, manager, names, limit)
        counts = {t: int(c["effective"]) for t, c in results.get("n-samples", {}).items()}
        tables = {**results["results"], **results.get("groups", {})}
        higher = results.get("higher_is_better", {})
        for task, entry in tables.items():
            n = counts.get(task) or sum(counts.get(sub, 0) for sub in results.get("group_subtasks", {}).get(task, []))
            scores[task] = _metrics(entry, higher.get(task, {}), n)
    return {t: m for t, m in scores.items() if m}


def task_scores(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    tasks: Sequence[str],
    task_dir: TaskDirs,
    limit: int | None = None,
    batch_size: int = 32,
) -> dict[str, Score]:
    """``{task: Score}`` of each task in ``tasks``: its primary metric (the first it reports; ``acc`` for the zoo's).

    Arguments and errors as in ``task_metrics``.
    """
    metrics = task_metrics(model, tokenizer, tasks, task_dir, limit, batch_size)
    return {t: next(iter(metrics[t].values())) for t in tasks}


def evaluate_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    tasks: Sequence[str],
    task_dir: TaskDirs,
    limit: int | None = None,
    batch_size: int = 32,
) -> dict[str, float]:
    """``{task: value}`` of each task's primary metric: ``task_scores`` without the standard errors."""
    return {t: s.value for t, s in task_scores(model, tokenizer, tasks, task_dir, limit, batch_size).items()}


def metrics_table(model_label: str, metrics: dict[str, dict[str, Score]]) -> pd.DataFrame:
    """``task_metrics``' result as rows: model, task, metric, value, stderr, n, higher_is_better."""
    rows = [
        {"model": model_label, "task": task, "metric": metric, **score._asdict()}
        for task, by_metric in metrics.items()
        for metric, score in by_metric.items()
    ]
    return pd.DataFrame(rows, columns=["model", "task", "metric", *Score._fields])


def compare(
    models: dict[str, tuple[PreTrainedModel, PreTrainedTokenizerBase]],
    tasks: Sequence[str],
    task_dir: TaskDirs,
    limit: int | None = None,
    batch_size: int = 32,
) -> pd.DataFrame:
    """Score several in-memory models on the same tasks.

    Args:
        models: ``{label: (model, tokenizer)}``, e.g. ``{"base": ..., "merge": ...}``.
        tasks: task names, as in ``task_metrics``.
        task_dir: folder (or folders) of task YAML files.
        limit: examples per task; ``None`` for all.
        batch_size: sequences per forward pass.

    Returns:
        One row per model in ``models`` order: a ``model`` column with the label, then one column per
        task holding its primary metric (``task_scores``).
    """
    rows = [
        {"model": label, **evaluate_model(model, tok, tasks, task_dir, limit, batch_size)}
        for label, (model, tok) in models.items()
    ]
    return pd.DataFrame(rows, columns=["model", *tasks])
