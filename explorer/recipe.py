"""MergeRecipe: everything that determines a merge, read from and written to mergekit-style YAML.

The YAML language is mergekit 0.1.5's (``merge_method``, ``base_model``, ``models[].model``,
``models[].parameters``, ``slices[].sources[].{model, layer_range, parameters}``,
``slices[].parameters``, ``parameters``, ``dtype``, ``out_dtype``, ``tokenizer_source``, ``tokenizer``
with a ``source`` only) plus ``seed`` for random methods and ``out_of_range`` for values the output
dtype cannot hold, so a recipe written here runs in mergekit when the method exists there, and a
mergekit recipe of a method we have runs here with the same meaning.

Parameter values may be scalars, gradients over the layers and filtered lists
(``explorer.recipe_values``); which input tensors make each output tensor, and at which gradient
position, is ``explorer.recipe_layout``. Precedence of a value for one tensor, as in mergekit's
``ConfigReader.parameter_sources``: the model's own parameters (its ``models`` entry or slice source),
then the slice's, then the top-level ones, then the method's default. A per-model parameter given at
the top level applies to every model. Keys we cannot honour are refused with ``recipe_keys.UNSUPPORTED``'s message
before anything is read or written, so a recipe is never half-applied. String settings are
``explorer.choices`` enums: validated here, a typo answered with the closest value, written back as
plain strings.
"""

from __future__ import annotations

import difflib
from enum import Enum
from pathlib import Path
from typing import Any, Optional

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from explorer import registry
from explorer.choices import DType, OutOfRange, TokenizerSource, TrimScope, parse_choice
from explorer.io.formats.refs import resolved_ref
from explorer.recipe_keys import UNSUPPORTED, mergekit_keys
from explorer.recipe_layout import Slice, SliceSource, TensorPlace, places, whole_models
from explorer.recipe_values import ParamSetting, evaluate, is_scalar, leaves

DTYPES = {DType.float32: torch.float32, DType.float16: torch.float16, DType.bfloat16: torch.bfloat16}


class ModelEntry(BaseModel):
    """One input model: a local checkpoint folder and its per-model parameters."""

    model_config = ConfigDict(extra="forbid")

    model: str
    parameters: dict[str, ParamSetting] = Field(default_factory=dict)


class SliceSourceEntry(BaseModel):
    """One source of a slice: layers ``layer_range`` = [first, end) of ``model``, and its parameters."""

    model_config = ConfigDict(extra="forbid")

    model: str
    layer_range: tuple[int, int]
    parameters: dict[str, ParamSetting] = Field(default_factory=dict)


class SliceEntry(BaseModel):
    """One output slice: equally long layer ranges of its sources, merged layer by layer."""

    model_config = ConfigDict(extra="forbid")

    sources: list[SliceSourceEntry]
    parameters: dict[str, ParamSetting] = Field(default_factory=dict)

    @property
    def length(self) -> int:
        """Number of layers of this slice (each source's layer_range covers this many)."""
        first, end = self.sources[0].layer_range
        return end - first


