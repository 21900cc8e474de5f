"""The state behind one browser tab or notebook: chosen inputs, the merges made, the current one.

Plain Python (no gradio): the app's handlers are a few lines each that call these methods and turn
exceptions into messages. A notebook drives the same object directly::

    bench = Workbench(Path("models"))
    bench.load("models/smollm2/base", ["models/smollm2/expert-say", "models/smollm2/expert-rev"])
    bench.merge("ties", {"lambda": 1.0}, [{"weight": 1.0, "density": 0.5}] * 2)
    bench.export("merges/ties-0.5")
"""

from __future__ import annotations

import gc
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import pandas as pd
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from explorer import registry
from explorer.io.checkpoint import discover, open_checkpoint
from explorer.io.formats.trainer import STATE_FILE, checkpoint_state
from explorer.io.writer import is_merge_output
from explorer.progress import Progress
from explorer.recipe import MergeRecipe
from explorer.recipe_values import is_scalar
from explorer.session import MergeSession

Loaded = tuple[PreTrainedModel, PreTrainedTokenizerBase]


class Cancelled(RuntimeError):
    """Raised inside long work when the user asked to cancel it."""


@dataclass
class HistoryEntry:
    """One merge of this workbench: its recipe and the scores evaluations gave it."""

    number: int  # 1, 2, ... in the order the merges were made
    recipe: MergeRecipe
    scores: dict[str, float] = field(default_factory=dict)  # {task: accuracy in [0, 1]}

    @property
    def label(self) -> str:
        """Short name with the settings that differ from the method's defaults, e.g. ``#2 ties (density=0.5,0.5)``."""
        recipe, shown = self.recipe, []
        for p in registry.get(recipe.merge_method).params:
            value = recipe.parameters.get(p.name, p.default)
            values = [e.parameters.get(p.name, value) for e in recipe.models] if p.per_model else [value]
            if any(v != p.default for v in values):
                shown.append(f"{p.name}={_short(values)}")
        shown = ", ".join(shown)
        return f"#{self.number} {self.recipe.merge_method}" + (f" ({shown})" if shown else "")


def _short(values: list) -> str:
    """Values for a label: numbers as %g, a gradient or filtered list as ``per-layer``."""
    return ",".join(f"{v:g}" if isinstance(v, float) else str(v) if is_scalar(v) else "per-layer" for v in values)


