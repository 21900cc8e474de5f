"""A scenario's result: one table of lm-eval scores (acc ± stderr, examples) and an honest note.

Models are given as loaders, ``{label: () -> (model, tokenizer)}``, and scored one at a time, so a
table of many SmolLM2 variants holds one model in memory at once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from evals.lm_eval_runner import TaskDirs, task_scores
from explorer.session import MergeSession
from explorer.zoo.testbed import load_model

Loader = Callable[[], tuple[PreTrainedModel, PreTrainedTokenizerBase]]


def folder_loader(folder: str | Path) -> Loader:
    """A loader of the checkpoint in ``folder`` (float32, with its tokenizer)."""
    return lambda: load_model(folder)


def session_loader(session: MergeSession, merge: Callable[[], dict]) -> Loader:
    """A loader that builds ``merge()``'s tensors into a model in memory, with the session's reference tokenizer."""
    return lambda: (session.build_model(merge()), AutoTokenizer.from_pretrained(session.reference.path))


@dataclass
class ScenarioTable:
    """One README table.

    Attributes:
        title: what the table compares, e.g. ``"Fisher-weighted vs plain averaging (say + rev)"``.
        scores: ``score_models``' frame, possibly with extra columns (e.g. a merge weight).
        note: one or two sentences on what the table shows, written from the numbers in it.
        settings: what produced it (methods, parameters, steps), printed under the table.
    """

    title: str
    scores: pd.DataFrame
    note: str = ""
    settings: dict = field(default_factory=dict)


def score_models(
    models: dict[str, Loader],
    tasks: Sequence[str],
    task_dir: TaskDirs,
    limit: int | None = None,
    batch_size: int = 32,
) -> pd.DataFrame:
    """lm-eval scores of each model on every task, one model in memory at a time.

    Args:
        models: ``{label: loader}``; each loader returns ``(model, tokenizer)`` and is called once.
        tasks: lm-eval task names in ``task_dir``.
        task_dir: folder (or folders) of task YAML files.
        limit: examples per task; ``None`` for all.
        batch_size: sequences per forward pass.

    Returns:
        One row per model in ``models`` order: ``model`` (the label), then per task ``TASK`` (acc in
        [0, 1]) and ``TASK stderr``, and ``n`` (examples per task; the largest when tasks differ).
    """
    rows = []
    for label, load in models.items():
        model, tokenizer = load()
        scores = task_scores(model, tokenizer, tasks, task_dir, limit, batch_size)
        del model
        row = {"model": label}
        for task, score in scores.items():
            row[task] = score.value
            row[f"{task} stderr"] = score.stderr
        row["n"] = max(s.n for s in scores.values())
        rows.append(row)
    return pd.DataFrame(rows)


def to_markdown(table: ScenarioTable) -> str:
    """The table as README markdown: a heading, ``acc ± stderr`` cells, the settings and the note."""
    frame = table.scores.copy()
    for column in [c for c in frame.columns if f"{c} stderr" in frame.columns]:
        frame[column] = [
            f"{a:.2f} ± {s:.2f}" for a, s in zip(frame[column], frame.pop(f"{column} stderr"), strict=True)
        ]
    lines = [f"#### {table.title}", "", frame.to_markdown(index=False, floatfmt=".2f"), ""]
    if table.settings:
        lines += ["Settings: " + "; ".join(f"{k}: {v}" for k, v in table.settings.items()), ""]
    if table.note:
        lines += [table.note, ""]
    return "\n".join(lines)
