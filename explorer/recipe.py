"""MergeRecipe: everything that determines a merge, read from and written to mergekit-style YAML.

The YAML keys are mergekit's (``merge_method``, ``base_model``, ``models[].model``,
``models[].parameters``, ``parameters``, ``dtype``, ``tokenizer_source``) plus ``seed`` for random
methods and ``out_of_range`` for values the output dtype cannot hold, so a recipe
written here runs in mergekit when the method exists there, and a mergekit recipe runs here.
A per-model parameter given in the top-level ``parameters`` applies to every model, as in mergekit.
String settings (``dtype``, ``tokenizer_source``, ``out_of_range`` and choice parameters such as
``rescale``) are ``explorer.choices`` enums: validated here, with the closest value suggested on a
typo, and written back to YAML as plain strings.
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
from explorer.choices import DType, OutOfRange, TokenizerSource, parse_choice
from explorer.io.formats.refs import resolved_ref
from explorer.registry import ParamValue

MERGEKIT_ONLY = ("int8_mask",)
DTYPES = {DType.float32: torch.float32, DType.float16: torch.float16, DType.bfloat16: torch.bfloat16}


class ModelEntry(BaseModel):
    """One input model: a local checkpoint folder and its per-model parameters."""

    model_config = ConfigDict(extra="forbid")

    model: str
    parameters: dict[str, ParamValue] = Field(default_factory=dict)


class MergeRecipe(BaseModel):
    """A complete, validated merge description (method, inputs, parameters, output dtype, seed)."""

    model_config = ConfigDict(extra="forbid")

    merge_method: str
    models: list[ModelEntry]
    base_model: Optional[str] = None
    parameters: dict[str, ParamValue] = Field(default_factory=dict)
    dtype: DType = DType.float32
    seed: int = 0
    # Vocabulary of the output when the inputs' differ (mergekit's key): "base" = the base model's
    # (else the first model's) tokenizer; "union" = it plus every other model's extra tokens.
    tokenizer_source: TokenizerSource = TokenizerSource.base
    # A merged value outside the output dtype's range (float16: |x| > 65504): "refuse" the merge, or
    # "clamp" it to the largest finite value.
    out_of_range: OutOfRange = OutOfRange.refuse

    @field_validator("dtype", "tokenizer_source", "out_of_range", mode="before")
    @classmethod
    def _choice(cls, value: object, info) -> object:
        """Parse a string setting, answering a typo with the closest value."""
        kind = cls.model_fields[info.field_name].annotation
        return parse_choice(kind, value, info.field_name)

    @model_validator(mode="before")
    @classmethod
    def _from_mergekit(cls, data: dict) -> dict:
        """Accept mergekit's spellings: drop ``int8_mask`` (a memory option with no effect on the math)."""
        if isinstance(data, dict) and isinstance(data.get("parameters"), dict):
            data = {**data, "parameters": {k: v for k, v in data["parameters"].items() if k not in MERGEKIT_ONLY}}
        return data

    @model_validator(mode="after")
    def _check(self) -> "MergeRecipe":
        spec = registry.get(self.merge_method)
        if spec.needs_base and self.base_model:
            # mergekit lists the base among the models too (e.g. slerp); it is the base, not an input.
            base = resolved_ref(self.base_model)
            self.models = [e for e in self.models if resolved_ref(e.model) != base]
        if not self.models:
            raise ValueError("a recipe needs at least one model under 'models'")
        if spec.needs_base and not self.base_model:
            raise ValueError(
                f"{spec.name} works on task vectors and needs base_model: set base_model to the checkpoint the experts were fine-tuned from"
            )
        if len(self.models) < spec.min_models or (spec.max_models and len(self.models) > spec.max_models):
            raise ValueError(
                f"{spec.name} takes {spec.min_models}..{spec.max_models or 'any'} models (besides the base); got {len(self.models)}"
            )
        names = {p.name for p in spec.params}
        for key in self.parameters:
            if key not in names:
                close = difflib.get_close_matches(key, sorted(names), n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                raise ValueError(f"{spec.name} has no parameter {key!r}; {hint}it has {sorted(names)}")
        for entry in self.models:
            for key in entry.parameters:
                if key not in names or not spec.param(key).per_model:
                    raise ValueError(
                        f"{entry.model}: {key!r} is not a per-model parameter of {spec.name}; per-model: {[p.name for p in spec.per_model_params]}"
                    )
        self.resolved_params()
        return self

    @property
    def torch_dtype(self) -> torch.dtype:
        """The output dtype as a torch dtype."""
        return DTYPES[self.dtype]

    def resolved_params(self) -> dict:
        """Every param of the method with its value: per-model ones as (N,) float32 tensors.

        Order of precedence: the model's own parameters, then the top-level ones, then the spec default.
        Raises ValueError naming the model and param when a value is out of range or of the wrong type.
        """
        spec = registry.get(self.merge_method)
        values: dict = {}
        for p in spec.params:
            if p.per_model:
                per = [
                    p.check(e.parameters.get(p.name, self.parameters.get(p.name, p.default)), e.model)
                    for e in self.models
                ]
                values[p.name] = torch.tensor(per, dtype=torch.float32)
            else:
                values[p.name] = p.check(self.parameters.get(p.name, p.default), "parameters")
        return values

    def model_paths(self) -> list[Path]:
        """The models' names as paths, in recipe order (the base not included)."""
        return [Path(e.model) for e in self.models]

    def to_yaml(self) -> str:
        """mergekit-style YAML; defaults that equal the spec's are kept so the file is self-describing.

        Choices are written as their plain string values.
        """
        return yaml.safe_dump(_plain(self.model_dump(exclude_none=True)), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str) -> "MergeRecipe":
        """Parse and validate YAML text; raises ValueError (pydantic ValidationError) on bad input."""
        return cls.model_validate(yaml.safe_load(text))

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
