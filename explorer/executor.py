"""Run a MergeRecipe: tensor by tensor from disk (bounded memory) or from an in-memory session.

Both paths call ``merge_tensor`` for each tensor name, so the CLI, the app and a notebook produce the
same bytes for the same recipe. Compute is float32; the output is cast to ``recipe.dtype``.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Protocol

import torch
from safetensors import safe_open

from explorer import fisher, registry
from explorer.checkpoint import Checkpoint
from explorer.finite import check_finite
from explorer.inputs import open_inputs
from explorer.recipe import MergeRecipe
from explorer.registry import MethodSpec

Progress = Callable[[float, str], None]


def tensor_seed(seed: int, name: str) -> int:
    """Deterministic 63-bit seed for tensor ``name`` under recipe ``seed`` (independent of order)."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class TensorSource(Protocol):
    """Inputs of a merge, read by tensor name: from disk (``MergePlan``) or memory (``MergeSession``)."""

    names: list[str]
    model_paths: list[Path]

    def read_base(self, name: str) -> Optional[torch.Tensor]: ...  # (*S) float32, or None without a base

    def read_models(self, name: str) -> torch.Tensor: ...  # (N, *S) float32 (or the stored dtype if not float)


def merge_tensor(
    spec: MethodSpec,
    params: dict,
    name: str,
    base: Optional[torch.Tensor],
    models: torch.Tensor,
    seed: int,
    extra: Optional[dict] = None,
) -> torch.Tensor:
    """Merge one tensor: ``models`` (N, *S) and ``base`` (*S) float32 -> merged (*S) float32.

    Delta-space methods see task vectors ``models - base`` and get ``base`` added back. ``models`` is
    overwritten (the task vectors are formed in place, and methods may thin them in place): pass a
    tensor this call may consume.
    """
    generator = torch.Generator().manual_seed(tensor_seed(seed, name))
    if spec.space == "delta":
        return registry.call(spec, models.sub_(base), base, generator, params, extra).add_(base)
    return registry.call(spec, models, base, generator, params, extra)


def method_inputs(source: TensorSource, name: str, spec: MethodSpec) -> torch.Tensor:
    """What the method sees for ``name``: task vectors for delta-space methods, else the weights."""
    models = source.read_models(name)
    return models - source.read_base(name) if spec.space == "delta" else models


