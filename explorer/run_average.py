"""Recipes that average the checkpoints of one Trainer run: last k, every k-th, EMA (``python -m explorer average-run``).

A run folder holds ``checkpoint-STEP/`` folders (``explorer.io.formats.trainer.trainer_checkpoints``,
ordered by step, oldest first). ``run_recipe`` picks checkpoints and weights with the pure helpers of
``explorer.methods.checkpoint_averaging`` and returns an ordinary ``MergeRecipe``: ``linear`` with
equal weights (1 each, normalized) over the chosen checkpoints (last k, every k-th counted back from the newest, or all),
or ``ema`` (decay) over the chosen checkpoints oldest first. Checkpoints whose weight is 0 are left
out of the recipe, so they are never read. The recipe runs through the normal streaming merge
(``explorer.executor.merge_to_folder``) and replays with ``python -m explorer merge``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from explorer.choices import DType
from explorer.io.formats.trainer import trainer_checkpoints
from explorer.methods.checkpoint_averaging import every_kth_weights, last_k_weights
from explorer.recipe import MergeRecipe


def run_recipe(
    run_dir: str | Path,
    last_k: Optional[int] = None,
    every_k: Optional[int] = None,
    ema: Optional[float] = None,
    dtype: DType | str = DType.float32,
) -> MergeRecipe:
    """The recipe averaging the checkpoints of the Trainer run ``run_dir``.

    Args:
        run_dir: a Trainer ``output_dir`` holding ``checkpoint-STEP`` folders.
        last_k: choose the k newest checkpoints.
        every_k: choose every k-th checkpoint counted back from the newest (the newest always in).
        ema: EMA decay in [0, 1]: the ``ema`` method over the chosen checkpoints (all when neither
            ``last_k`` nor ``every_k`` is given), oldest first; without it, a uniform ``linear`` average.
        dtype: output dtype of the merge.

    Returns:
        A validated recipe naming the chosen checkpoints by absolute path, oldest first.

    Raises:
        CheckpointError: ``run_dir`` holds no ``checkpoint-STEP`` folders.
        ValueError: both or neither selection (with no ``ema``) given, k outside 1..number of
            checkpoints, or decay outside [0, 1].
    """
    if last_k is not None and every_k is not None:
        raise ValueError("choose the checkpoints with one of last_k or every_k, not both")
    if last_k is None and every_k is None and ema is None:
        raise ValueError("say what to average: last_k, every_k or an ema decay")
    paths = [str(Path(p).resolve()) for p in trainer_checkpoints(run_dir)["path"]]
    n = len(paths)
    if last_k is not None:
        weights = last_k_weights(n, last_k)
    elif every_k is not None:
        weights = every_kth_weights(n, every_k)
    else:
        weights = [1.0 / n] * n
    chosen = [(p, w) for p, w in zip(paths, weights, strict=True) if w > 0]
    if ema is not None:
        return MergeRecipe(
            merge_method="ema", models=[{"model": p} for p, _ in chosen], parameters={"decay": ema}, dtype=dtype
        )
    return MergeRecipe(
        merge_method="linear",
        models=[{"model": p, "parameters": {"weight": 1.0}} for p, _ in chosen],  # uniform: normalize divides by k
        parameters={"normalize": True},
        dtype=dtype,
    )
