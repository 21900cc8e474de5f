"""Score several merges of the same inputs with lm-eval, each built in memory (the app's path).

``merge_scores`` loads the inputs once into an ``explorer.session.MergeSession``, merges them with
each method in turn and scores every merge without saving it. ``retained_gain`` says how much of an
expert's improvement over the base a merge keeps: the number merging papers report as normalized
accuracy.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import pandas as pd
from transformers import AutoTokenizer

from evals.lm_eval_runner import TaskDirs, evaluate_model
from explorer.session import MergeSession

# label -> (merge_method, global parameters, parameters of every model), e.g.
# "ties d=0.5": ("ties", {}, {"weight": 1.0, "density": 0.5})
MergeSpec = tuple[str, dict, dict]


def merge_scores(
    base: str | Path | None,
    models: Sequence[str | Path],
    merges: dict[str, MergeSpec],
    tasks: Sequence[str],
    task_dir: TaskDirs,
    limit: int | None = None,
    batch_size: int = 32,
    on_merge: Callable[[str], None] | None = None,
) -> pd.DataFrame:
    """lm-eval acc of each merge of ``models`` (over ``base``) on ``tasks``.

    Args:
        base: base checkpoint (``None`` for methods that need none).
        models: checkpoints to merge, all with the same per-model parameters.
        merges: ``{label: (method, parameters, per_model_parameters)}``.
        tasks: lm-eval task names defined in ``task_dir``.
        task_dir: folder (or folders) of task YAML files.
        limit: examples per task; ``None`` for all.
        batch_size: sequences per forward pass.
        on_merge: called with each label once its merge is scored (e.g. to print progress).

    Returns:
        One row per merge in ``merges`` order: a ``merge`` column with the label, then one ``acc``
        column per task.
    """
    session = MergeSession(base, list(models))
    tokenizer = AutoTokenizer.from_pretrained(session.reference.path)
    rows = []
    for label, (method, parameters, per_model) in merges.items():
        recipe = session.recipe(method, parameters, [per_model] * len(models))
        model = session.build_model(session.merge(recipe))
        rows.append({"merge": label, **evaluate_model(model, tokenizer, tasks, task_dir, limit, batch_size)})
        if on_merge:
            on_merge(label)
    return pd.DataFrame(rows, columns=["merge", *tasks])


def retained_gain(merge: float, expert: float, base: float) -> float:
    """Share of an expert's gain over the base that a merge keeps: ``(merge - base) / (expert - base)``.

    1: all of it, 0: none, < 0: worse than the base; ``nan`` when the expert gained nothing. Scores
    are accuracies in [0, 1] on the same examples.
    """
    gain = expert - base
    return (merge - base) / gain if gain > 0 else float("nan")