def merge_stream(
    source: TensorSource,
    recipe: MergeRecipe,
    progress: Optional[Progress] = None,
    fisher_cache: Optional[Path] = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, merged tensor in recipe.dtype) for every tensor of ``source``, one at a time.

    Runs the method's whole-model pre-pass (``spec.prepare``, e.g. a TIES trim over the whole model)
    and, for Fisher merging, estimates or loads each model's cached Fisher first. Non-float tensors
    (int buffers) are taken from the first model. Peak memory is about (N + 2) x the largest tensor.
    """
    spec, params = registry.get(recipe.merge_method), recipe.resolved_params()
    extra = spec.prepare(params, ((n, method_inputs(source, n, spec)) for n in source.names)) if spec.prepare else {}
    fishers = _fisher_readers(spec, params, source, recipe.seed, fisher_cache, progress)
    for i, name in enumerate(source.names):
        models = source.read_models(name)
        if not models.is_floating_point():
            yield name, models[0]
            continue
        call_extra = dict(extra, fisher=_fisher_for(fishers, name)) if spec.needs_fisher else extra
        merged = merge_tensor(spec, params, name, source.read_base(name), models, recipe.seed, call_extra)
        del models
        yield name, cast_output(name, merged, recipe.torch_dtype, recipe.out_of_range)
        if progress:
            progress((i + 1) / len(source.names), name)


def _fisher_readers(spec, params, source, seed, cache, progress) -> list:
    """Open (estimating when not cached) the diagonal Fisher of each model, for ``needs_fisher`` methods."""
    if not spec.needs_fisher:
        return []
    settings = fisher.FisherSettings.from_params(params, seed=seed)
    files = []
    for i, path in enumerate(source.model_paths):
        step = (lambda f, m, i=i: progress((i + f) / len(source.model_paths), f"Fisher of {path.name}: {m}")) if progress else None
        files.append(safe_open(str(fisher.fisher_file(path, settings, cache, step)), framework="pt"))
    return files


def _fisher_for(files: list, name: str) -> Optional[torch.Tensor]:
    """(N, *S) Fisher of tensor ``name``, or None when a model has none for it (plain weighted average)."""
    if not all(name in f.keys() for f in files):
        return None
    return torch.stack([f.get_tensor(name) for f in files]).float()


@dataclass
class MergePlan:
    """Opened, checked inputs of a recipe: what the executor iterates over."""

    recipe: MergeRecipe
    base: Optional[Checkpoint]
    models: list[Checkpoint]
    names: list[str]

    @property
    def reference(self) -> Checkpoint:
        """The checkpoint whose config, tokenizer and non-float tensors the output takes."""
        return self.base or self.models[0]

    def inputs(self) -> list[Path]:
        """Every file and folder the merge reads (for a LoRA adapter: the adapter and its base)."""
        return [s for c in ([self.base] if self.base else []) + self.models for s in c.sources]

    @property
    def model_paths(self) -> list[Path]:
        return [c.path for c in self.models]

    def read_base(self, name: str) -> Optional[torch.Tensor]:
        return read_float(self.base, name) if self.base else None

    def read_models(self, name: str) -> torch.Tensor:
        return read_stacked(self.models, name)


def plan(recipe: MergeRecipe) -> MergePlan:
    """Open, check and align every input before any work (``explorer.inputs.open_inputs``).

    Raises CheckpointError/ValueError naming the model, tensor and fix.
    """
    recipe.resolved_params()
    inputs = open_inputs(recipe.base_model, recipe.model_paths(), recipe.tokenizer_source)
    return MergePlan(recipe, inputs.base, inputs.models, inputs.names)


def read_float(checkpoint: Checkpoint, name: str) -> torch.Tensor:
    """Tensor ``name`` as float32 (from F16, BF16, F32, dequantized GGUF, ...); non-float tensors as stored.

    Raises CheckpointError naming model and tensor if it holds NaN or inf.
    """
    tensor = checkpoint.get(name)
    if not tensor.is_floating_point():
        return tensor
    tensor = tensor.to(torch.float32)
    check_finite(checkpoint, name, tensor)
    return tensor


def read_stacked(checkpoints: list[Checkpoint], name: str) -> torch.Tensor:
    """Tensor ``name`` of every checkpoint stacked: (N, *S) float32 (non-float tensors: stored dtype).

    Each tensor is read and converted straight into its slot of the result, so reading holds the
    result plus one tensor as stored, not N float32 copies and then their stack. Raises CheckpointError
    naming model and tensor if one holds NaN or inf.
    """
    stacked: Optional[torch.Tensor] = None
    for i, checkpoint in enumerate(checkpoints):
        tensor = checkpoint.get(name)
        if i == 0 and not tensor.is_floating_point():
            return torch.stack([tensor] + [c.get(name) for c in checkpoints[1:]])
        if stacked is None:
            stacked = torch.empty((len(checkpoints), *tensor.shape), dtype=torch.float32)
        stacked[i].copy_(tensor)
        del tensor
        check_finite(checkpoint, name, stacked[i])
    return stacked


def cast_output(name: str, tensor: torch.Tensor, dtype: torch.dtype, out_of_range: str = "refuse") -> torch.Tensor:
    """Cast a merged float32 tensor to ``dtype``.

    A value beyond ``dtype``'s largest finite value (float16: 65504) would become inf: with
    ``out_of_range="refuse"`` that raises ValueError naming the tensor; with ``"clamp"`` such values
    are clamped to +/- that largest value first. A merged inf or NaN (float32 overflow) always raises
    ValueError: no output dtype or clamp can repair it.
    """
    limit = torch.finfo(dtype).max
    lo, hi = torch.aminmax(tensor) if tensor.numel() else (torch.zeros(()), torch.zeros(()))
    if not (math.isfinite(lo.item()) and math.isfinite(hi.item())):
        raise ValueError(
            f"merged tensor {name!r} holds inf or NaN even in float32 (its values reach {lo.item():.4g}..{hi.item():.4g}): "
            "the merge arithmetic overflowed; lower the weights, lambda or scale of the recipe"
        )
    peak = max(-lo.item(), hi.item())
    if peak > limit:
        if out_of_range != "clamp":
            raise ValueError(
                f"merged tensor {name!r} has values up to {peak:.4g}, beyond the {dtype} range ({limit:.4g}); "
                "choose dtype bfloat16 or float32, or set out_of_range: clamp"
            )
        tensor = tensor.clamp(-limit, limit)
    return tensor.to(dtype)


def merge_to_folder(recipe: MergeRecipe, out_dir: str | Path, progress: Optional[Progress] = None, overwrite: bool = False) -> Path:
    """Stream the merge of ``recipe`` into a new checkpoint folder ``out_dir``; returns its path.

    All inputs are checked before anything is written; the folder appears only when complete.
    """
    from explorer.writer import check_output_dir, write_checkpoint

    merge_plan = plan(recipe)
    out = check_output_dir(out_dir, merge_plan.inputs(), overwrite)
    return write_checkpoint(out, merge_stream(merge_plan, recipe, progress), merge_plan.reference, recipe, overwrite)
