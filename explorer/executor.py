"""Run a MergeRecipe: tensor by tensor from disk (bounded memory) or from an in-memory session.

Both paths call ``merge_tensor`` for each output tensor of ``recipe.layout`` (the ``models`` form: each
tensor name; ``slices``: layers taken from their sources and renumbered) with ``recipe.params_at`` its
place (gradients and filters evaluated there), so the CLI, the app and a notebook produce the same
bytes for the same recipe. Compute is float32; the output is cast to ``recipe.torch_dtype``
(``out_dtype``, else ``dtype``).

Imports go one way: the executor uses the methods (through ``registry``) and the input/output side
(``inputs``, ``finite``, ``checkpoint``, ``writer``, and ``fisher``, which loads models to estimate
a Fisher); none of those import the executor. A method's inputs beyond the tensors are set up before
the loop and handed in per tensor (``extras``): the merge loop itself loads no model.
"""

from __future__ import annotations

import math
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, TypeVar

import torch

from explorer import registry
from explorer.choices import OutOfRange, Space, parse_choice
from explorer.device import choose_device, float32_bytes
from explorer.fisher import fisher_extras
from explorer.io.inputs import MergeInputs, TensorSource, open_inputs
from explorer.io.writer import chat_template_files, check_output_dir, write_checkpoint
from explorer.progress import Progress
from explorer.recipe import MergeRecipe
from explorer.recipe_layout import TensorPlace, layer_count
from explorer.registry import MethodSpec
from explorer.stage_cache import CachedStages, StageCache

__all__ = [
    "Extras",
    "cast_output",
    "in_order",
    "merge_stream",
    "merge_tensor",
    "merge_to_folder",
    "no_extras",
    "output_config",
    "plan",
    "read_place",
    "setup_extras",
    "warm_up",
]

T = TypeVar("T")

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
    stages: Optional[CachedStages] = None,
) -> tuple[torch.Tensor, Optional[float]]:
    """Merge one tensor: ``models`` (N, *S) and ``base`` (*S) float32 -> (merged (*S) float32, peak).

    Delta-space methods see task vectors ``models - base`` and get ``base`` added back: by the method
    itself when it takes ``with_base`` (``MethodSpec.adds_base``), in the last pass it makes, which also
    measures the peak (the largest |value|, for ``cast_output``); peak is None otherwise. ``models`` is
    overwritten (the task vectors are formed in place, and methods may thin them in place): pass a
    tensor this call may consume. With ``stages`` (a ``spec.staged`` method in an in-memory session)
    ``models`` is None: the method reads the task vectors, and its earlier results, from ``stages``.
    """
    generator = registry.tensor_generator(seed, name)
    delta = spec.space == Space.delta
    extra = dict(extra or {}, **({"stages": stages} if stages is not None else {}))
    x = models if stages is not None else _method_view(spec, base, models)
    if delta and spec.adds_base:
        finished = registry.call(spec, x, base, generator, params, dict(extra, with_base=True))
        return finished.weights, finished.peak
    merged = registry.call(spec, x, base, generator, params, extra)
    return (merged.add_(base) if delta else merged), None


def read_place(
    source: TensorSource, place: TensorPlace, order: Optional[dict[str, int]] = None
) -> tuple[Optional[torch.Tensor], torch.Tensor]:
    """(base (*S) or None, models (N, *S)) float32 of the output tensor at ``place``.

    ``order`` maps a model's recipe name to its index in ``source.models`` for a recipe with slices;
    None for the ``models`` form, whose place takes tensor ``place.name`` of every model, read through
    ``source.read_models`` (one tensor at a time into the stack). A slice's place gathers each of its
    models' own input tensors (non-float tensors: stored dtype). Raises CheckpointError as the reads
    do (NaN/inf in an input).
    """
    if order is None:
        return (source.read_base(place.name) if place.base else None), source.read_models(place.name)
    base = source.base[place.base] if place.base and source.base is not None else None
    tensors = (source.models[order[model]][name] for model, name in place.inputs)
    first = next(tensors)
    dtype = torch.float32 if first.is_floating_point() else first.dtype
    stacked = torch.empty((len(place.inputs), *first.shape), dtype=dtype, device=first.device)
    stacked[0].copy_(first)
    for k, tensor in enumerate(tensors, start=1):
        stacked[k].copy_(tensor)
    return base, stacked


WARM_UP_SIZE = 4096  # entries of the synthetic tensor ``warm_up`` merges


def warm_up(
    spec: MethodSpec,
    params: dict,
    models: int,
    with_base: bool,
    seed: int,
    extra: dict,
    device: Optional[torch.device] = None,
) -> None:
    """Merge a synthetic (models, 4096) float32 stack with ``spec`` so that its compiled kernels are loaded.

    A process's first call of a numba kernel loads numba's CPU target and the kernel from its cache
    (about 0.4 s on 2 cores, most of it imports); ``merge_stream`` runs this on a thread while the
    first tensor is read, instead of after. The stack is a seeded base ~ N(0, 1) plus N(0, 0.01) per
    model (the shape of real task vectors), on ``device``; ``extra`` is what every call of the method
    gets (``spec.prepare``'s result), so the same kernels run as on the real tensors. Raises what the
    method raises.
    """
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(WARM_UP_SIZE, generator=generator)
    stack = base + 0.01 * torch.randn(models, WARM_UP_SIZE, generator=generator)
    base, stack = base.to(device or "cpu"), stack.to(device or "cpu")
    merge_tensor(spec, params, "warm-up", base if with_base else None, stack, seed, extra)


