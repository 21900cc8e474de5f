"""Which config fields differ between models, which of them change the computation, and where vocab_size lives.

The rule: every config field changes the computation (rope settings, context length, norm eps,
activation, sliding window, biases, head_dim, ...) except those in ``NEUTRAL`` (names, versions, dtype,
token ids, dropout and initialisation, output flags: they do not change what the forward pass computes
at inference) and ``ALIGNED`` (vocab_size and tie_word_embeddings: vocabulary alignment reconciles
them, ``explorer.io.vocab``). Configs are compared as transformers reads them (``AutoConfig``, class
defaults filled in, so a field written out and the same value left to its default agree, and
transformers 5's ``rope_parameters`` holds rope_theta/rope_scaling), flattened into dotted paths through
every nested dict: sub-configs (``text_config.rope_parameters.rope_theta``) and dict values alike.
Floats agree within a relative 1e-6 (a GGUF stores eps as float32). A field that changes the
computation refuses the merge unless the recipe's ``config_source`` names the config to keep
(``explorer.io.checkpoint.check_config``).

Vocabulary: a composite model (vision-language, ...) keeps vocab_size in its language sub-config
(``TEXT_CONFIGS``: text_config, language_config, llm_config, decoder, ...), not at the top level;
``with_vocab_size`` sets it wherever the config holds it.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Optional

# Fields that do not change what the model computes at inference (documented in README "Inputs").
NEUTRAL = frozenset(
    {
        "_name_or_path",
        "name_or_path",
        "transformers_version",
        "dtype",
        "torch_dtype",
        "architectures",  # checked on its own (explorer.io.checkpoint.check_config)
        "use_cache",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "sep_token_id",
        "quantization_config",  # quantized inputs are refused by their integer tensors
        "id2label",
        "label2id",
        "problem_type",
        "finetuning_task",
        "task_specific_params",
        "tokenizer_class",
        "prefix",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
        "torchscript",
        "chunk_size_feed_forward",
        "_attn_implementation",
        "attn_implementation",
        "_attn_implementation_autoset",
        "initializer_range",
        "initializer_factor",
        "attention_dropout",
        "hidden_dropout",
        "dropout",
        "hidden_dropout_prob",
        "attention_probs_dropout_prob",
        "resid_pdrop",
        "embd_pdrop",
        "attn_pdrop",
        "summary_first_dropout",
    }
)
ALIGNED = frozenset({"vocab_size", "tie_word_embeddings"})  # reconciled by explorer.io.vocab
# Sub-configs that hold a composite model's language model (and so its vocab_size).
TEXT_CONFIGS = ("text_config", "language_config", "llm_config", "text_model", "language_model", "decoder")


@dataclass(frozen=True)
class ConfigDifference:
    """One field whose value differs between a reference config and another model's."""

    field: str  # dotted path, e.g. "text_config.rope_parameters.rope_theta"
    reference: Any  # the reference's value (None where it has no such field)
    other: Any
    changes_maths: bool  # False for NEUTRAL and ALIGNED fields

    def describe(self, reference_name: str = "reference", other_name: str = "other") -> str:
        """``field: other_name has X, reference_name has Y``."""
        return f"{self.field}: {other_name} has {self.other!r}, {reference_name} has {self.reference!r}"


@dataclass(frozen=True)
class ConfigChoice:
    """Whose config the output takes (recipe ``config_source``) and the fields the inputs' configs differ in."""

    source: str  # "base", or the chosen model's reference
    path: str  # the folder the output's config.json comes from
    differences: tuple[tuple[str, ConfigDifference], ...]  # (model path, difference from the reference)


def changes_maths(field: str) -> bool:
    """False when any part of the dotted ``field`` is a NEUTRAL field or its last part an ALIGNED one."""
    parts = field.split(".")
    return not (any(p in NEUTRAL for p in parts) or parts[-1] in ALIGNED)


def config_differences(reference: dict, other: dict) -> list[ConfigDifference]:
    """Every field (dotted path, nested dicts flattened) whose value differs between the two configs, sorted.

    Both are read as transformers reads them (``comparable``); a field one lacks is None there. Equal
    dicts have no differences, so fine-tunes saved with their base's config.json are compared without
    importing transformers (about 1.5 s of a fresh process).
    """
    if reference == other:
        return []
    ref, oth = _flatten(comparable(reference)), _flatten(comparable(other))
    fields = sorted(set(ref) | set(oth))
    return [
        ConfigDifference(f, ref.get(f), oth.get(f), changes_maths(f))
        for f in fields
        if not _same(ref.get(f), oth.get(f))
    ]


def comparable(config: dict) -> dict:
    """``config`` with transformers' defaults filled in (``AutoConfig.for_model(...).to_dict()``); as is when it cannot be read."""
    try:
        from transformers import AutoConfig

        return AutoConfig.for_model(**copy.deepcopy(config)).to_dict()
    except Exception:  # noqa: BLE001 - a config transformers cannot read is compared as written
        return config


def _flatten(config: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in config.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value and key not in NEUTRAL:
            out.update(_flatten(value, f"{path}."))
        else:
            out[path] = value
    return out


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-6)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def vocab_places(config: dict) -> list[tuple[str, ...]]:
    """Paths of the dicts in ``config`` that hold vocab_size: () for the top level, ("text_config",), ...

    The top level, and each language sub-config (``TEXT_CONFIGS``) that has a vocab_size.
    """
    places = [()] if "vocab_size" in config else []
    return places + [(k,) for k in TEXT_CONFIGS if isinstance(config.get(k), dict) and "vocab_size" in config[k]]


def vocab_size_of(config: dict) -> Optional[int]:
    """The vocabulary size ``config`` declares: its top-level vocab_size, else its language sub-config's."""
    places = vocab_places(config)
    return _at(config, places[0]).get("vocab_size") if places else None


def is_composite(config: dict) -> bool:
    """True when ``config`` has a language sub-config (``TEXT_CONFIGS``)."""
    return any(isinstance(config.get(k), dict) for k in TEXT_CONFIGS)


def with_vocab_size(config: dict, rows: int) -> dict:
    """A copy of ``config`` with vocab_size set to ``rows`` wherever it holds one (``vocab_places``).

    A config that holds none gets a top-level vocab_size unless it is composite, where the place is
    unknown: then ``config`` is returned with vocab_size unset (the caller checks, ``vocab_size_of``).
    """
    return _set_everywhere(config, "vocab_size", rows, vocab_places(config) or ([] if is_composite(config) else [()]))


def with_untied(config: dict) -> dict:
    """A copy of ``config`` with tie_word_embeddings False at the top and in each language sub-config that sets it."""
    places = [()] + [
        (k,) for k in TEXT_CONFIGS if isinstance(config.get(k), dict) and "tie_word_embeddings" in config[k]
    ]
    return _set_everywhere(config, "tie_word_embeddings", False, places)


def _set_everywhere(config: dict, key: str, value: Any, places: list[tuple[str, ...]]) -> dict:
    out = dict(config)
    for place in places:
        if place:
            out[place[0]] = dict(out[place[0]])
        _at(out, place)[key] = value
    return out


def _at(config: dict, place: tuple[str, ...]) -> dict:
    for key in place:
        config = config[key]
    return config
