"""Where the Inspect statistics read task vectors from, and how tensor names map to layers.

A source is an ``explorer.io.inputs.TensorSource``, the same protocol the merge reads: ``names``,
``base`` and ``models`` (mappings name -> float32 weights) and ``task_vectors(name)``. A
``MergeSession`` holds them in memory; ``open_inputs`` (``DiskTaskVectors`` here) reads checkpoints
from disk one tensor name at a time, with the merge's vocabulary alignment and tied/untied handling;
``TensorTaskVectors`` wraps task vectors already in memory (tests, notebooks) and has no ``models``.

With ``base`` and ``models`` the statistics compute M_i - B into a reused buffer instead of a fresh
(N, *S) stack (same numbers, faster); ``base`` is also needed for distances of a merge from its
inputs. An optional ``labels`` gives expert names (default: the folder names of ``model_paths``). A
source with weights may hold a ``scan_cache`` dict (a ``MergeSession`` does): the scan then keeps each
tensor's measurements there (and ``plots.inspect_panels`` the panels that do not depend on the merge),
and a refresh after a new merge only measures the merge's distances.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from explorer.choices import TokenizerSource
from explorer.io.inputs import MergeInputs, TensorSource, open_inputs

_BLOCK = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks)\.(\d+)\.")
_OUTSIDE_BLOCKS = (
    ("embed", "embed"),
    ("wte", "embed"),
    ("wpe", "embed"),
    ("lm_head", "head"),
    ("norm", "norm"),
    ("ln_f", "norm"),
)
_RANK = {"embed": -1, "norm": 1 << 30, "head": (1 << 30) + 1}


def layer_of(name: str) -> str:
    """Layer label of tensor ``name``.

    The block index as a string ("0", "1", ...) for ``model.layers.{i}.`` (also ``h.{i}.``,
    ``layer.{i}.``, ``blocks.{i}.``), else "embed", "norm", "head" or "other" by the name's parts
    (``embed_tokens``/``wte`` -> embed, ``lm_head`` -> head, final ``norm``/``ln_f`` -> norm).
    """
    match = _BLOCK.search(name)
    if match:
        return match.group(1)
    return next((label for part, label in _OUTSIDE_BLOCKS if part in name), "other")


def layer_rank(label: str) -> int:
    """Sort key putting layer labels in model order: embed, 0, 1, ..., norm, head, other."""
    return int(label) if label.isdigit() else _RANK.get(label, (1 << 30) + 2)


TaskVectorSource = TensorSource  # the statistics read the merge's source protocol


def expert_labels(source: TaskVectorSource, n: int) -> list[str]:
    """``n`` distinct expert labels.

    ``source.labels``, else the folder names of ``source.model_paths`` (suffixed " (2)", " (3)" where
    they repeat), else "expert 0", "expert 1", ...

    Raises ValueError when the source's labels do not number ``n``.
    """
    labels = getattr(source, "labels", None)
    if labels is None:
        paths = getattr(source, "model_paths", None)
        labels = [Path(p).name for p in paths] if paths else [f"expert {i}" for i in range(n)]
    if len(labels) != n:
        raise ValueError(f"the source names {len(labels)} experts but its task vectors stack {n}")
    return _distinct(list(labels))


def _distinct(labels: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        out.append(label if seen[label] == 1 else f"{label} ({seen[label]})")
    return out


def lacks_base(source: TaskVectorSource) -> bool:
    """True for a source that holds weights (``models``) but no base: it has no task vectors."""
    return source.models is not None and source.base is None


def DiskTaskVectors(  # noqa: N802  (named as the class it replaces)
    base: str | Path,
    models: Sequence[str | Path],
    labels: Sequence[str] | None = None,
    tokenizer_source: TokenizerSource | str = TokenizerSource.base,
) -> MergeInputs:
    """Checkpoints on disk as an Inspect source, read one tensor name at a time (bounded memory).

    Exactly the inputs a merge of the same models reads (``explorer.io.inputs.open_inputs``): vocabularies
    aligned by token (``tokenizer_source``), tied and untied embeddings reconciled. Peak memory is
    about (N + 1) x the largest tensor in float32 plus the statistics' work buffers. Raises
    CheckpointError naming the model, tensor and fix when the models do not merge with the base.
    """
    return open_inputs(base, models, tokenizer_source, labels)


class TensorTaskVectors:
    """Task vectors already in memory.

    ``vectors`` maps name -> (N, *S) tensor; ``base`` (optional) maps name -> (*S) base weights,
    needed only for distances of a merge from its inputs.
    """

    models = None  # only task vectors are known

    def __init__(
        self,
        vectors: Mapping[str, torch.Tensor],
        labels: Sequence[str] | None = None,
        base: Mapping[str, torch.Tensor] | None = None,
    ):
        self.vectors, self.base = dict(vectors), base
        self.names = list(self.vectors)
        self.labels = list(labels) if labels is not None else None

    def task_vectors(self, name: str) -> torch.Tensor:
        """(N, *S) float32 task vectors of tensor ``name`` (KeyError if unknown)."""
        return self.vectors[name].float()
