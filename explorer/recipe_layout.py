"""Which input tensors make each output tensor: the ``models`` form and mergekit's ``slices``.

A ``TensorPlace`` says, for one output tensor, which tensor of which input model goes in (the base's
tensor too), which slice's parameters apply and the position ``t`` in [0, 1] that gradients are
evaluated at. The layout follows mergekit 0.1.5's planner (``mergekit.plan.MergePlanner``):

- ``models`` form: one slice over every layer; layer i of L has t = i / (L - 1) (t = 1 when L = 1).
- ``slices`` form: slice s takes ``layer_range [a, b)`` of each of its sources; its layers are
  numbered on from the layers of the slices before it, and its k-th layer has t = k / (b - a - 1)
  (t = 1 for a one-layer slice). The base's tensor comes from the slice's source that is the base.
- tensors outside the layers have t = 0: those before the layers (the embeddings, ``PRE_LAYER``) take
  the first slice's models and parameters, the others (final norm, head) the last slice's.

Layer tensors are recognized by name (``model.layers.3.mlp.up_proj.weight``, GPT-2's ``h.3.``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Sequence

LAYER = re.compile(r"(^|\.)(layers|h|blocks)\.(\d+)\.")
PRE_LAYER = ("embed", "wte", "wpe")  # name parts of the tensors before the layers (embeddings)


@dataclass(frozen=True)
class SliceSource:
    """One source of a slice: the model (its index in the recipe's unique models) and its first layer."""

    model: str  # the model's name in the recipe
    start: int  # first input layer
    is_base: bool = False


@dataclass(frozen=True)
class TensorPlace:
    """One output tensor and where its inputs come from.

    name:   the output tensor's name
    inputs: (model name, input tensor name) of each merged model, in the slice's order
    base:   the input tensor name in the base model, or None without a base
    slice:  index of the slice whose parameters apply (0 in the ``models`` form)
    t:      position along the slice's layers in [0, 1], for gradients
    """

    name: str
    inputs: tuple[tuple[str, str], ...]
    base: Optional[str]
    slice: int
    t: float

    def input_name(self, model: str) -> str:
        """The name of the tensor ``model`` contributes to this place."""
        return next(n for m, n in self.inputs if m == model)


@dataclass(frozen=True)
class Slice:
    """One output slice: its sources (the base among them, if any) and its number of layers."""

    sources: tuple[SliceSource, ...]
    length: int


def layer_index(name: str) -> Optional[int]:
    """The layer index in tensor ``name`` (``model.layers.3.x`` -> 3), or None for a non-layer tensor."""
    found = LAYER.search(name)
    return int(found.group(3)) if found else None


def with_layer(name: str, index: int) -> str:
    """``name`` with its layer index replaced by ``index``."""
    return LAYER.sub(lambda m: f"{m.group(1)}{m.group(2)}.{index}.", name, count=1)


def layer_count(names: Sequence[str]) -> int:
    """Number of layers in ``names`` (largest layer index + 1; 0 when there are no layer tensors)."""
    indices = [i for i in map(layer_index, names) if i is not None]
    return max(indices) + 1 if indices else 0


def layer_t(index: int, length: int) -> float:
    """Gradient position of the ``index``-th of ``length`` layers: index / (length - 1), 1 for one layer."""
    return index / (length - 1) if length > 1 else 1.0


def places(names: Sequence[str], slices: Sequence[Slice]) -> list[TensorPlace]:
    """Every output tensor of a merge of ``slices`` over models whose tensors are ``names``.

    ``names`` are the input tensor names in the reference model's order (every input has them). Output
    order: tensors before the layers, the layers slice by slice, then the rest. Raises ValueError when
    a slice's layer range is outside the models' layers.
    """
    per_layer = [n for n in names if layer_index(n) == 0]
    outside = [n for n in names if layer_index(n) is None]
    pre = [n for n in outside if any(part in n for part in PRE_LAYER)]
    post = [n for n in outside if n not in pre]
    depth = layer_count(names)
    if len(per_layer) * depth != len(names) - len(outside):
        raise ValueError("the layers of these models do not all hold the same tensors; slices cannot renumber them")
    out = [_place(n, n, slices[0], 0, 0.0) for n in pre]
    layer = 0
    for s, piece in enumerate(slices):
        for src in piece.sources:
            if src.start < 0 or src.start + piece.length > depth:
                raise ValueError(
                    f"slices[{s}]: layer_range [{src.start}, {src.start + piece.length}] of {src.model} is outside its "
                    f"{depth} layers; give a range within [0, {depth}]"
                )
        for k in range(piece.length):
            t = layer_t(k, piece.length)
            out += [_layer_place(n, layer, piece, k, s, t) for n in per_layer]
            layer += 1
    out += [_place(n, n, slices[-1], len(slices) - 1, 0.0) for n in post]
    if {p.name for p in out} == set(names):  # the layers keep their places: keep the reference order
        order = {n: i for i, n in enumerate(names)}
        out.sort(key=lambda p: order[p.name])
    return out


def _layer_place(template: str, layer: int, piece: Slice, offset: int, s: int, t: float) -> TensorPlace:
    """The place of output layer ``layer``'s tensor ``template`` (a layer-0 name), from slice ``piece``."""
    inputs = {src: with_layer(template, src.start + offset) for src in piece.sources}
    return _from_sources(with_layer(template, layer), inputs, s, t)


def _place(out_name: str, in_name: str, piece: Slice, s: int, t: float) -> TensorPlace:
    return _from_sources(out_name, {src: in_name for src in piece.sources}, s, t)


def _from_sources(out_name: str, inputs: dict[SliceSource, str], s: int, t: float) -> TensorPlace:
    base = next((n for src, n in inputs.items() if src.is_base), None)
    merged = tuple((src.model, n) for src, n in inputs.items() if not src.is_base)
    return TensorPlace(out_name, merged, base, s, t)


def whole_models(models: Sequence[str], base: Optional[str], names: Sequence[str]) -> list[TensorPlace]:
    """The ``models`` form: every tensor of ``names`` from every model, in ``names``' order.

    One slice over every layer: layer i of L (L = largest layer index in ``names`` + 1) has
    t = i / (L - 1), other tensors t = 0. ``base``: the base model's name, None without one.
    """
    depth = layer_count(names)
    out = []
    for name in names:
        index = layer_index(name)
        t = 0.0 if index is None else layer_t(index, depth)
        out.append(TensorPlace(name, tuple((m, name) for m in models), name if base else None, 0, t))
    return out
