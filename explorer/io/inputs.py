"""The inputs of one merge: opened, checked against each other and aligned, before any work is done.

``open_inputs`` is what the streaming executor's ``plan``, the interactive ``MergeSession`` and
Inspect from disk all call, so they read the same views (vocabulary alignment, tied/untied
embeddings) and refuse the same inputs with the same messages. ``compatibility_report`` runs the
same checks model by model and reports instead of raising.

``TensorSource`` is the one protocol every reader of inputs uses (the executor's merge loop, the
Inspect statistics): ``MergeInputs`` reads from disk one tensor name at a time; ``MergeSession``
holds the same tensors in memory. Task vectors M_i - B are formed in one place, ``task_vectors``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Protocol, Sequence

import torch

from explorer.choices import TokenizerSource
from explorer.io.checkpoint import (
    Checkpoint,
    CheckpointError,
    check_compatible,
    check_config,
    open_checkpoint,
    resolved_ref,
)
from explorer.io.config_compat import ConfigChoice, config_differences, vocab_size_of
from explorer.io.finite import read_stacked
from explorer.io.vocab import align_embeddings

if TYPE_CHECKING:  # pandas is imported where a table is made: a merge never needs it
    import pandas as pd

REPORT_COLUMNS = ["path", "role", "format", "architecture", "layers", "vocab", "dtype", "tied", "status", "message"]


class TensorSource(Protocol):
    """Inputs read by tensor name: from disk (``MergeInputs``) or memory (``MergeSession``).

    ``base`` and each of ``models`` map tensor name -> float32 tensor (non-float tensors as stored): a
    ``Checkpoint`` (read at each lookup) or a dict. ``base`` is None without a base model.
    """

    names: list[str]  # the tensors, in the reference model's order
    base: Optional[Mapping[str, torch.Tensor]]
    models: Sequence[Mapping[str, torch.Tensor]]

    @property
    def model_paths(self) -> list[Path]:
        """The models' paths, in order (labels of the experts)."""

    def read_base(self, name: str) -> Optional[torch.Tensor]:
        """(*S) float32 base tensor ``name``, or None without a base."""

    def read_models(self, name: str) -> torch.Tensor:
        """(N, *S) float32 tensor ``name`` of every model, stacked (non-float tensors: stored dtype)."""

    def task_vectors(self, name: str) -> torch.Tensor:
        """(N, *S) float32 task vectors M_i - B of tensor ``name`` (``task_vectors``); ValueError without a base."""


def task_vectors(source: TensorSource, name: str) -> torch.Tensor:
    """(N, *S) float32 task vectors M_i - B of tensor ``name`` of ``source``, formed in the stacked read.

    The one definition of a task vector for every source. Raises ValueError without a base.
    """
    base = source.read_base(name)
    if base is None:
        raise ValueError("task vectors need a base model; choose one in the Models tab")
    return source.read_models(name).sub_(base)


@dataclass
class MergeInputs:
    """Checked inputs on disk: ``base`` (optional) and ``models`` as views that agree tensor by tensor.

    A ``TensorSource`` that reads one tensor name at a time (bounded memory: about N + 1 tensors):
    the streaming executor merges it, the Inspect statistics scan it. labels: optional expert names
    for tables and legends (default: the models' folder names).
    """

    base: Optional[Checkpoint]
    models: list[Checkpoint]
    names: list[str]  # the tensors to merge, in the reference model's order
    labels: Optional[list[str]] = None

    @property
    def reference(self) -> Checkpoint:
        """The checkpoint whose config, tokenizer and non-float tensors the output takes: the base, else the first model."""
        return self.base or self.models[0]

    @property
    def base_ckpt(self) -> Optional[Checkpoint]:
        """The base checkpoint (as ``MergeSession.base_ckpt``)."""
        return self.base

    @property
    def model_ckpts(self) -> list[Checkpoint]:
        """The models' checkpoints (as ``MergeSession.model_ckpts``)."""
        return self.models

    @property
    def model_paths(self) -> list[Path]:
        """The models' paths, in recipe order."""
        return [c.path for c in self.models]

    def sources(self) -> list[Path]:
        """Every file and folder the merge reads (for a LoRA adapter: the adapter and its base); an output must stay clear of all of them."""
        return [s for c in ([self.base] if self.base else []) + self.models for s in c.sources]

    def read_base(self, name: str) -> Optional[torch.Tensor]:
        """(*S) float32 base tensor ``name``, read now, or None without a base."""
        return self.base[name] if self.base else None

    def read_models(self, name: str) -> torch.Tensor:
        """(N, *S) float32 tensor ``name`` of every model, read now and stacked (``finite.read_stacked``)."""
        return read_stacked(self.models, name)

    def task_vectors(self, name: str) -> torch.Tensor:
        """(N, *S) float32 task vectors M_i - B of tensor ``name``, read now (``task_vectors``)."""
        return task_vectors(self, name)


