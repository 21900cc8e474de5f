"""Is the merge better, and where? Scores of base, experts, merges and the output ensemble side by side.

``score_stream`` runs lm-eval one (model, task) at a time and yields each result as it arrives (the
app shows the first within seconds); ``normalized_scores`` turns the table into the numbers merging
papers report; ``comparison_chart`` draws every task's primary metric with lm-eval's standard errors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from evals.lm_eval_runner import TaskDirs, metrics_table, task_metrics

Loaded = tuple[PreTrainedModel, PreTrainedTokenizerBase]


def score_stream(
    models: dict[str, Callable[[], Loaded]],
    tasks: Sequence[str],
    task_dir: TaskDirs,
    limit: int | None = None,
    batch_size: int = 32,
    should_stop: Callable[[], bool] = lambda: False,
) -> Iterator[pd.DataFrame]:
    """Every metric of every (model, task), one lm-eval run each, yielded as soon as it is scored.

    Args:
        models: ``{label: loader}``; a loader returns ``(model, tokenizer)`` and is called once, when
            that model's first task is scored (e.g. a merge built in memory).
        tasks: lm-eval task names (local folders or lm-eval's built-in tasks with data on this machine).
        task_dir: folder (or folders) of local task YAML files.
        limit: examples per task; ``None`` for all.
        batch_size: sequences per forward pass.
        should_stop: checked before each run; the stream ends early when it returns True.

    Yields:
        ``metrics_table`` rows of one (model, task): model, task, metric, value, stderr, n, higher_is_better.
    """
    for label, load in models.items():
        model, tokenizer = load()
        for task in tasks:
            if should_stop():
                return
            yield metrics_table(label, task_metrics(model, tokenizer, [task], task_dir, limit, batch_size))


def primary(table: pd.DataFrame) -> pd.DataFrame:
    """Each (model, task)'s primary metric (the first lm-eval reports): the rows of ``table`` that hold it."""
    return table.groupby(["model", "task"], sort=False).head(1).reset_index(drop=True)


def wide_scores(table: pd.DataFrame, stderr: bool = False) -> pd.DataFrame:
    """Rows: models; columns: every ``task metric``, in the order they were scored.

    Cells: the values as numbers; with ``stderr``, text ``value ± stderr`` (4 decimals; the value alone
    where lm-eval reports no standard error, e.g. perplexities), as the app's table and the CLI show them.
    """
    frame = table.assign(column=table["task"] + " " + table["metric"])
    if stderr:
        cells = [
            f"{v:.4f}" + ("" if pd.isna(e) else f" ± {e:.4f}")
            for v, e in zip(frame["value"], frame["stderr"], strict=True)
        ]
        frame = frame.assign(value=cells)
    wide = frame.pivot(index="model", columns="column", values="value")
    wide = wide.reindex(index=frame["model"].unique(), columns=frame["column"].unique())
    return wide.rename_axis(columns=None).reset_index()


def _better(value: float, other: float, higher: bool) -> bool:
    return value > other if higher else value < other


def normalized_scores(table: pd.DataFrame, base: str | None, experts: Sequence[str]) -> pd.DataFrame:
    """The numbers merging papers report, per model that is neither the base nor an expert, per task.

    Args:
        table: ``score_stream`` rows (any number of models and tasks).
        base: the base model's label, or None (then no gain is computed).
        experts: the experts' labels.

    Returns:
        One row per (model, task) with the task's primary metric: ``value``; ``vs best expert`` =
        value / the best expert's value on that task (best / value for lower-is-better metrics such as
        perplexity; 1.0 means as good as the best expert); and, when ``base`` is given, ``gain kept`` and
        ``expert``: for the expert whose own task this is (the expert that improves most over the base
        on it), the share of that improvement the model keeps, (value - base) / (expert - base); empty
        where no expert improves over the base.
    """
    scores = primary(table)
    value = scores.set_index(["model", "task"])["value"]
    higher = scores.groupby("task")["higher_is_better"].first()
    rows = []
    for (model, task), v in value.items():
        if model == base or model in experts:
            continue
        experts_here = [(e, value[(e, task)]) for e in experts if (e, task) in value.index]
        row = {"model": model, "task": task, "value": v}
        if experts_here:
            best = max(s for _, s in experts_here) if higher[task] else min(s for _, s in experts_here)
            row["vs best expert"] = (v / best if higher[task] else best / v) if best else float("nan")
        if base is not None and (base, task) in value.index and experts_here:
            start = value[(base, task)]
            owner, end = max(experts_here, key=lambda es: (es[1] - start) * (1 if higher[task] else -1))
            if _better(end, start, higher[task]):
                row["expert"] = owner
                row["gain kept"] = (v - start) / (end - start)
        rows.append(row)
    return pd.DataFrame(rows, columns=["model", "task", "value", "vs best expert", "expert", "gain kept"])


def comparison_chart(table: pd.DataFrame) -> go.Figure:
    """One panel per task: each model's primary metric as a bar with lm-eval's standard error as its error bar."""
    scores = primary(table).assign(label=lambda f: f["task"] + " · " + f["metric"])
    figure = px.bar(
        scores,
        x="model",
        y="value",
        color="model",
        error_y="stderr",
        facet_col="label",
        facet_col_wrap=3,
        title="lm-eval scores (error bars: standard error; perplexities have none and lower is better)",
    )
    figure.update_yaxes(matches=None, showticklabels=True, title=None)
    figure.for_each_annotation(lambda a: a.update(text=a.text.split("=", 1)[-1]))
    return figure
