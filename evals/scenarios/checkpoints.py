"""Scenario "checkpoints": averaging the checkpoints of one Trainer run vs its last checkpoint.

One expert's fine-tune (task ``add``: the SmolLM2 set's weakest expert) is run again with
``transformers.Trainer`` (``explorer.zoo.trainer_run``: the experts' optimizer, schedule, batch size,
steps and answer-only loss), saving ``N_CHECKPOINTS`` weights-only checkpoints with their training
and validation losses. The averages are made the way a user makes them, through the command line:
``python -m explorer average-run RUN --last-k K | --every-k K | --ema DECAY`` and, for metric-weighted
averaging, ``python -m explorer merge RECIPE.yaml`` with each checkpoint's ``eval_loss`` (read by
``explorer.io.formats.trainer``) as its ``metric``. Each is scored on the task's held-out lm-eval task
beside the last checkpoint and the testbed's own expert (same settings, hand-written loop, all training
examples).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from evals.scenarios.report import ScenarioTable, folder_loader, score_models
from explorer.cli import main as explorer_cli
from explorer.io.formats.trainer import trainer_checkpoints
from explorer.recipe import MergeRecipe
from explorer.zoo.testbed import Testbed
from explorer.zoo.trainer_run import RUN_INFO, train_run

TASK = "add"
N_CHECKPOINTS = 8  # checkpoints saved over the run: save_steps = steps // N_CHECKPOINTS
LAST_K = 4  # last-k average: the newest half of the run's checkpoints
EVERY_K = 2  # every-k average: every other checkpoint, counted back from the last
EMA_DECAY = 0.5  # EMA over all checkpoints: weights 1/2, 1/4, ... from the newest back
MWA_P = 1.0  # metric-weighted averaging: w_i proportional to eval_loss_i^(-p)


def run(bed: Testbed, work: Path, limit: int | None, log: Callable[[str], None]) -> list[ScenarioTable]:
    """Train the run (or reuse it), average it five ways through the CLI, score all; one table."""
    steps = bed.finetune.steps[TASK]
    save_steps = max(1, steps // N_CHECKPOINTS)
    log(f"checkpoints: Trainer run on {TASK}, {steps} steps, a checkpoint every {save_steps}")
    run_dir = train_run(bed, TASK, work / "run", save_steps)
    checkpoints = trainer_checkpoints(run_dir)
    merges = merge_folder(work / "merges", run_dir)
    last = checkpoints.iloc[-1]
    rows = {f"last checkpoint (step {last.step})": (Path(last.path), [int(last.step)])}
    for label, args, chosen in average_settings(checkpoints):
        rows[label] = (average_run(run_dir, merges / label_slug(label), args, log), chosen)
    rows[f"MWA (p={MWA_P:g}, eval loss)"] = (mwa_merge(checkpoints, merges / "mwa", log), checkpoints.step.tolist())
    models = {label: folder_loader(folder) for label, (folder, _) in rows.items()}
    models["testbed expert (reference)"] = folder_loader(bed.experts[TASK])
    task = bed.lm_eval_tasks[TASK]
    log(f"checkpoints: scoring {len(models)} models on {task}")
    scores = score_models(models, [task], bed.task_dir, limit)
    steps_column = [", ".join(map(str, chosen)) for _, chosen in rows.values()] + ["(all training examples)"]
    scores.insert(1, "checkpoint steps", steps_column)
    settings = {
        "task": task,
        "run": f"transformers.Trainer, {steps} steps, lr {bed.finetune.lr:g}, batch {bed.finetune.batch_size}, "
        f"save_steps {save_steps}, answer-only loss",
        "eval_loss": "on training examples held back from the run",
        "merges": "python -m explorer average-run (last-k, every-k, EMA) and python -m explorer merge (mwa)",
    }
    return [ScenarioTable(f"Checkpoint averaging of one Trainer run ({TASK})", scores, note(scores, task), settings)]


def average_settings(checkpoints: pd.DataFrame) -> list[tuple[str, list[str], list[int]]]:
    """``(label, average-run arguments, steps averaged)`` of the last-k, every-k and EMA averages."""
    steps = checkpoints.step.tolist()
    every = steps[::-1][::EVERY_K][::-1]
    return [
        (f"last-{LAST_K} average", ["--last-k", str(LAST_K)], steps[-LAST_K:]),
        (f"every-{EVERY_K} average", ["--every-k", str(EVERY_K)], every),
        (f"EMA (decay {EMA_DECAY:g})", ["--ema", str(EMA_DECAY)], steps),
    ]


def average_run(run_dir: Path, out: Path, args: list[str], log: Callable[[str], None]) -> Path:
    """``python -m explorer average-run RUN_DIR ARGS --out OUT`` unless ``out`` is already there.

    Raises:
        RuntimeError: the command refused (its message is on stderr).
    """
    if not out.is_dir():
        log(f"checkpoints: python -m explorer average-run {run_dir} {' '.join(args)} --out {out}")
        _cli(["average-run", str(run_dir), *args, "--out", str(out)])
    return out


def mwa_merge(checkpoints: pd.DataFrame, out: Path, log: Callable[[str], None]) -> Path:
    """Metric-weighted average (``mwa``) of all checkpoints, each weighted by its ``eval_loss``^(-p).

    The recipe goes to ``out.yaml`` and runs as ``python -m explorer merge out.yaml --out out``.
    """
    if not out.is_dir():
        recipe = MergeRecipe(
            merge_method="mwa",
            models=[
                {"model": p, "parameters": {"metric": float(m)}}
                for p, m in zip(checkpoints.path, checkpoints.eval_loss, strict=True)
            ],
            parameters={"p": MWA_P, "metric_kind": "loss"},
        )
        yaml_path = out.with_suffix(".yaml")
        yaml_path.write_text(recipe.to_yaml())
        log(f"checkpoints: python -m explorer merge {yaml_path} --out {out}")
        _cli(["merge", str(yaml_path), "--out", str(out)])
    return out


def merge_folder(folder: Path, run_dir: Path) -> Path:
    """``folder`` for the averages of ``run_dir``: emptied when it holds averages of another run."""
    stamp = folder / RUN_INFO
    info = (run_dir / RUN_INFO).read_text()
    if not (stamp.is_file() and stamp.read_text() == info):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        stamp.write_text(info)
    return folder


def label_slug(label: str) -> str:
    """A folder name for a row label: ``"last-4 average"`` -> ``"last-4-average"``."""
    return "".join(c if c.isalnum() or c in "-." else "-" for c in label).strip("-")


def note(scores: pd.DataFrame, task: str) -> str:
    """What the table shows: each average against the last checkpoint, in units of its stderr."""
    acc, err = scores[task].tolist(), scores[f"{task} stderr"].tolist()
    labels = scores.model.tolist()
    base_acc, base_err = acc[0], err[0]
    parts = []
    for label, a in zip(labels[1:-1], acc[1:-1], strict=True):
        gap = a - base_acc
        word = (
            "within one stderr of"
            if abs(gap) <= base_err
            else f"{'above' if gap > 0 else 'below'} by more than the stderr of"
        )
        parts.append(f"{label} {a:.2f} ({word} it)")
    best = max(range(1, len(acc) - 1), key=lambda i: acc[i])
    summary = (
        f"The best average is {labels[best]} ({acc[best]:.2f} vs {base_acc:.2f})"
        if acc[best] > base_acc
        else "No average beats the last checkpoint"
    )
    return (
        f"On {task} the last checkpoint scores {base_acc:.2f} ± {base_err:.2f}; "
        + "; ".join(parts)
        + f". {summary}; the testbed's expert scores {acc[-1]:.2f}."
    )


def _cli(argv: list[str]) -> None:
    status = explorer_cli(argv)
    if status != 0:
        raise RuntimeError(f"python -m explorer {' '.join(argv)} failed with status {status}")
