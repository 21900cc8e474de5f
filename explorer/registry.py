"""Merge-method registry: frozen specs the executor runs and the UI builds its sliders from.

A method is a pure function over the stacked tensors of one tensor name (see ``MethodFn``).
``register`` checks the spec against the function signature at import time and refuses duplicates;
``get`` answers a typo with the closest names.
"""

from __future__ import annotations

import difflib
import hashlib
import inspect
import math
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Callable, Iterable, Optional, Union

import torch

from explorer.choices import Choice, Space, parse_choice

ParamValue = Union[float, bool, str]

# Signature of a method: fn(x, *, base, generator, **params) -> Tensor (*S)
#   x:         (N, *S) float32; task vectors M_i - B when space == "delta", else the model weights;
#              a fresh tensor per call that the method may overwrite (it is never an input's storage)
#   base:      (*S) float32 base weights, or None when the recipe has no base model
#   generator: ``tensor_generator(recipe seed, tensor name)`` (random methods only)
#   params:    per-model params as float32 tensors of shape (N,), global params as Python scalars
#   extra:     what the executor adds per call: ``spec.prepare``'s result, and ``fisher`` (N, *S) when
#              ``spec.needs_fisher``
MethodFn = Callable[..., torch.Tensor]

# Signature of a pre-pass: prepare(params, items) -> extra kwargs for every call of the method.
#   params: the resolved params (as passed to ``call``); items: a lazy iterable of (tensor name, x) with
#   x exactly as the method will get it (task vectors for space == "delta"). A prepare that needs no
#   pre-pass for these params returns {} without iterating, so the executor may always call it.
PrepareFn = Callable[[dict, Iterable[tuple[str, torch.Tensor]]], dict[str, Any]]


@dataclass(frozen=True)
class Param:
    """One tunable parameter of a method, in mergekit's vocabulary (weight, density, lambda, ...).

    ``per_model`` params take one value per input model (a slider per model in the UI); the others
    one value for the whole merge. A string parameter is always a choice: ``enum`` (an
    ``explorer.choices`` enum) lists its values, ``choices`` gives them as plain strings (a dropdown).
    ``low``/``high`` bound the values a recipe may hold, unless ``slider_only``: then they are only the
    UI slider's range and a recipe may hold any finite number (mergekit accepts ``weight: 3.0``).

    Raises ValueError when a string default has no enum or is not one of its values.
    """

    name: str
    default: ParamValue
    help: str
    per_model: bool = False
    low: Optional[float] = None
    high: Optional[float] = None
    step: Optional[float] = None
    enum: Optional[type[Choice]] = None  # the values of a choice parameter
    setup: bool = False  # read by the executor before merging (e.g. Fisher estimation), not passed to fn
    aliases: tuple[tuple[ParamValue, str], ...] = ()  # other spellings of a choice, e.g. mergekit's (True, "l1")
    slider_only: bool = False  # low/high are the slider's range, not limits on the value

    def __post_init__(self) -> None:
        if isinstance(self.default, str) and self.enum is None:
            raise ValueError(f"param {self.name!r}: a string parameter is a choice; give its enum (explorer.choices)")
        if self.enum is not None:
            object.__setattr__(self, "default", parse_choice(self.enum, self.default, f"param {self.name!r} default"))
            for _, target in self.aliases:
                parse_choice(self.enum, target, f"param {self.name!r} alias target")

    @property
    def choices(self) -> tuple[str, ...]:
        """The values of a choice parameter, as plain strings (empty for other parameters)."""
        return tuple(m.value for m in self.enum) if self.enum is not None else ()

    def check(self, value: ParamValue, where: str) -> ParamValue:
        """Return ``value`` coerced to this param's type; raise ValueError naming ``where`` if invalid.

        A choice comes back as its enum member (an unknown one is answered with the closest value); a
        number as a finite float, within [low, high] unless ``slider_only``; a flag must be a bool.
        """
        if isinstance(self.default, bool):
            if not isinstance(value, bool):
                raise ValueError(f"{where}: {self.name} must be true or false, got {value!r}")
            return value
        if self.enum is not None:
            return parse_choice(self.enum, value, f"{where}: {self.name}", self.aliases)
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: {self.name} must be a number, got {value!r}") from None
        if not math.isfinite(number):
            raise ValueError(f"{where}: {self.name} is {number}; give a finite number")
        if self.slider_only:
            return number
        if (self.low is not None and number < self.low) or (self.high is not None and number > self.high):
            raise ValueError(f"{where}: {self.name}={number} is outside [{self.low}, {self.high}]")
        return number


