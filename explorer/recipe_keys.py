"""The top-level keys of a mergekit recipe: those we read, mergekit's spellings, and the refusals.

Each refusal names the key and what to do (README "Recipe keys" lists them).

``mergekit_keys`` runs on the raw YAML mapping before the schema (``explorer.recipe.MergeRecipe``) sees
it, so a recipe with a key we cannot honour is refused before anything is read or written.
"""

from __future__ import annotations

import difflib
from typing import Any, Optional

from explorer.choices import TokenizerSource
from explorer.io.formats.refs import resolved_ref

MERGEKIT_ONLY = ("int8_mask",)
KEYS = (
    "merge_method",
    "base_model",
    "models",
    "slices",
    "parameters",
    "dtype",
    "out_dtype",
    "tokenizer_source",
    "tokenizer",
    "config_source",
    "chat_template",
    "seed",
    "out_of_range",
)
# mergekit keys this project cannot honour, and what the user is told (README "Recipe keys").
UNSUPPORTED = {
    "modules": "per-module merges (multimodal models) are not supported; merge the language model with "
    "'models' or 'slices'",
    "chat_template: NAME": "named templates (chatml, llama3, mistral, alpaca, exaone) are files that come with "
    "mergekit; give the template's Jinja text, or auto",
    "tokenizer.tokens": "per-token embedding sources are not supported; remove 'tokens' (with source: union the "
    "embeddings of added tokens are aligned by token)",
    "tokenizer.pad_to_multiple_of": "padding the vocabulary is not supported; remove the key",
    "tokenizer_source: MODEL": "a tokenizer taken from one named model is not supported; use base or union",
    "slices[].base_model": "a base model per slice is not supported; set base_model once at the top level",
    "slices[].residual_weight": "residual_weight is not supported; remove it",
    "models and slices": "give either 'models' or 'slices', not both (as mergekit requires)",
}


def _refused(key: str, where: str = "") -> ValueError:
    return ValueError(f"{where or key}: {UNSUPPORTED[key]}")


def mergekit_keys(data: Any) -> Any:
    """``data`` (a recipe's YAML mapping) with mergekit's spellings read; ValueError naming a refused key.

    Drops ``int8_mask`` (a memory option with no effect on the math), reads ``tokenizer: {source}`` as
    ``tokenizer_source``, drops a slice's ``base_model`` equal to the top-level one; refuses the keys
    of ``UNSUPPORTED`` and unknown keys (suggesting the closest known one).
    """
    if not isinstance(data, dict):
        return data
    data = dict(data)
    for key in data:
        if key in UNSUPPORTED:
            raise _refused(key)
        if key not in KEYS:
            close = difflib.get_close_matches(str(key), KEYS, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ValueError(f"unknown recipe key {key!r}; {hint}a recipe has {list(KEYS)}")
    if data.get("models") and data.get("slices"):
        raise _refused("models and slices")
    if isinstance(data.get("parameters"), dict):
        data["parameters"] = {k: v for k, v in data["parameters"].items() if k not in MERGEKIT_ONLY}
    if "tokenizer" in data:
        data = _tokenizer_block(data)
    source = data.get("tokenizer_source")
    if _names_a_model(source):
        raise ValueError(f"tokenizer_source: {source!r}: {UNSUPPORTED['tokenizer_source: MODEL']}")
    if isinstance(data.get("slices"), list):
        data["slices"] = [_slice_keys(s, i, data.get("base_model")) for i, s in enumerate(data["slices"])]
    return data


def _names_a_model(source: Any) -> bool:
    """True when a ``tokenizer_source`` value names a model, not base or union (nor a typo of them)."""
    values = list(TokenizerSource)
    return (
        isinstance(source, str) and source not in values and not difflib.get_close_matches(source, values, cutoff=0.5)
    )


def _tokenizer_block(data: dict) -> dict:
    """mergekit's ``tokenizer: {source: ...}`` block as ``tokenizer_source``; refuses what it cannot honour."""
    block = data.pop("tokenizer") or {}
    if not isinstance(block, dict):
        raise ValueError(f"tokenizer: give a mapping such as {{source: union}}, got {block!r}")
    if "tokenizer_source" in data:
        raise ValueError("tokenizer and tokenizer_source: give one of them, not both (as mergekit requires)")
    for key in block:
        if f"tokenizer.{key}" in UNSUPPORTED:
            raise _refused(f"tokenizer.{key}")
        if key != "source":
            raise ValueError(f"tokenizer.{key}: unknown key; the tokenizer block takes source (base or union)")
    if "source" in block:
        data["tokenizer_source"] = block["source"]
    return data


def _slice_keys(piece: Any, index: int, base: Optional[str]) -> Any:
    """A slice's keys checked: ``residual_weight`` refused, a ``base_model`` other than the top-level one refused."""
    if not isinstance(piece, dict):
        return piece
    if "residual_weight" in piece:
        raise _refused("slices[].residual_weight", f"slices[{index}].residual_weight")
    if "base_model" in piece:
        if not base or resolved_ref(str(piece["base_model"])) != resolved_ref(str(base)):
            raise _refused("slices[].base_model", f"slices[{index}].base_model")
        piece = {k: v for k, v in piece.items() if k != "base_model"}
    return piece
