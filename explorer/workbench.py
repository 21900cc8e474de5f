"""The state behind one browser tab or notebook: chosen inputs, the last merge, its recipe.

Plain Python (no gradio): the app's handlers are a few lines each that call these methods and turn
exceptions into messages. A notebook can drive the same object directly.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from explorer.checkpoint import discover
from explorer.executor import Progress
from explorer.recipe import MergeRecipe
from explorer.session import MergeSession

Loaded = tuple[PreTrainedModel, PreTrainedTokenizerBase]


@dataclass
class Workbench:
    """Inputs in memory, the current merge and the models the Evaluate tab compares."""

    models_dir: Path
    session: Optional[MergeSession] = None
    recipe: Optional[MergeRecipe] = None
    merged: Optional[dict[str, torch.Tensor]] = None
    _loaded: dict[str, Loaded] = field(default_factory=dict)

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

    def load(self, base: Optional[str], experts: list[str], progress: Optional[Progress] = None) -> str:
        """Open and check ``base`` and ``experts``; returns a one-line report. Raises on bad input."""
        if not experts:
            raise ValueError("choose at least one expert to merge")
        self.session = MergeSession(base, experts, progress)
        self.recipe, self.merged, self._loaded = None, None, {}
        n = sum(t.numel() for t in self.session.models[0].values())
        arch = self.session.reference.architecture
        return f"Loaded {len(experts)} model(s){' and a base' if base else ''}: {arch}, {n / 1e6:.2f}M parameters, {len(self.session.names)} tensors, all compatible."

    def require_session(self) -> MergeSession:
        if self.session is None:
            raise ValueError("no models loaded yet: choose a base and experts in the Models tab and press Load")
        return self.session

    def merge(self, method: str, parameters: dict, per_model: list[dict], dtype: str = "float32", seed: int = 0, progress: Optional[Progress] = None) -> str:
        """Merge the loaded models in memory; returns a one-line summary. Raises on bad parameters."""
        session = self.require_session()
        recipe = session.recipe(method, parameters, per_model, dtype, seed)
        self.merged = session.merge(recipe, progress)
        self.recipe = recipe
        self._loaded.pop("merge", None)
        return f"Merged {len(session.model_paths)} model(s) with {method} into {len(self.merged)} tensors ({dtype})."

    def require_merge(self) -> tuple[MergeRecipe, dict[str, torch.Tensor]]:
        if self.merged is None or self.recipe is None:
            raise ValueError("nothing merged yet: press Merge in the Merge tab first")
        return self.recipe, self.merged

    def eval_models(self, include_inputs: bool) -> dict[str, Loaded]:
        """{label: (model, tokenizer)}: the merge (built in memory) and, optionally, base and experts."""
        session = self.require_session()
        recipe, merged = self.require_merge()
        tokenizer = AutoTokenizer.from_pretrained(session.reference.path)
        if "merge" not in self._loaded:
            self._loaded["merge"] = (session.build_model(merged), tokenizer)
        labels = {}
        if include_inputs:
            inputs = ([session.base_ckpt.path] if session.base_ckpt else []) + session.model_paths
            for path in inputs:
                label = self.label(path)
                if label not in self._loaded:
                    self._loaded[label] = (AutoModelForCausalLM.from_pretrained(path).eval(), tokenizer)
                labels[label] = self._loaded[label]
        return {**labels, f"merge ({recipe.merge_method})": self._loaded["merge"]}

    def export(self, folder: str, overwrite: bool = False) -> Path:
        """Write the current merge to ``folder`` (relative paths are under ``models_dir``)."""
        session = self.require_session()
        recipe, merged = self.require_merge()
        out = Path(folder).expanduser()
        out = out if out.is_absolute() else self.models_dir / out
        return session.export(recipe, merged, out, overwrite)