class MergeRecipe(BaseModel):
    """A complete, validated merge description (method, inputs, parameters, output dtype, seed)."""

    model_config = ConfigDict(extra="forbid")

    merge_method: str
    models: list[ModelEntry] = Field(default_factory=list)
    slices: Optional[list[SliceEntry]] = None
    base_model: Optional[str] = None
    parameters: dict[str, ParamSetting] = Field(default_factory=dict)
    # mergekit computes in dtype and writes out_dtype (dtype when not given); here the computation is
    # always float32 and the output is written in out_dtype, else dtype.
    dtype: DType = DType.float32
    out_dtype: Optional[DType] = None
    seed: int = 0
    # Vocabulary of the output when the inputs' differ (mergekit's key): "base" = the base model's
    # (else the first model's) tokenizer; "union" = it plus every other model's extra tokens.
    tokenizer_source: TokenizerSource = TokenizerSource.base
    # Whose config.json the output keeps when the inputs' configs differ in a field that changes the
    # computation (rope, context length, norm eps, ...; explorer.io.config_compat): "base" (the base
    # model's, else the first model's), a model as listed in the recipe, or its 0-based index among the
    # merged models. Not set: such a difference refuses the merge.
    config_source: Optional[str | int] = None
    # The output tokenizer's chat template: Jinja text, or "auto" (the template most inputs carry).
    chat_template: Optional[str] = None
    # A merged value outside the output dtype's range (float16: |x| > 65504): "refuse" the merge, or
    # "clamp" it to the largest finite value.
    out_of_range: OutOfRange = OutOfRange.refuse

    @field_validator("dtype", "out_dtype", "tokenizer_source", "out_of_range", mode="before")
    @classmethod
    def _choice(cls, value: object, info) -> object:
        """Parse a string setting, answering a typo with the closest value."""
        if value is None and info.field_name == "out_dtype":
            return None
        kind = {"out_dtype": DType}.get(info.field_name) or cls.model_fields[info.field_name].annotation
        return parse_choice(kind, value, info.field_name)

    @field_validator("chat_template")
    @classmethod
    def _template(cls, value: Optional[str]) -> Optional[str]:
        """Accept "auto" or Jinja text; refuse a template name (mergekit ships those files, we do not)."""
        if value is not None and value != "auto" and ("{" not in value or len(value) < 20):
            raise ValueError(f"chat_template: {value!r}: {UNSUPPORTED['chat_template: NAME']}")
        return value

    @model_validator(mode="before")
    @classmethod
    def _from_mergekit(cls, data: Any) -> Any:
        """Read mergekit's spellings; refuse what cannot be honoured, naming the key (``recipe_keys``)."""
        return mergekit_keys(data)

    @model_validator(mode="after")
    def _check(self) -> "MergeRecipe":
        spec = registry.get(self.merge_method)
        if spec.needs_base and self.base_model:
            # mergekit lists the base among the models too (e.g. slerp); it is the base, not an input.
            base = resolved_ref(self.base_model)
            self.models = [e for e in self.models if resolved_ref(e.model) != base]
        if not self.models and not self.slices:
            raise ValueError("a recipe needs at least one model under 'models' (or 'slices')")
        if spec.needs_base and not self.base_model:
            raise ValueError(
                f"{spec.name} works on task vectors and needs base_model: set base_model to the checkpoint the experts were fine-tuned from"
            )
        for where, count in self._input_counts():
            if count < spec.min_models or (spec.max_models and count > spec.max_models):
                wanted = (
                    f"{spec.min_models}"
                    if spec.min_models == spec.max_models
                    else f"{spec.min_models} to {spec.max_models}"
                    if spec.max_models
                    else f"at least {spec.min_models}"
                )
                raise ValueError(
                    f"{where}{spec.name} takes {wanted} model(s) besides the base; got {count}: "
                    f"list {wanted} under models (in the app: tick {wanted} expert(s) in the Models tab and Load), or choose another method"
                )
        self._check_settings(spec)
        self._check_config_source()
        return self

    def _check_config_source(self) -> None:
        """ValueError unless ``config_source`` is base, a model of the recipe, or an index among the merged models."""
        source, models = self.config_source, self.input_models()
        if source is None or source == "base":
            return
        if isinstance(source, int):
            if not 0 <= source < len(models):
                raise ValueError(f"config_source: {source} is not the index of a merged model (0..{len(models) - 1})")
            return
        refs = [resolved_ref(m) for m in models + ([self.base_model] if self.base_model else [])]
        if resolved_ref(source) not in refs:
            raise ValueError(
                f"config_source: {source!r} is not a model of this recipe; give base, one of {models} or its index"
            )

    def _input_counts(self) -> list[tuple[str, int]]:
        """(where, number of merged models) of the whole recipe, or of each slice."""
        if not self.slices:
            return [("", len(self.models))]
        counts = []
        for i, piece in enumerate(self.slices):
            if not piece.sources:
                raise ValueError(f"slices[{i}]: a slice needs at least one source (model and layer_range)")
            lengths = {src.layer_range[1] - src.layer_range[0] for src in piece.sources}
            if len(lengths) > 1 or min(lengths) <= 0:
                ranges = [list(src.layer_range) for src in piece.sources]
                raise ValueError(
                    f"slices[{i}]: layer ranges {ranges} must each hold the same, positive number of layers [first, end)"
                )
            names = [src.model for src in piece.sources]
            if len(set(names)) != len(names):
                raise ValueError(f"slices[{i}]: a model appears twice among the sources {names}; list each once")
            if registry.get(self.merge_method).needs_base and not any(self._is_base(m) for m in names):
                raise ValueError(
                    f"slices[{i}] has no source for base_model {self.base_model}; add it with the slice's layer_range"
                )
            counts.append((f"slices[{i}]: ", sum(not self._is_base(m) for m in names)))
        return counts

    def _is_base(self, model: str) -> bool:
        """True when ``model`` is the base of a method that needs one (not a merged input)."""
        return bool(
            self.base_model
            and registry.get(self.merge_method).needs_base
            and resolved_ref(model) == resolved_ref(self.base_model)
        )

    def _scopes(self, where: str = "") -> list[tuple[str, dict, bool]]:
        """(where, settings, per-model only) of every parameter block of the recipe."""
        scopes = [(f"{where}parameters", self.parameters, False)]
        scopes += [(e.model, e.parameters, True) for e in self.models]
        for i, piece in enumerate(self.slices or []):
            scopes.append((f"slices[{i}].parameters", piece.parameters, False))
            scopes += [(f"slices[{i}] {src.model}", src.parameters, True) for src in piece.sources]
        return scopes

    def _check_settings(self, spec: registry.MethodSpec) -> None:
        """Every key a param of the method, every written value valid; refusals that need the values."""
        names = {p.name for p in spec.params}
        for where, settings, per_model in self._scopes():
            for key, setting in settings.items():
                if key not in names:
                    close = difflib.get_close_matches(key, sorted(names), n=1)
                    hint = f"did you mean {close[0]!r}? " if close else ""
                    raise ValueError(f"{where}: {spec.name} has no parameter {key!r}; {hint}it has {sorted(names)}")
                p = spec.param(key)
                if per_model and not p.per_model:
                    raise ValueError(
                        f"{where}: {key!r} is not a per-model parameter of {spec.name}; per-model: {[q.name for q in spec.per_model_params]}"
                    )
                for value in leaves(setting):
                    p.check(value, where)
                if p.setup and not is_scalar(setting):
                    raise ValueError(f"{where}: {key} is set once for the whole merge; give one value, not a list")
        if spec.needs_fisher and self.slices:
            raise ValueError(f"slices: {spec.name} estimates a Fisher of whole models; give 'models' instead of slices")
        if spec.prepare and any(
            TrimScope.model == v for _, s, _ in self._scopes() for v in leaves(s.get("trim_scope"))
        ):
            varying = [k for _, s, _ in self._scopes() for k, v in s.items() if not is_scalar(v)]
            if varying or self.slices:
                raise ValueError(
                    f"trim_scope: model ranks the whole model at one density per model; with "
                    f"{'slices' if self.slices else 'gradients or filters on ' + str(varying)} use trim_scope: tensor"
                )

    def varying(self) -> list[str]:
        """Where the recipe sets a value per layer or per tensor: ``where.param`` of each gradient or filter."""
        return [
            f"{where}.{key}" for where, settings, _ in self._scopes() for key, v in settings.items() if not is_scalar(v)
        ]

    @property
    def torch_dtype(self) -> torch.dtype:
        """The dtype the output is written in (``out_dtype``, else ``dtype``) as a torch dtype."""
        return DTYPES[self.out_dtype or self.dtype]

    def input_models(self) -> list[str]:
        """The merged models' names, in order of first appearance (the base of a method that needs one not included)."""
        if not self.slices:
            return [e.model for e in self.models]
        found = [src.model for piece in self.slices for src in piece.sources if not self._is_base(src.model)]
        return list(dict.fromkeys(found))

    def model_paths(self) -> list[Path]:
        """The merged models' names as paths, in order (the base not included)."""
        return [Path(m) for m in self.input_models()]

    def layout(self, names: list[str]) -> list[TensorPlace]:
        """Every output tensor and its inputs (``explorer.recipe_layout.places``) over models with tensors ``names``.

        Raises ValueError when a slice's layer range is outside the models' layers.
        """
        if not self.slices:
            return whole_models(self.input_models(), self.base_model, names)
        pieces = [
            Slice(tuple(SliceSource(s.model, s.layer_range[0], self._is_base(s.model)) for s in p.sources), p.length)
            for p in self.slices
        ]
        return places(names, pieces)

    def params_at(self, place: TensorPlace) -> dict:
        """Every param of the method for the output tensor at ``place``: per-model ones as (N,) float32 tensors.

        A per-model value is evaluated against the model's input tensor name, a global one against the
        output name (as mergekit does), both at ``place.t``. Precedence: the model's own parameters, the
        slice's, the top-level ones, the spec default. Raises ValueError naming the model and param when
        a value is invalid.
        """
        values: dict = {}
        for p in registry.get(self.merge_method).params:
            if p.per_model:
                per = [self._value(p, place.slice, place.t, name, model) for model, name in place.inputs]
                values[p.name] = torch.tensor(per, dtype=torch.float32)
            else:
                values[p.name] = self._value(p, place.slice, place.t, place.name)
        return values

    def _value(self, p: registry.Param, slice_index: int, t: float, name: str, model: Optional[str] = None) -> Any:
        """The value of ``p`` for tensor ``name`` (of ``model``, for a per-model param) at position ``t``."""
        where = model or "parameters"
        for settings in self._settings_for(slice_index, model):
            if p.name in settings:
                value = evaluate(settings[p.name], name, t, lambda v: p.check(v, where))
                if value is not None:
                    return value
        return p.check(p.default, where)

    def _settings_for(self, slice_index: int, model: Optional[str]) -> list[dict]:
        """The parameter blocks that apply to ``model`` (None: a global param) in slice ``slice_index``, highest first."""
        if not self.slices:
            own = [e.parameters for e in self.models if model is not None and e.model == model]
            return [*own, self.parameters]
        piece = self.slices[slice_index]
        own = [src.parameters for src in piece.sources if model is not None and src.model == model]
        return [*own, piece.parameters, self.parameters]

    def resolved_params(self) -> dict:
        """The params at t = 0 of a tensor no filter names (in the first slice); per-model ones as (N,) tensors.

        For a recipe without gradients or filters these are the params of every tensor.

        Raises ValueError naming the model and param when a value is out of range or of the wrong type.
        """
        if self.slices:
            inputs = tuple((s.model, "") for s in self.slices[0].sources if not self._is_base(s.model))
        else:
            inputs = tuple((m, "") for m in self.input_models())
        return self.params_at(TensorPlace("", inputs, None, 0, 0.0))

    def to_yaml(self) -> str:
        """mergekit-style YAML; defaults that equal the spec's are kept so the file is self-describing.

        Choices are written as their plain string values; ``models`` or ``slices``, whichever the recipe uses.
        """
        data = _plain(self.model_dump(exclude_none=True, mode="json"))
        if self.slices:
            data.pop("models", None)
        return yaml.safe_dump(data, sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str) -> "MergeRecipe":
        """Parse and validate YAML text; raises ValueError (pydantic ValidationError) on bad input.

        Text that is not YAML raises ValueError naming the line and column PyYAML stopped at.
        """
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(e, "problem", None) or str(e)
            raise ValueError(
                f"the recipe is not valid YAML{where}: {problem}; check the indentation and the colons there"
            ) from None
        return cls.model_validate(data)

    @classmethod
    def load(cls, path: str | Path) -> "MergeRecipe":
        """Read and validate the YAML file at ``path``; OSError if unreadable, ValueError if invalid."""
        return cls.from_yaml(Path(path).read_text())


def _plain(value: Any) -> Any:
    """``value`` with every enum member replaced by its value, in nested dicts and lists (for YAML)."""
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value
