"""Run a MergeRecipe: tensor by tensor from disk (bounded memory) or from an in-memory session.

Both paths call ``merge_tensor`` for each tensor name, so the CLI, the app and a notebook produce the
same bytes for the same recipe. Compute is float32; the output is cast to ``recipe.dtype``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

from explorer import registry
from explorer.checkpoint import Checkpoint, CheckpointError, check_compatible, open_checkpoint
from explorer.recipe import MergeRecipe
from explorer.registry import MethodSpec

Progress = Callable[[float, str], None]


def tensor_seed(seed: int, name: str) -> int:
    """Deterministic 63-bit seed for tensor ``name`` under recipe ``seed`` (independent of order)."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def merge_tensor(
    spec: MethodSpec,
    params: dict,
    name: str,
    base: Optional[torch.Tensor],
    models: torch.Tensor,
    seed: int,
) -> torch.Tensor:
    """Merge one tensor: ``models`` (N, *S) and ``base`` (*S) float32 -> merged (*S) float32.

    Delta-space methods see task vectors ``models - base`` and get ``base`` added back.
    """
    generator = torch.Generator().manual_seed(tensor_seed(seed, name))
    if spec.space == "delta":
        return base + registry.call(spec, models - base, base, generator, params)
    return registry.call(spec, models, base, generator, params)


@dataclass
class MergePlan:
    """Opened, checked inputs of a recipe: what the executor iterates over."""

    recipe: MergeRecipe
    spec: MethodSpec
    params: dict
    base: Optional[Checkpoint]
    models: list[Checkpoint]
    names: list[str]

    @property
    def reference(self) -> Checkpoint:
        """The checkpoint whose config, tokenizer and non-float tensors the output takes."""
        return self.base or self.models[0]

    def inputs(self) -> list[Path]:
        return [c.path for c in ([self.base] if self.base else []) + self.models]


def plan(recipe: MergeRecipe) -> MergePlan:
    """Open every input and check compatibility before any work; raises CheckpointError/ValueError."""
    spec = registry.get(recipe.merge_method)
    params = recipe.resolved_params()
    base = open_checkpoint(recipe.base_model) if recipe.base_model else None
    models = [open_checkpoint(p) for p in recipe.model_paths()]
    names = check_compatible(base, models)
    return MergePlan(recipe, spec, params, base, models, names)


def read_float(checkpoint: Checkpoint, name: str) -> torch.Tensor:
    """Tensor ``name`` as float32; CheckpointError naming model and tensor if it holds NaN or inf."""
    tensor = checkpoint.get(name)
    if not tensor.is_floating_point():
        return tensor
    tensor = tensor.to(torch.float32)
    if not torch.isfinite(tensor).all():
        bad = int((~torch.isfinite(tensor)).sum())
        raise CheckpointError(f"{checkpoint.path}: tensor {name!r} has {bad} NaN/inf values; this checkpoint is corrupt or diverged; re-export or drop it")
    return tensor


def cast_output(name: str, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cast a merged float32 tensor to ``dtype``; ValueError if float16 would overflow to inf."""
    if dtype == torch.float16 and tensor.abs().max() > torch.finfo(torch.float16).max:
        raise ValueError(f"merged tensor {name!r} exceeds the float16 range (65504); choose dtype bfloat16 or float32")
    return tensor.to(dtype)


def iter_merged(merge_plan: MergePlan, progress: Optional[Progress] = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, merged tensor in the output dtype), reading one tensor of each input at a time.

    Peak memory is about (N + 2) x the largest tensor in float32. Non-float tensors (int buffers)
    are copied from the reference model.
    """
    p = merge_plan
    for i, name in enumerate(p.names):
        base = read_float(p.base, name) if p.base else None
        first = read_float(p.models[0], name)
        if not first.is_floating_point():
            yield name, p.reference.get(name)
            continue
        stacked = torch.stack([first] + [read_float(m, name) for m in p.models[1:]])
        merged = merge_tensor(p.spec, p.params, name, base, stacked, p.recipe.seed)
        del stacked, base
        yield name, cast_output(name, merged, p.recipe.torch_dtype)
        if progress:
            progress((i + 1) / len(p.names), name)


def merge_to_folder(recipe: MergeRecipe, out_dir: str | Path, progress: Optional[Progress] = None, overwrite: bool = False) -> Path:
    """Stream the merge of ``recipe`` into a new checkpoint folder ``out_dir``; returns its path.

    All inputs are checked before anything is written; the folder appears only when complete.
    """
    from explorer.writer import check_output_dir, write_checkpoint

    merge_plan = plan(recipe)
    out = check_output_dir(out_dir, merge_plan.inputs(), overwrite)
    return write_checkpoint(out, iter_merged(merge_plan, progress), merge_plan.reference.path, recipe, overwrite)