@dataclass(frozen=True)
class MethodSpec:
    """A registered merge method: what it is, where it comes from, and its parameters."""

    name: str
    pretty_name: str
    paper_url: str
    space: Space
    fn: MethodFn
    params: tuple[Param, ...] = ()
    needs_base: bool = False
    min_models: int = 1
    max_models: Optional[int] = None
    summary: str = ""
    prepare: Optional[PrepareFn] = None  # whole-model pre-pass, see PrepareFn
    needs_fisher: bool = False  # fn takes fisher=(N, *S) diagonal Fisher of each model, or None

    def __post_init__(self) -> None:
        object.__setattr__(self, "space", parse_choice(Space, self.space, f"method {self.name!r}: space"))

    def param(self, name: str) -> Param:
        """The Param called ``name``; KeyError with the valid names if there is none."""
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(f"method {self.name!r} has no parameter {name!r}; it has {[p.name for p in self.params]}")

    @property
    def staged(self) -> bool:
        """True when ``fn`` takes ``stages`` (``explorer.methods.stages``).

        An in-memory session then keeps the method's intermediate results between merges (``explorer.stage_cache``).
        """
        return "stages" in inspect.signature(self.fn).parameters

    @cached_property
    def adds_base(self) -> bool:
        """True when ``fn`` takes ``with_base``: a delta-space method that returns base + its task vector.

        It then returns a ``kernels.Finished`` (the merged weights and their peak) from its last pass,
        where the executor would otherwise add the base and measure the range in two more.
        """
        return "with_base" in inspect.signature(self.fn).parameters  # cached: 80 us a call, asked per tensor

    @property
    def per_model_params(self) -> tuple[Param, ...]:
        """The params that take one value per input model, in spec order."""
        return tuple(p for p in self.params if p.per_model)

    @property
    def global_params(self) -> tuple[Param, ...]:
        """The params that take one value for the whole merge, in spec order."""
        return tuple(p for p in self.params if not p.per_model)


_METHODS: dict[str, MethodSpec] = {}


def tensor_seed(seed: int, name: str) -> int:
    """Deterministic 63-bit seed for tensor ``name`` under recipe ``seed`` (independent of order)."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def tensor_generator(seed: int, name: str) -> torch.Generator:
    """The CPU generator a random method gets for tensor ``name`` under recipe ``seed``."""
    return torch.Generator().manual_seed(tensor_seed(seed, name))


def _kwarg(name: str) -> str:
    """Python name of a param: ``lambda`` is a keyword, so its argument is ``lambda_``."""
    return name + "_" if name == "lambda" else name


def register(spec: MethodSpec) -> MethodSpec:
    """Add ``spec``; raise ValueError on a duplicate name or a spec that disagrees with its function."""
    if spec.name in _METHODS:
        raise ValueError(f"merge method {spec.name!r} is already registered")
    accepted = set(inspect.signature(spec.fn).parameters) - {"x", "base", "generator"}
    declared = {_kwarg(p.name) for p in spec.params if not p.setup} | ({"fisher"} if spec.needs_fisher else set())
    if not declared <= accepted:
        raise ValueError(f"{spec.name}: params {sorted(declared - accepted)} are not arguments of its function")
    _METHODS[spec.name] = spec
    return spec


def get(name: str) -> MethodSpec:
    """The spec called ``name``; KeyError suggesting the closest registered names on a typo."""
    _load_builtin_methods()
    if name not in _METHODS:
        close = difflib.get_close_matches(name, list(_METHODS), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise KeyError(f"unknown merge method {name!r}.{hint} Known: {', '.join(sorted(_METHODS))}")
    return _METHODS[name]


def all_methods() -> list[MethodSpec]:
    """Every registered method, in registration order."""
    _load_builtin_methods()
    return list(_METHODS.values())


def call(
    spec: MethodSpec,
    x: torch.Tensor,
    base: Optional[torch.Tensor],
    generator: torch.Generator,
    params: dict,
    extra: Optional[dict] = None,
) -> torch.Tensor:
    """Run ``spec.fn`` with ``params`` keyed by param name (per-model ones as (N,) tensors).

    Setup params are not passed. ``extra`` holds keyword inputs that are not params: the result of
    ``spec.prepare`` and, for ``needs_fisher`` methods, ``fisher``.
    """
    kwargs = {_kwarg(p.name): params[p.name] for p in spec.params if not p.setup}
    return spec.fn(x, base=base, generator=generator, **kwargs, **(extra or {}))


def _load_builtin_methods() -> None:
    import explorer.methods  # noqa: F401  (registers on import)