def _method_view(spec: MethodSpec, base: Optional[torch.Tensor], models: torch.Tensor) -> torch.Tensor:
    """What the method sees: task vectors ``models - base`` for delta-space methods, else the weights."""
    return models.sub_(base) if spec.space == Space.delta else models


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
    cache: Optional[StageCache] = None,
    workers: int = 1,
    device: Optional[torch.device] = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, merged tensor in the output dtype) for every output tensor, one at a time.

    The output tensors and their inputs are ``recipe.layout(source.names)`` (the ``models`` form: every
    tensor of ``source``; ``slices``: layers renumbered), each merged with ``recipe.params_at`` its
    place (gradients and filters evaluated there). Runs the method's whole-model pre-pass (``spec.prepare``, e.g. a TIES trim over the whole model)
    first. extras(name) adds per-tensor inputs (the Fisher of each model): pass ``setup_extras``'s
    result to set them up ahead (errors before any output, one estimation per session); when None,
    ``setup_extras(source, recipe, progress, fisher_cache)`` runs here before the first tensor.
    Non-float tensors (int buffers) are taken from the first model. One reader thread reads the
    inputs of the next tensor (``read_place``) while a worker merges this one and the caller handles
    (writes) the one before, so peak memory is about (2N + 4) x the largest tensor with one worker;
    meanwhile the method's kernels are loaded on another (``warm_up``).
    ``cache``: an in-memory session's ``StageCache``; a ``spec.staged`` method then reuses each
    tensor's stages from the previous merges (recipes without slices), reading nothing.
    ``workers``: threads merging the next tensors while the caller handles one (``in_order``); each
    holds about (N + 2) x its tensor, and the reader runs up to ``workers`` tensors ahead.
    ``device``: where each tensor's inputs are merged (read into RAM, then moved; None: where they are
    read); the merged tensors stay there.
    """
    spec = registry.get(recipe.merge_method)
    layout = recipe.layout(source.names)
    order = {m: i for i, m in enumerate(recipe.input_models())} if recipe.slices else None
    if extras is None:
        extras = setup_extras(source, recipe, progress, fisher_cache)
    prepared = {}
    if spec.prepare:
        items = ((p.name, _method_view(spec, *read_place(source, p, order))) for p in layout)
        prepared = spec.prepare(recipe.resolved_params(), items)
    staged = cache is not None and spec.staged and order is None

    reads: dict[int, Future] = {}  # place index -> its inputs being read; popped by the merge

    def merged(i: int, place: TensorPlace) -> tuple[str, torch.Tensor]:
        if warming is not None:
            warming.result()  # its errors first; done long before, but for the first tensor
        extra = dict(prepared, **extras(place.name))
        if i not in reads:  # staged, in memory: weights read in place
            weights, base = [m[place.name] for m in source.models], source.read_base(place.name)
            stages = cache.stages(place.name, lambda: source.task_vectors(place.name), weights, base)
            out, peak = merge_tensor(spec, recipe.params_at(place), place.name, base, None, recipe.seed, extra, stages)
            cache.trim(place.name)
        else:
            base, models = reads.pop(i).result()  # nothing else holds the inputs: freed after the merge
            if not models.is_floating_point():
                return place.name, models[0]
            if device is not None:
                base, models = (None if base is None else base.to(device)), models.to(device)
            out, peak = merge_tensor(spec, recipe.params_at(place), place.name, base, models, recipe.seed, extra)
            del models
        return place.name, cast_output(place.name, out, recipe.torch_dtype, recipe.out_of_range, peak)

    with (
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="read-tensor") as reader,
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="warm-up") as warmer,
    ):
        # The kernels load on their own thread while the first tensor is read (not for an in-memory
        # staged merge, which reads nothing, nor a Fisher merge, whose Fisher is per tensor).
        warming = None
        if layout and not staged and not spec.needs_fisher:
            first = layout[0]  # as it is merged: its inputs (a slice's own models) and base
            with_base = first.base is not None and source.base is not None
            args = (spec, recipe.params_at(first), len(first.inputs), with_base, recipe.seed, prepared, device)
            warming = warmer.submit(warm_up, *args)

        def jobs() -> Iterator[Callable[[], tuple[str, torch.Tensor]]]:
            for i, place in enumerate(layout):
                if not (staged and source.models[0][place.name].is_floating_point()):
                    # read on the reader thread, in order, while earlier tensors merge
                    reads[i] = reader.submit(read_place, source, place, order)
                yield partial(merged, i, place)

        for i, item in enumerate(in_order(jobs(), workers)):
            yield item
            if progress:
                progress((i + 1) / len(layout), item[0])


def in_order(jobs: Iterable[Callable[[], T]], workers: int) -> Iterator[T]:
    """The results of ``jobs``, in order, computed on ``workers`` threads, at most ``workers`` jobs ahead.

    While the consumer handles one result (writes a tensor), the next ones are being computed: torch
    and the merge kernels release the GIL. A job's exception is raised when its result is reached.
    """
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="merge-tensor") as pool:
        pending: deque[Future] = deque()
        for job in jobs:
            pending.append(pool.submit(job))
            if len(pending) > workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def plan(recipe: MergeRecipe) -> MergeInputs:
    """Check the recipe's params, open, check and align every input, and lay out the output tensors.

    All before any work (``open_inputs``, ``MergeRecipe.layout``). Raises CheckpointError/ValueError
    naming the model, tensor (or slice) and fix.
    """
    recipe.resolved_params()
    inputs = open_inputs(
        recipe.base_model, recipe.model_paths(), recipe.tokenizer_source, config_source=recipe.config_source
    )
    recipe.layout(inputs.names)
    return inputs


def output_config(recipe: MergeRecipe, merge_plan: MergeInputs) -> dict:
    """Config entries the output changes: the number of layers, when slices stack or drop layers.

    As mergekit's ``_model_out_config``: the sum of the slices' lengths, under the reference config's
    key for it (``num_hidden_layers``, GPT-2's ``n_layer``).
    """
    depth = layer_count([p.name for p in recipe.layout(merge_plan.names)])
    config = merge_plan.reference.config
    key = next((k for k in ("num_hidden_layers", "n_layer") if k in config), None)
    return {key: depth} if key and config[key] != depth else {}


def cast_output(
    name: str,
    tensor: torch.Tensor,
    dtype: torch.dtype,
    out_of_range: OutOfRange | str = OutOfRange.refuse,
    peak: Optional[float] = None,
) -> torch.Tensor:
    """Cast a merged float32 tensor to ``dtype``.

    A value beyond ``dtype``'s largest finite value (float16: 65504) would become inf: with
    ``out_of_range="refuse"`` that raises ValueError naming the tensor; with ``"clamp"`` such values
    are clamped to +/- that largest value first. A merged inf or NaN (float32 overflow) always raises
    ValueError: no output dtype or clamp can repair it. Another ``out_of_range`` raises ValueError.
    peak: the largest |value| of ``tensor`` (inf or NaN when one is not finite) when the merge measured
    it already (``merge_tensor``); else it is measured here, in one pass.
    """
    out_of_range = parse_choice(OutOfRange, out_of_range, "out_of_range")
    limit = torch.finfo(dtype).max
    if peak is None:
        lo, hi = (t.item() for t in torch.aminmax(tensor)) if tensor.numel() else (0.0, 0.0)
        peak = max(-lo, hi) if math.isfinite(lo) and math.isfinite(hi) else math.nan
    if not math.isfinite(peak):
        lo, hi = torch.aminmax(tensor)  # only to say how far the values went
        raise ValueError(
            f"merged tensor {name!r} holds inf or NaN even in float32 (its values reach {lo.item():.4g}..{hi.item():.4g}): "
            "the merge arithmetic overflowed; lower the weights, lambda or scale of the recipe"
        )
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
    device: Optional[str] = None,
) -> Path:
    """Stream the merge of ``recipe`` into a new checkpoint folder ``out_dir``; returns its path.

    All inputs are checked, and a Fisher merge's Fisher estimated (or found in ``fisher_cache``),
    before anything is written; the folder appears only when complete. It holds the config (its layer
    count fixed when slices change it) and the reference's tokenizer, with the recipe's chat template.
    device: where the tensors are merged ("cpu", "cuda", "cuda:N", or "auto": a CUDA GPU with room for
    (2N + 4) x the largest tensor, else the CPU; ``explorer.device.choose_device``). None takes
    ``MERGE_EXPLORER_DEVICE``, else the CPU: the compiled kernels read the inputs where they are read
    to, where a GPU costs a copy each way per tensor. Reads and writes go through RAM, one tensor at a
    time. ValueError for a device that is not there.
    """
    merge_plan = plan(recipe)
    largest = max(float32_bytes([merge_plan.reference.shape(n)]) for n in merge_plan.names)
    where = choose_device((2 * len(merge_plan.models) + 4) * largest, device, default="cpu").device
    out = check_output_dir(out_dir, merge_plan.sources(), overwrite)
    extras = setup_extras(merge_plan, recipe, progress, fisher_cache)
    inputs = ([merge_plan.base] if merge_plan.base else []) + merge_plan.models
    files = chat_template_files(recipe.chat_template, merge_plan.reference, inputs)
    stream = ((name, t.cpu()) for name, t in merge_stream(merge_plan, recipe, progress, extras=extras, device=where))
    updates = output_config(recipe, merge_plan)
    return write_checkpoint(out, stream, merge_plan.reference, recipe, overwrite, files=files, config_updates=updates)