def open_inputs(
    base: Optional[str | Path],
    models: Sequence[str | Path],
    tokenizer_source: TokenizerSource | str = TokenizerSource.base,
    labels: Optional[Sequence[str]] = None,
    config_source: Optional[str | int] = None,
) -> MergeInputs:
    """Open, check and align the inputs of a merge; raises CheckpointError naming model, tensor and fix.

    Order: open every input (format errors), architecture, depth and the config fields that change
    the computation (``check_config``), vocabulary and tying alignment (``explorer.io.vocab``), then
    tensor names and shapes. labels: expert names for Inspect (optional). config_source (the recipe's
    key): None refuses configs that differ in a field that changes the computation; ``"base"`` keeps
    the reference's config (the base, else the first model), a model (as given in ``models``, or its
    0-based index there) that model's: the reference's ``config`` then becomes that model's (vocabulary
    alignment kept) and its ``config_choice`` (a ``ConfigChoice``) lists every differing field for the
    model card.
    """
    if not models:
        raise CheckpointError("no models to merge; give at least one model")
    base_ckpt = open_checkpoint(base) if base else None
    model_ckpts = [open_checkpoint(m) for m in models]
    reference = base_ckpt or model_ckpts[0]
    chosen = _config_index(config_source, base, models)
    for other in model_ckpts:
        check_config(reference, other, chosen is not None)
    differences = tuple((str(o.path), d) for o in model_ckpts for d in config_differences(reference.config, o.config))
    base_ckpt, model_ckpts = align_embeddings(base_ckpt, model_ckpts, tokenizer_source)
    names = check_compatible(base_ckpt, model_ckpts, chosen is not None)
    reference = base_ckpt or model_ckpts[0]
    if chosen is not None:
        keep = reference if chosen < 0 else model_ckpts[chosen]
        reference.config = dict(keep.config)
        reference.config_choice = ConfigChoice(str(config_source), str(keep.path), differences)
    return MergeInputs(base_ckpt, model_ckpts, names, list(labels) if labels is not None else None)


def _config_index(
    config_source: Optional[str | int], base: Optional[str | Path], models: Sequence[str | Path]
) -> Optional[int]:
    """None (no config_source), -1 (the reference: ``base``, or the base model), or the index of the chosen model.

    CheckpointError for a model that is not among the inputs, or an index out of range.
    """
    if config_source is None:
        return None
    if isinstance(config_source, int):
        if not 0 <= config_source < len(models):
            raise CheckpointError(f"config_source: {config_source} is not a model index (0..{len(models) - 1})")
        return config_source
    if config_source == "base":
        return -1
    wanted = resolved_ref(str(config_source))
    if base and resolved_ref(str(base)) == wanted:
        return -1
    refs = [resolved_ref(str(m)) for m in models]
    if wanted not in refs:
        raise CheckpointError(
            f"config_source: {config_source!r} is not one of the inputs; give base, a model as listed ({', '.join(map(str, models))}) or its index"
        )
    return refs.index(wanted)


def compatibility_report(
    paths: Sequence[str | Path],
    base: Optional[str | Path] = None,
    tokenizer_source: TokenizerSource | str = TokenizerSource.base,
    config_source: Optional[str | int] = None,
) -> pd.DataFrame:
    """One row per input (base first) with what it is and whether it merges with the reference.

    Columns: path, role (base/model), format, architecture, layers, vocab (config vocab_size), dtype
    (most common tensor dtype as read), tied (bool), status and message. status is ``ok``, ``aligned``
    (vocabulary or tying differ from the reference and are aligned when merging), ``incompatible`` or
    ``unreadable`` (it does not open, or its config or tensors cannot be described); message is the
    error text, or a note on what gets aligned, followed by every config field that differs from the
    reference's (``explorer.io.config_compat``; those that change the computation make it
    ``incompatible`` unless ``config_source`` is given, as ``open_inputs``). The reference is the first
    input (base first) that is not unreadable; an error in one input never stops the report.
    """
    import pandas as pd

    entries = ([(base, "base")] if base else []) + [(p, "model") for p in paths]
    described = [(role, *_describe(path)) for path, role in entries]
    reference = next((c for _, c, _ in described if c is not None), None)
    rows = []
    for role, ckpt, row in described:
        if ckpt is not None:
            row["status"], row["message"] = (
                ("ok", "reference") if ckpt is reference else _against(reference, ckpt, tokenizer_source, config_source)
            )
        rows.append({"role": role, **row})
    return pd.DataFrame(rows, columns=REPORT_COLUMNS)


def _describe(path: str | Path) -> tuple[Optional[Checkpoint], dict]:
    """(checkpoint, its report columns), or (None, an ``unreadable`` row with the error) when it does not open or read."""
    try:
        ckpt = open_checkpoint(path)
        dtypes = Counter(ckpt.dtype(n) for n in ckpt.names())
        return ckpt, {
            "path": str(ckpt.path),
            "format": ckpt.format,
            "architecture": ckpt.architecture,
            "layers": ckpt.num_layers,
            "vocab": vocab_size_of(ckpt.config),
            "dtype": dtypes.most_common(1)[0][0],
            "tied": ckpt.tied_embeddings,
        }
    except CheckpointError as e:
        return None, {"path": str(path), "status": "unreadable", "message": str(e)}


def _against(
    reference: Checkpoint,
    other: Checkpoint,
    tokenizer_source: TokenizerSource | str,
    config_source: Optional[str | int] = None,
) -> tuple[str, str]:
    """(status, message) of merging ``other`` with ``reference``; the message ends with the differing config fields."""
    differences = config_differences(reference.config, other.config)
    fields = (
        ["config differs: " + "; ".join(d.describe("reference", "this") for d in differences)] if differences else []
    )
    try:
        check_config(reference, other, config_source is not None)
        ref_view, (view,) = align_embeddings(reference, [other], tokenizer_source)
        check_compatible(ref_view, [view], config_source is not None)
    except CheckpointError as e:
        return "incompatible", "; ".join([str(e), *fields])
    if view is other:
        return "ok", "; ".join(fields)
    alignment = view.alignment
    notes = []
    if alignment.layout is not None:
        notes.append(
            f"embedding rows aligned by token to {alignment.layout.rows} rows (tokenizer_source={tokenizer_source})"
        )
    if alignment.untie:
        notes.append(
            "tied and untied embeddings: output untied, a tied model's input embedding serves as its output embedding"
        )
    return "aligned", "; ".join(notes + fields)
