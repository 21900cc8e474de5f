"""Run a MergeRecipe: tensor by tensor from disk (bounded memory) or from an in-memory session.

Both paths call ``merge_tensor`` for each tensor name, so the CLI, the app and a notebook produce the
same bytes for the same recipe. Compute is float32; the output is cast to ``recipe.dtype``.

Imports go one way: the executor uses the methods (through ``registry``) and the input/output side
(``inputs``, ``finite``, ``checkpoint``, ``writer``, and ``fisher``, which loads models to estimate
a Fisher); none of those import the executor. A method's inputs beyond the tensors are set up before
the loop and handed in per tensor (``extras``): the merge loop itself loads no model.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

from explorer import registry
from explorer.choices import OutOfRange, Space, parse_choice
from explorer.fisher import fisher_extras
from explorer.io.inputs import MergeInputs, TensorSource, open_inputs
from explorer.io.writer import check_output_dir, write_checkpoint
from explorer.progress import Progress
from explorer.recipe import MergeRecipe
from explorer.registry import MethodSpec

__all__ = [
    "Extras",
    "cast_output",
    "merge_stream",
    "merge_tensor",
    "merge_to_folder",
    "method_inputs",
    "no_extras",
    "plan",
    "setup_extras",
]

# extras(tensor name) -> keyword inputs of the method for that tensor beyond params (e.g. {"fisher": ...})
Extras = Callable[[str], dict]


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
    generator = registry.tensor_generator(seed, name)
    if spec.space == Space.delta:
        return registry.call(spec, models.sub_(base), base, generator, params, extra).add_(base)
    return registry.call(spec, models, base, generator, params, extra)


def method_inputs(source: TensorSource, name: str, spec: MethodSpec) -> torch.Tensor:
    """What the method sees for ``name``: task vectors for delta-space methods, else the weights."""
    return source.task_vectors(name) if spec.space == Space.delta else source.read_models(name)


def no_extras(_name: str) -> dict:
    """The ``Extras`` of a method that needs nothing beyond the tensors."""
    return {}


def setup_extras(
    source: TensorSource, recipe: MergeRecipe, progress: Optional[Progress] = None, fisher_cache: Optional[Path] = None
) -> Extras:
    """What the recipe's method needs per tensor beyond the tensors, set up once before merging.

    Today that is the Fisher of each model for ``needs_fisher`` methods (``explorer.fisher.fisher_extras``:
    estimated, or read from ``fisher_cache``); ``no_extras`` for every other method. Raises ValueError
    as the estimation does (e.g. too little text for the settings).
    """
    spec = registry.get(recipe.merge_method)
    if not spec.needs_fisher:
        return no_extras
    # The Fisher is laid out like the tensors the merge reads (aligned vocabularies): it needs the opened
    # checkpoints, which every source over checkpoints (MergeInputs, MergeSession) holds as model_ckpts.
    return fisher_extras(spec, recipe.resolved_params(), source.model_ckpts, recipe.seed, fisher_cache, progress)


def merge_stream(
    source: TensorSource,
    recipe: MergeRecipe,
    progress: Optional[Progress] = None,
    fisher_cache: Optional[Path] = None,
    extras: Optional[Extras] = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, merged tensor in recipe.dtype) for every tensor of ``source``, one at a time.

    Runs the method's whole-model pre-pass (``spec.prepare``, e.g. a TIES trim over the whole model)
    first. extras(name) adds per-tensor inputs (the Fisher of each model): pass ``setup_extras``'s
    result to set them up ahead (errors before any output, one estimation per session); when None,
    ``setup_extras(source, recipe, progress, fisher_cache)`` runs here before the first tensor.
    Non-float tensors (int buffers) are taken from the first model. Peak memory is about (N + 2) x
    the largest tensor.
    """
    spec, params = registry.get(recipe.merge_method), recipe.resolved_params()
    if extras is None:
        extras = setup_extras(source, recipe, progress, fisher_cache)
    prepared = spec.prepare(params, ((n, method_inputs(source, n, spec)) for n in source.names)) if spec.prepare else {}
    for i, name in enumerate(source.names):
        models = source.read_models(name)
        if not models.is_floating_point():
            yield name, models[0]
            continue
        extra = dict(prepared, **extras(name))
        merged = merge_tensor(spec, params, name, source.read_base(name), models, recipe.seed, extra)
        del models
        yield name, cast_output(name, merged, recipe.torch_dtype, recipe.out_of_range)
        if progress:
            progress((i + 1) / len(source.names), name)


def plan(recipe: MergeRecipe) -> MergeInputs:
    """Check the recipe's params, then open, check and align every input before any work (``open_inputs``).

    Raises CheckpointError/ValueError naming the model, tensor and fix.
    """
    recipe.resolved_params()
    return open_inputs(recipe.base_model, recipe.model_paths(), recipe.tokenizer_source)


def cast_output(
    name: str, tensor: torch.Tensor, dtype: torch.dtype, out_of_range: OutOfRange | str = OutOfRange.refuse
) -> torch.Tensor:
    """Cast a merged float32 tensor to ``dtype``.

    A value beyond ``dtype``'s largest finite value (float16: 65504) would become inf: with
    ``out_of_range="refuse"`` that raises ValueError naming the tensor; with ``"clamp"`` such values
    are clamped to +/- that largest value first. A merged inf or NaN (float32 overflow) always raises
    ValueError: no output dtype or clamp can repair it. Another ``out_of_range`` raises ValueError.
    """
    out_of_range = parse_choice(OutOfRange, out_of_range, "out_of_range")
    limit = torch.finfo(dtype).max
    lo, hi = torch.aminmax(tensor) if tensor.numel() else (torch.zeros(()), torch.zeros(()))
    if not (math.isfinite(lo.item()) and math.isfinite(hi.item())):
        raise ValueError(
            f"merged tensor {name!r} holds inf or NaN even in float32 (its values reach {lo.item():.4g}..{hi.item():.4g}): "
            "the merge arithmetic overflowed; lower the weights, lambda or scale of the recipe"
        )
    peak = max(-lo.item(), hi.item())
    if peak > limit:
        if out_of_range == OutOfRange.refuse:
            raise ValueError(
                f"merged tensor {name!r} has values up to {peak:.4g}, beyond the {dtype} range ({limit:.4g}); "
                "choose dtype bfloat16 or float32, or set out_of_range: clamp"
            )
        tensor = tensor.clamp(-limit, limit)
    return tensor.to(dtype)


def merge_to_folder(
    recipe: MergeRecipe,
    out_dir: str | Path,
    progress: Optional[Progress] = None,
    overwrite: bool = False,
    fisher_cache: Optional[Path] = None,
) -> Path:
    """Stream the merge of ``recipe`` into a new checkpoint folder ``out_dir``; returns its path.

    All inputs are checked, and a Fisher merge's Fisher estimated (or found in ``fisher_cache``),
    before anything is written; the folder appears only when complete.
    """
    merge_plan = plan(recipe)
    out = check_output_dir(out_dir, merge_plan.sources(), overwrite)
    extras = setup_extras(merge_plan, recipe, progress, fisher_cache)
    stream = merge_stream(merge_plan, recipe, progress, extras=extras)
    return write_checkpoint(out, stream, merge_plan.reference, recipe, overwrite)
