"""Hugging Face Trainer output folders: ``RUN/checkpoint-STEP/`` saved during training.

Each ``checkpoint-STEP`` is an ordinary checkpoint folder (or a LoRA adapter folder) and opens like
any other; ``trainer_state.json`` beside its weights holds the step and the logged losses, which
checkpoint averaging and metric-weighted averaging use as per-model weights.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import TYPE_CHECKING

from explorer.io.formats.base import CheckpointError, read_json

if TYPE_CHECKING:  # pandas is imported where a table is made: a merge never needs it
    import pandas as pd

STATE_FILE = "trainer_state.json"
CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)$")


def is_run_dir(path: Path) -> bool:
    """True when ``path`` holds at least one ``checkpoint-STEP`` folder."""
    return path.is_dir() and any(CHECKPOINT_NAME.match(c.name) and c.is_dir() for c in path.iterdir())


def trainer_checkpoints(run_dir: str | Path) -> pd.DataFrame:
    """The checkpoints of one Trainer run, oldest first.

    Returns a DataFrame with columns ``path`` (str), ``step`` (int, global_step), ``epoch`` (float),
    ``loss`` (last training loss logged at or before the step) and ``eval_loss`` (last evaluation loss
    logged at or before the step); a value never logged is NaN. Raises CheckpointError when the folder
    has no ``checkpoint-STEP`` folders.
    """
    import pandas as pd

    run_dir = Path(run_dir).expanduser()
    folders = [c for c in run_dir.iterdir() if CHECKPOINT_NAME.match(c.name) and c.is_dir()] if run_dir.is_dir() else []
    if not folders:
        raise CheckpointError(
            f"{run_dir}: no checkpoint-STEP folders; give the output_dir of a Trainer run saved with save_strategy"
        )
    rows = [checkpoint_state(folder) for folder in folders]
    return pd.DataFrame(rows, columns=["path", "step", "epoch", "loss", "eval_loss"]).sort_values(
        "step", ignore_index=True
    )


def checkpoint_state(folder: Path) -> dict:
    """What ``trainer_state.json`` in ``folder`` says: path, step, epoch, loss, eval_loss, examples.

    ``step`` is global_step (else the number in a ``checkpoint-STEP`` name, else NaN); ``examples`` the
    training examples seen, global_step x train_batch_size (NaN when either is unknown). Values never
    logged are NaN. Raises CheckpointError when trainer_state.json is not valid JSON.
    """
    match = CHECKPOINT_NAME.match(folder.name)
    state = read_json(folder / STATE_FILE, STATE_FILE) if (folder / STATE_FILE).is_file() else {}
    step = int(state.get("global_step", match.group(1) if match else -1))
    step = step if step >= 0 else math.nan
    logged = [entry for entry in state.get("log_history", []) if entry.get("step", 0) <= step]
    return {
        "path": str(folder),
        "step": step,
        "epoch": math.nan if state.get("epoch") is None else float(state["epoch"]),
        "loss": _last(logged, "loss"),
        "eval_loss": _last(logged, "eval_loss"),
        "examples": float(step * state["train_batch_size"])
        if state.get("train_batch_size") and step == step
        else math.nan,
    }


def _last(logged: list[dict], key: str) -> float:
    values = [entry[key] for entry in logged if key in entry]
    return float(values[-1]) if values else math.nan