@dataclass
class Workbench:
    """Inputs in memory, the merges made from them, and the current merge's tensors.

    ``merge``'s ``parameters`` are the method's global params by name (e.g. ``{"lambda": 1.0}``) and
    ``per_model`` holds one dict per expert, in load order, of its per-model params (e.g.
    ``{"weight": 1.0, "density": 0.5}``); ``explorer.registry.get(method).params`` lists both kinds
    with ranges and defaults, and a param left out takes its default.
    """

    models_dir: Path
    session: Optional[MergeSession] = None
    recipe: Optional[MergeRecipe] = None  # of the current merge
    merged: Optional[dict[str, torch.Tensor]] = None  # the current merge, {name: tensor}
    history: list[HistoryEntry] = field(default_factory=list)
    cancel_requested: bool = False  # set from another thread; long work stops at its next progress step
    _loaded: dict[str, Loaded] = field(default_factory=dict)  # models built for Evaluate, by label

    # Models ---------------------------------------------------------------------------------------

    def checkpoints(self) -> list[Path]:
        """Checkpoint folders found under ``models_dir``."""
        return discover(self.models_dir)

    def label(self, path: Path | str) -> str:
        """Short display name of a checkpoint: its path relative to ``models_dir`` when inside it."""
        path = Path(os.path.abspath(path))
        try:
            return str(path.relative_to(os.path.abspath(self.models_dir)))
        except ValueError:
            return str(path)

    def catalog(self) -> pd.DataFrame:
        """One row per checkpoint under ``models_dir``, for the Models tab.

        Columns: label, format, architecture, layers, size in MB, dtype of its tensors; a checkpoint
        that cannot be opened says why in ``problem``.
        """
        rows = []
        for path in self.checkpoints():
            row = {"checkpoint": self.label(path)}
            try:
                ckpt = open_checkpoint(path)
                dtypes = sorted({ckpt.dtype(n) for n in ckpt.names()})
                size = sum(f.stat().st_size for f in set(ckpt.files.values()))
                row |= {
                    "format": type(ckpt).__name__.removesuffix("Checkpoint") or "safetensors",
                    "architecture": ckpt.architecture,
                    "layers": ckpt.num_layers,
                    "size (MB)": round(size / 1e6, 1),
                    "dtype": "/".join(dtypes),
                    "problem": "",
                }
                ckpt.close()
            except Exception as e:  # noqa: BLE001  (a broken checkpoint is a row, not a failure of the listing)
                row["problem"] = str(e)
            rows.append(row)
        return pd.DataFrame(
            rows, columns=["checkpoint", "format", "architecture", "layers", "size (MB)", "dtype", "problem"]
        )

    def load(self, base: Optional[str], experts: list[str], progress: Optional[Progress] = None) -> str:
        """Open and check ``base`` and ``experts``; returns a one-line report. Raises on bad input.

        Forgets the previous inputs, merges and their history: they were of other models.
        """
        if not experts:
            raise ValueError("choose at least one expert to merge")
        if base and any(os.path.abspath(base) == os.path.abspath(e) for e in experts):
            raise ValueError(f"{self.label(base)} is the base; untick it among the experts")
        self.close()
        self.session = MergeSession(base, experts, self.guard(progress))
        n = sum(t.numel() for t in self.session.models[0].values())
        arch = self.session.reference.architecture
        return (
            f"Loaded {len(experts)} model(s){' and a base' if base else ''}: {arch}, {n / 1e6:.2f}M parameters, "
            f"{len(self.session.names)} tensors, all compatible; {self.session.device_choice.describe()}."
        )

    def close(self) -> None:
        """Forget the loaded inputs, the merges and the models built for evaluation: their memory is freed."""
        self.session = None
        self.recipe, self.merged, self.history, self._loaded = None, None, [], {}
        if torch.cuda.is_available():  # torch keeps freed GPU memory for itself: give it back for the next choice
            gc.collect()
            torch.cuda.empty_cache()

    def training_metadata(self) -> dict[str, dict[str, float]]:
        """Per-model parameter values that the loaded experts' ``trainer_state.json`` gives, by label.

        ``examples`` is FedAvg's n_i = global_step x train_batch_size; ``metric`` is metric-weighted
        averaging's loss: the last eval_loss, else the last training loss. Missing values are left out.
        """
        found = {}
        for path in self.require_session().model_paths:
            if not (Path(path) / STATE_FILE).is_file():
                continue
            state = checkpoint_state(Path(path))
            loss = state["eval_loss"] if math.isfinite(state["eval_loss"]) else state["loss"]
            values = {"examples": state["examples"], "metric": loss}
            found[self.label(path)] = {k: v for k, v in values.items() if math.isfinite(v)}
        return found

    def require_session(self) -> MergeSession:
        """The loaded inputs; ValueError saying what to do when nothing is loaded."""
        if self.session is None:
            raise ValueError("no models loaded yet: choose a base and experts in the Models tab and press Load")
        return self.session

    # Merging --------------------------------------------------------------------------------------

    def recipe_for(
        self, method: str, parameters: dict, per_model: list[dict], dtype: str = "float32", seed: int = 0
    ) -> MergeRecipe:
        """The validated recipe these settings make over the loaded inputs (nothing is merged)."""
        session = self.require_session()
        return session.recipe(method, parameters, per_model, dtype, seed)

    def merge(
        self,
        method: str,
        parameters: dict,
        per_model: list[dict],
        dtype: str = "float32",
        seed: int = 0,
        progress: Optional[Progress] = None,
    ) -> str:
        """Merge the loaded models in memory; returns a one-line summary. Raises on bad parameters."""
        return self.merge_recipe(self.recipe_for(method, parameters, per_model, dtype, seed), progress)

    def merge_recipe(self, recipe: MergeRecipe, progress: Optional[Progress] = None) -> str:
        """Merge ``recipe``, loading its base and models first when they are not the loaded ones."""
        if self.session is None or not self.session.same_inputs(recipe):
            self.load(recipe.base_model, recipe.input_models(), progress)
        session = self.require_session()
        self.merged = None
        started = time.perf_counter()
        self.merged = session.merge(recipe, self.guard(progress))
        seconds = time.perf_counter() - started
        self.recipe = recipe
        self.history.append(HistoryEntry(len(self.history) + 1, recipe))
        where = "the CPU" if session.device.type == "cpu" else session.device
        return (
            f"Merged {len(session.model_paths)} model(s) with {recipe.merge_method} into {len(self.merged)} tensors "
            f"({recipe.dtype}): {self.history[-1].label}. {seconds:.2f} s on {where}; {session.stage_cache.describe()}."
        )

    def require_merge(self) -> tuple[MergeRecipe, dict[str, torch.Tensor]]:
        """The current recipe and merged tensors; ValueError saying what to do before any merge."""
        if self.merged is None or self.recipe is None:
            raise ValueError("nothing merged yet: press Merge in the Merge tab first")
        return self.recipe, self.merged

    def merged_tensors(self, number: int, progress: Optional[Progress] = None) -> dict[str, torch.Tensor]:
        """The tensors of history entry ``number``: the current merge, or that recipe merged again.

        Merges are deterministic: the same recipe gives the same tensors.
        """
        entry = self.history[number - 1]
        if entry.recipe is self.recipe and self.merged is not None:
            return self.merged
        return self.require_session().merge(entry.recipe, self.guard(progress))

    # Evaluation -----------------------------------------------------------------------------------

    def eval_loaders(
        self, include_inputs: bool, merges: Optional[list[int]] = None, progress: Optional[Progress] = None
    ) -> dict[str, Callable[[], Loaded]]:
        """{label: loader} of the models to evaluate; a loader builds its model in memory on first call, then reuses it.

        Base and experts when ``include_inputs``, then history entries ``merges`` (default: the current
        merge). Every input format that loads also evaluates (GGUF, LoRA, ``BASE+ADAPTER``). Only the
        models asked for stay in memory.
        """
        session = self.require_session()
        self.require_merge()
        self.cancel_requested = False
        tokenizer = session.reference.tokenizer()
        if tokenizer is None:
            raise ValueError(
                f"{session.reference.path} has no tokenizer files; evaluation needs them (add them from the original model)"
            )
        inputs = ([(session.base_ckpt, session.base)] if session.base_ckpt else []) + list(
            zip(session.model_ckpts, session.models, strict=True)
        )
        wanted = [(self.label(c.path), lambda t=t: t) for c, t in inputs] if include_inputs else []
        numbers = merges or [self.history[-1].number]
        wanted += [(self.history[n - 1].label, lambda n=n: self.merged_tensors(n, progress)) for n in numbers]
        self._loaded = {label: model for label, model in self._loaded.items() if label in dict(wanted)}

        def loader(label: str, tensors: Callable[[], dict[str, torch.Tensor]]) -> Callable[[], Loaded]:
            def load() -> Loaded:
                if label not in self._loaded:
                    self.check_cancel()
                    self._loaded[label] = (session.build_model(tensors()), tokenizer)
                return self._loaded[label]

            return load

        return {label: loader(label, tensors) for label, tensors in wanted}

    def eval_models(
        self, include_inputs: bool, merges: Optional[list[int]] = None, progress: Optional[Progress] = None
    ) -> dict[str, Loaded]:
        """{label: (model, tokenizer)}: every ``eval_loaders`` model built now."""
        return {label: load() for label, load in self.eval_loaders(include_inputs, merges, progress).items()}

    def expert_labels(self) -> list[str]:
        """Labels of the loaded experts, in load order (as ``eval_loaders`` names them)."""
        return [self.label(c.path) for c in self.require_session().model_ckpts]

    def base_label(self) -> Optional[str]:
        """Label of the loaded base, or None."""
        session = self.require_session()
        return self.label(session.base_ckpt.path) if session.base_ckpt else None

    def record_scores(self, table: pd.DataFrame) -> None:
        """Store the merge rows of an evaluation table (columns: model, then tasks) in the history."""
        by_label = {e.label: e for e in self.history}
        for row in table.to_dict("records"):
            if row["model"] in by_label:
                by_label[row["model"]].scores.update({k: v for k, v in row.items() if k != "model"})

    def history_table(self) -> pd.DataFrame:
        """One row per merge: number, label, its scores per task, and the recipe as YAML."""
        rows = [{"#": e.number, "merge": e.label, **e.scores, "recipe": e.recipe.to_yaml()} for e in self.history]
        return pd.DataFrame(rows) if rows else pd.DataFrame(columns=["#", "merge", "recipe"])

    # Export ---------------------------------------------------------------------------------------

    def export_target(self, folder: str) -> Path:
        """Where ``export(folder)`` writes: relative paths resolve under ``models_dir``.

        Raises ValueError for an empty path, the models folder itself or a folder above it, and an
        absolute path whose parent folder does not exist (nothing is created outside the models folder).
        """
        if not folder.strip():
            raise ValueError("no output folder given; type a folder name, e.g. merges/my-merge")
        out = Path(folder.strip()).expanduser()
        out = (out if out.is_absolute() else self.models_dir / out).resolve()
        root = self.models_dir.resolve()
        if out == root or out in root.parents:
            raise ValueError(f"{out} is the models folder or holds it; choose a folder inside it, e.g. merges/my-merge")
        if Path(folder.strip()).expanduser().is_absolute() and not out.parent.is_dir():
            raise ValueError(
                f"the folder {out.parent} does not exist; create it first, or give a path relative to the models folder {root}"
            )
        return out

    def describe_target(self, folder: str) -> str:
        """One sentence on what ``export(folder)`` would do: a new folder, or replacing an earlier merge."""
        out = self.export_target(folder)
        if not out.exists() or (out.is_dir() and not any(out.iterdir())):
            return f"Will write a new folder {out}."
        if is_merge_output(out):
            return f"{out} holds an earlier merge: tick Replace to overwrite it."
        return f"{out} holds other files: it will not be replaced; choose another folder."

    def export(self, folder: str, overwrite: bool = False) -> Path:
        """Write the current merge to ``folder`` (see ``export_target``); returns the folder written.

        Raises ValueError/CheckpointError before writing for a bad target (an input, a folder holding
        files this tool did not write, a missing parent).
        """
        session = self.require_session()
        recipe, merged = self.require_merge()
        out = self.export_target(folder)
        return session.export(recipe, merged, out, overwrite)

    # Cancelling -----------------------------------------------------------------------------------

    def check_cancel(self) -> None:
        """Raise Cancelled (and clear the request) when cancel was asked for."""
        if self.cancel_requested:
            self.cancel_requested = False
            raise Cancelled("cancelled; nothing was changed")

    def guard(self, progress: Optional[Progress]) -> Progress:
        """``progress`` wrapped so that every step first checks for a cancel request.

        Work that starts now clears any earlier request.
        """
        self.cancel_requested = False

        def report(fraction: float, message: str) -> None:
            self.check_cancel()
            if progress:
                progress(fraction, message)

        return report
