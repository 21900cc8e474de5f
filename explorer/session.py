"""Interactive merging: inputs held in memory once, re-merged in seconds as sliders move.

The session reads every input tensor once (float32) and keeps it; ``merge`` runs the same
``merge_tensor`` as the streaming executor, so an exported session merge is byte-identical to
``python -m explorer merge`` on the same recipe. Between merges it keeps each tensor's stages
(``explorer.stage_cache``): a slider move recomputes only what depends on the moved parameter.
Memory: (N + 1) x model size in float32, plus the stage cache within its budget, so this is for
models that fit in memory: a CUDA GPU's when there is one with room (``explorer.device``; merges,
Inspect and evaluation then run there), else RAM. The streaming executor has no such limit.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Optional

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel
from transformers.initialization import no_init_weights

from explorer import registry
from explorer.device import SPARE_MODELS, choose_device, float32_bytes
from explorer.executor import merge_stream
from explorer.io.checkpoint import TIED_NAMES, resolved_ref
from explorer.io.finite import read_float
from explorer.io.inputs import open_inputs, task_vectors
from explorer.io.writer import chat_template_files, check_output_dir, write_checkpoint
from explorer.progress import Progress
from explorer.recipe import MergeRecipe
from explorer.stage_cache import StageCache, default_budget

MERGE_WORKERS = 2  # tensors merged at once: random drops are serial per tensor; 2 keeps a 2-core machine busy


class MergeSession:
    """Base (optional) and models loaded as float32 dicts {name: tensor}, checked compatible."""

    def __init__(
        self,
        base: Optional[str | Path],
        models: list[str | Path],
        progress: Optional[Progress] = None,
        tokenizer_source: str = "base",
        device: Optional[str] = None,
    ):
        """Open, check and read the inputs onto ``device``: None or "auto" chooses (``explorer.device``).

        Auto takes a CUDA GPU whose free memory holds N + 3 models in float32, else RAM.
        Raises CheckpointError/ValueError as ``open_inputs`` does, ValueError for a device that is not there.
        """
        self.tokenizer_source = tokenizer_source
        inputs = open_inputs(base, models, tokenizer_source)
        self.base_ckpt, self.model_ckpts, self.names = inputs.base, inputs.models, inputs.names
        inputs = ([self.base_ckpt] if self.base_ckpt else []) + self.model_ckpts
        self.reference = inputs[0]
        model_bytes = float32_bytes(self.reference.shape(n) for n in self.names)
        self.device_choice = choose_device(model_bytes * (len(inputs) + SPARE_MODELS), device)
        self.device = self.device_choice.device
        self.tensors: list[dict[str, torch.Tensor]] = []
        for i, ckpt in enumerate(inputs):
            self.tensors.append({n: read_float(ckpt, n).to(self.device) for n in self.names})
            if progress:
                progress((i + 1) / len(inputs), f"loaded {ckpt.name}")
        self.base = self.tensors[0] if self.base_ckpt else None
        self.models = self.tensors[1:] if self.base_ckpt else self.tensors
        self.stage_cache = StageCache(default_budget(self.device))
        self.scan_cache: dict = {}  # Inspect's per-tensor measurements by settings (``inspect.scan``): inputs never change

    def clear_cache(self) -> None:
        """Drop the stages kept between merges: the next merge runs from scratch (same result)."""
        self.stage_cache.clear()

    @property
    def tensors_from(self) -> list:
        """The opened inputs, base first: the checkpoints ``tensors`` were read from."""
        return ([self.base_ckpt] if self.base_ckpt else []) + self.model_ckpts

    @property
    def model_paths(self) -> list[Path]:
        """Folders (or files) of the experts, in load order."""
        return [c.path for c in self.model_ckpts]

    def task_vectors(self, name: str) -> torch.Tensor:
        """(N, *S) float32 task vectors M_i - B of tensor ``name``; ValueError without a base.

        The same values as ``explorer.io.inputs.task_vectors`` (stack, then subtract), each row
        subtracted straight into the new tensor: one pass instead of two.
        """
        if self.base is None:
            return task_vectors(self, name)  # raises with the fix
        base = self.base[name]
        out = torch.empty((len(self.models), *base.shape), dtype=base.dtype, device=base.device)
        for row, model in zip(out, self.models, strict=True):
            torch.sub(model[name], base, out=row)
        return out

    def recipe(
        self, method: str, parameters: dict, per_model: list[dict], dtype: str = "float32", seed: int = 0
    ) -> MergeRecipe:
        """A validated recipe over this session's inputs (what the app exports and the CLI replays).

        Inputs are named by ``Checkpoint.ref``: a LoRA adapter as ``BASE+ADAPTER`` with its base explicit.
        ``per_model`` holds one dict per loaded expert, in load order; another count raises ValueError.
        """
        if len(per_model) != len(self.model_ckpts):
            raise ValueError(
                f"per_model has {len(per_model)} dict(s) but {len(self.model_ckpts)} experts are loaded: "
                "give one dict of per-model parameters per expert, in load order (an empty dict keeps the defaults)"
            )
        return MergeRecipe(
            merge_method=method,
            base_model=self.base_ckpt.ref if self.base_ckpt else None,
            models=[{"model": c.ref, "parameters": pm} for c, pm in zip(self.model_ckpts, per_model, strict=True)],
            parameters=parameters,
            dtype=dtype,
            seed=seed,
            tokenizer_source=self.tokenizer_source,
        )

    def read_base(self, name: str) -> Optional[torch.Tensor]:
        """(*S) float32 base tensor ``name``, or None without a base."""
        return self.base[name] if self.base is not None else None

    def read_models(self, name: str) -> torch.Tensor:
        """(N, *S) float32 stacked expert tensors ``name``."""
        return torch.stack([m[name] for m in self.models])

    def same_inputs(self, recipe: MergeRecipe) -> bool:
        """True when ``recipe`` names exactly this session's base and models, in order."""
        models = [resolved_ref(m) for m in recipe.input_models()] == [resolved_ref(c.ref) for c in self.model_ckpts]
        base = (recipe.base_model and resolved_ref(recipe.base_model)) == (
            self.base_ckpt and resolved_ref(self.base_ckpt.ref)
        )
        return models and base

    def merge(self, recipe: MergeRecipe, progress: Optional[Progress] = None) -> dict[str, torch.Tensor]:
        """{name: merged tensor in recipe.dtype}.

        Raises ValueError when the recipe names other inputs (models or base) or another
        tokenizer_source than the one this session aligned its vocabularies with, and when its slices
        stack, drop or move layers (the session's model keeps its layers: merge those from the command line).
        """
        if not self.same_inputs(recipe):
            raise ValueError(
                "the recipe names other models or another base than the loaded ones; load its models first"
            )
        if recipe.tokenizer_source != self.tokenizer_source:
            raise ValueError(
                f"this session aligned vocabularies with tokenizer_source={self.tokenizer_source!r}, the recipe asks for "
                f"{recipe.tokenizer_source!r}; start a new session with tokenizer_source={recipe.tokenizer_source!r}"
            )
        if recipe.slices and [p.name for p in recipe.layout(self.names)] != self.names:
            raise ValueError(
                "this recipe's slices stack, drop or move layers, which the in-memory session does not do; "
                "merge it with: python -m explorer merge RECIPE.yaml --out DIR"
            )
        if registry.get(recipe.merge_method).needs_base and self.base is None:
            raise ValueError(f"{recipe.merge_method} needs a base model; choose one in the Models tab")
        return dict(merge_stream(self, recipe, progress, cache=self.stage_cache, workers=MERGE_WORKERS))

    def build_model(self, state_dict: dict[str, torch.Tensor]) -> PreTrainedModel:
        """A transformers model in memory (eval mode, on the session's device) holding ``state_dict``; no save and reload.

        The model is built without initializing its weights (transformers' ``no_init_weights``: 0.03 s
        instead of 5 s for SmolLM2-135M), since every weight is then loaded; ValueError when one is missing.
        """
        config = self.reference.hf_config
        on_device = contextlib.nullcontext() if self.device.type == "cpu" else self.device
        with no_init_weights(), on_device:
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        missing, unexpected = model.load_state_dict({k: v.float() for k, v in state_dict.items()}, strict=False)
        missing = [k for k in missing if k not in TIED_NAMES]
        if missing or unexpected:
            raise ValueError(
                f"merged weights do not fit {config.architectures}: missing {missing[:3]}, unexpected {unexpected[:3]}"
            )
        model.tie_weights()
        return model.eval()

    def export(
        self, recipe: MergeRecipe, state_dict: dict[str, torch.Tensor], out_dir: str | Path, overwrite: bool = False
    ) -> Path:
        """Write ``state_dict`` (from ``merge(recipe)``) as a checkpoint folder with ``recipe`` in its card."""
        inputs = [s for c in ([self.base_ckpt] if self.base_ckpt else []) + self.model_ckpts for s in c.sources]
        out = check_output_dir(out_dir, inputs, overwrite)
        files = chat_template_files(recipe.chat_template, self.reference, self.tensors_from)
        ordered = ((n, state_dict[n].cpu()) for n in self.names)  # from the GPU one tensor at a time
        return write_checkpoint(out, ordered, self.reference, recipe, overwrite, files=files)
