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
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import pandas as pd
import yaml
from lm_eval import simple_evaluate
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager
from transformers import PreTrainedModel, PreTrainedTokenizerBase

TaskDirs = str | Path | Sequence[str | Path]  # one task folder or several
METRIC = "acc,none"  # lm-eval's result key for the acc metric without a filter
STDERR = "acc_stderr,none"  # and for its standard error
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


def _task_manager(task_dir: TaskDirs) -> TaskManager:
    """A TaskManager that knows only the tasks in ``task_dir`` (not lm-eval's built-in ones)."""
    dirs = _as_dirs(task_dir)
    for d in dirs:
        if not d.is_dir():
            raise FileNotFoundError(f"task folder {d} does not exist")
    return TaskManager(include_path=[str(d) for d in dirs], include_defaults=False)


def list_tasks(task_dir: TaskDirs) -> list[str]:
    """Names of the lm-eval tasks defined in ``task_dir`` (one folder or several), sorted."""
    dirs = [d for d in _as_dirs(task_dir) if d.is_dir()]
    return sorted(_task_manager(dirs).all_subtasks) if dirs else []


def _check_names(tasks: Sequence[str], known: Sequence[str], task_dir: TaskDirs) -> None:
    """Raise a ``KeyError`` naming the folder and a close match for each unknown task."""
    if not tasks:
        raise ValueError("no tasks given; pick some of: " + ", ".join(known))
    for task in tasks:
        if task not in known:
            close = difflib.get_close_matches(task, known, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"known: {', '.join(known) or 'none'}"
            raise KeyError(f"task {task!r} is not defined in {task_dir}; {hint}")


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
    """One task's lm-eval result: ``acc`` in [0, 1], its standard error, and the examples scored."""

    acc: float
    stderr: float
    n: int


def task_scores(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    tasks: Sequence[str],
    task_dir: TaskDirs,
    limit: int | None = None,
    batch_size: int = 32,
) -> dict[str, Score]:
    """Score an in-memory model on local lm-eval tasks: acc, its standard error and the example count.

    Args:
        model: a causal LM, left on its device (not saved, not reloaded).
        tokenizer: its tokenizer.
        tasks: task names defined in ``task_dir``, e.g. ``["zoo_add", "zoo_upper"]``.
        task_dir: folder (or folders) of task YAML files.
        limit: evaluate only the first ``limit`` examples of each task; ``None`` for all.
        batch_size: sequences per forward pass.

    Returns:
        ``{task: Score}``. acc is lm-eval's mean of per-example accuracies (for the zoo's
        loglikelihood tasks: the share of examples whose target is exactly the model's greedy
        continuation); stderr is lm-eval's closed-form standard error of that mean,
        ``sqrt(acc (1 - acc) / (n - 1))``.

    Raises:
        FileNotFoundError: a task folder does not exist.
        KeyError: a task is not defined there (the message suggests the closest name).
    """
    manager = _task_manager(task_dir)
    _check_names(tasks, manager.all_subtasks, task_dir)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    results = simple_evaluate(
        model=lm,
        tasks=[_task_spec(manager, t) for t in tasks],
        task_manager=manager,
        limit=limit,
        bootstrap_iters=STDERR_ITERS,
        log_samples=False,
    )
    return {
        t: Score(
            float(results["results"][t][METRIC]),
            float(results["results"][t][STDERR]),
            int(results["n-samples"][t]["effective"]),
        )
        for t in tasks
    }


def evaluate_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    tasks: Sequence[str],
    task_dir: TaskDirs,
    limit: int | None = None,
    batch_size: int = 32,
) -> dict[str, float]:
    """``{task: acc}`` of an in-memory model: ``task_scores`` without the standard errors."""
    return {t: s.acc for t, s in task_scores(model, tokenizer, tasks, task_dir, limit, batch_size).items()}


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
        tasks: task names, as in ``evaluate_model``.
        task_dir: folder (or folders) of task YAML files.
        limit: examples per task; ``None`` for all.
        batch_size: sequences per forward pass.

    Returns:
        One row per model in ``models`` order: a ``model`` column with the label, then one ``acc``
        column per task.
    """
    rows = [
        {"model": label, **evaluate_model(model, tok, tasks, task_dir, limit, batch_size)}
        for label, (model, tok) in models.items()
    ]
    return pd.DataFrame(rows, columns=["model", *tasks])
