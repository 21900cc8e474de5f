"""The names transformers gives a checkpoint's tensors when it loads them, and the stored tensors it ignores.

Checkpoints of one model are not always stored under the names of its modules: a GPT-2 saved from
``GPT2Model`` lacks ``GPT2LMHeadModel``'s ``transformer.`` prefix (``base_model_prefix``), and a
vision-language model saved by transformers 4 stores ``language_model.model.*`` where transformers 5
has ``model.language_model.*``. ``from_pretrained`` renames such keys on load, so two such checkpoints
are the same model. ``loaded_names`` renames them the same way, with transformers' own functions: the
model class's conversion mapping (``conversion_mapping.get_model_conversion_mapping``: its renamings,
the legacy ones, sub-model scopes) and the prefix added or removed (``core_model_loading.rename_source_key``
against the state dict of the model built on the meta device). A key that only a ``WeightConverter``
maps (tensors fused or split, e.g. MoE experts) keeps its stored name: that is a change of tensors, not
of names, and two checkpoints in different such layouts stay refused.

Ignored: stored tensors the model has no place for and transformers drops on load without complaint:
the class's ``_keys_to_ignore_on_load_unexpected`` and the rotary ``inv_freq`` / ``position_ids``
buffers older versions saved (transformers' own ``_adjust_missing_and_unexpected_keys``), non-persistent
buffers, and tensors stored under a module the model has in a slot that module no longer declares (an
attribute an earlier version of the class kept, such as GPT-2's ``attn.masked_bias``). They are neither
merged nor written. Not for quantized checkpoints: their extra tensors (scales) belong to the quantizer.

``with_loaded_names(checkpoint)`` is the checkpoint under those names (itself when nothing changes);
``explorer.io.checkpoint.open_checkpoint`` applies it to every model it opens, so everything above sees
the names the model's own ``state_dict`` has, and a merge is written under them (it loads with no
missing or unexpected keys).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Callable, Optional

import torch
from typing_extensions import override

from explorer.io.formats.base import Checkpoint, CheckpointView, empty_model
from explorer.io.model_facts import remembered

if TYPE_CHECKING:  # transformers is imported where a model class is built: remembered names need none of it
    from transformers.core_model_loading import WeightConverter, WeightRenaming

log = logging.getLogger(__name__)
UNSHAPING = ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "use_cache")


@dataclass(frozen=True)
class ModelNames:
    """What one model class (with its config) says about tensor names, read off a meta-device model."""

    model: torch.nn.Module  # on the meta device
    keys: dict[str, torch.Tensor]  # its state_dict: the names it loads (meta tensors)
    renamings: list[WeightRenaming]
    converters: list[WeightConverter]

    def loaded_name(self, key: str) -> str:
        """The name ``from_pretrained`` loads stored tensor ``key`` under (``key`` when only a converter maps it)."""
        from transformers.core_model_loading import rename_source_key

        prefix = self.model.base_model_prefix or None
        name, converter = rename_source_key(key, self.renamings, self.converters, prefix, self.keys)
        if converter is not None or (name not in self.keys and key in self.keys):
            name, _ = rename_source_key(key, [], [], prefix, self.keys)  # as transformers' own fallback
        return name

    def ignored(self, names: list[str]) -> set[str]:
        """Of the loaded ``names``, the stored tensors the model has no place for and that transformers drops on load."""
        unexpected = {n for n in names if n not in self.keys}
        info = SimpleNamespace(missing_keys=set(), unexpected_keys=set(unexpected))
        getattr(self.model, "_adjust_missing_and_unexpected_keys", lambda info: None)(info)
        ignored = unexpected - info.unexpected_keys
        if getattr(self.model.config, "quantization_config", None):
            return ignored
        buffers = {n for n, _ in self.model.named_buffers()}
        return ignored | {n for n in unexpected - ignored if n in buffers or self._undeclared_slot(n)}

    def _undeclared_slot(self, name: str) -> bool:
        """True when ``name``'s module exists in the model but declares no parameter or buffer of that name."""
        parent, _, leaf = name.rpartition(".")
        try:
            module = self.model.get_submodule(parent)
        except AttributeError:
            return False
        return leaf not in module._parameters and leaf not in module._buffers and leaf not in module._modules


@lru_cache(maxsize=16)
def _model_names(architecture: str, config_json: str) -> Optional[ModelNames]:
    """``ModelNames`` of the class ``architecture`` with this config; None when transformers cannot build it."""
    from transformers import AutoConfig
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming

    try:
        config = AutoConfig.for_model(**json.loads(config_json))
        model = empty_model(config, architecture, Path(architecture))
        mapping = get_model_conversion_mapping(model)
    except Exception as e:  # any class transformers cannot build from this config: names stay as stored, as before
        log.debug("%s: tensor names kept as stored (%s)", architecture, e)
        return None
    return ModelNames(
        model,
        model.state_dict(),
        [t for t in mapping if isinstance(t, WeightRenaming)],
        [t for t in mapping if isinstance(t, WeightConverter)],
    )


def _shaping_config(checkpoint: Checkpoint) -> str:
    """``checkpoint``'s config as sorted JSON, without the entries that do not shape the model (``UNSHAPING``)."""
    config = {k: v for k, v in checkpoint.config.items() if k not in UNSHAPING}
    return json.dumps(config, sort_keys=True, default=str)


def model_names(checkpoint: Checkpoint) -> Optional[ModelNames]:
    """``ModelNames`` of ``checkpoint``'s architecture and config; None for a class transformers does not have.

    Built once per architecture and config (a 7B Llama takes about 2 s on the meta device); config
    entries that do not shape the model (``UNSHAPING``) are left out of that key, so fine-tunes of one base share it.
    """
    return _model_names(checkpoint.architecture, _shaping_config(checkpoint))


def name_mapper(checkpoint: Checkpoint) -> Callable[[str], str]:
    """A function: stored tensor name -> the name the model of ``checkpoint``'s class loads it under.

    For names a model's adapter uses (``explorer.io.formats.lora``): stored as the adapter's base was.
    """
    names = model_names(checkpoint)
    return names.loaded_name if names is not None else (lambda key: key)


def with_loaded_names(checkpoint: Checkpoint) -> Checkpoint:
    """``checkpoint`` under the names transformers loads its tensors as, without those it ignores.

    ``checkpoint`` itself when that changes nothing, when transformers has no class for it, or when two
    stored names would load as one (then the checkpoint is left for the compatibility check to judge).
    The decision is kept on disk (``renaming``), so the model class is built once per kind of checkpoint.
    """
    renamed = renaming(checkpoint)
    if renamed is None:
        return checkpoint
    kept, dropped = renamed
    if dropped:
        log.info(
            "%s: %d tensor(s) transformers ignores on load are not merged: %s", checkpoint.path, len(dropped), dropped
        )
    return LoadedNames(checkpoint, kept, tuple(dropped))


def renaming(checkpoint: Checkpoint) -> Optional[tuple[dict[str, str], list[str]]]:
    """(kept: stored name -> loaded name, dropped stored names) of ``with_loaded_names``; None: names stay as stored.

    Worked out once per architecture, shaping config and stored names, then read from disk
    (``model_facts.remembered``): the model class is built on the meta device only the first time.
    """
    config, stored = _shaping_config(checkpoint), checkpoint.names()

    def compute() -> Optional[list]:
        renamed = _renaming(_model_names(checkpoint.architecture, config), stored)
        return None if renamed is None else list(renamed)

    record = remembered("renaming", [checkpoint.architecture, config, sorted(stored)], compute)
    return None if record is None else (record[0], record[1])


def _renaming(names: Optional[ModelNames], stored: list[str]) -> Optional[tuple[dict[str, str], list[str]]]:
    """``renaming`` worked out from the model class's ``names`` (None: transformers has no class for it)."""
    if names is None:
        return None
    loaded = {key: names.loaded_name(key) for key in stored}
    ignored = names.ignored(list(loaded.values()))
    kept = {key: name for key, name in loaded.items() if name not in ignored}
    if len(set(kept.values())) < len(kept) or (not ignored and all(k == n for k, n in kept.items())):
        return None
    return kept, [key for key, name in loaded.items() if name in ignored]


def ignored_tensors(checkpoint: Checkpoint) -> tuple[str, ...]:
    """Stored names of ``checkpoint``'s tensors that are ignored (``LoadedNames.ignored``), through views of it."""
    while checkpoint is not None:
        if isinstance(checkpoint, LoadedNames):
            return checkpoint.ignored
        checkpoint = getattr(checkpoint, "inner", None) or getattr(checkpoint, "base", None)
    return ()


class LoadedNames(CheckpointView):
    """``inner`` under loaded names: ``kept`` maps its stored names to them; ``ignored`` stored names are left out."""

    def __init__(self, inner: Checkpoint, kept: dict[str, str], ignored: tuple[str, ...]):
        self.ignored = ignored
        self._stored = {name: key for key, name in kept.items()}
        super().__init__(inner, inner.config, {name: inner.files[key] for key, name in kept.items()})

    def __getattr__(self, attr: str):
        if attr == "inner":
            raise AttributeError(attr)
        return getattr(self.inner, attr)  # a format's own attributes (adapter_config, ...)

    def _key(self, name: str) -> str:
        if name not in self._stored:
            raise self._missing(name)
        return self._stored[name]

    @override
    def shape(self, name: str) -> tuple[int, ...]:
        return self.inner.shape(self._key(name))

    @override
    def dtype(self, name: str) -> str:
        return self.inner.dtype(self._key(name))

    @override
    def get(self, name: str) -> torch.Tensor:
        return self.inner.get(self._key(name))

    @override
    def read_into(self, name: str, out: torch.Tensor) -> None:
        self.inner.read_into(self._key(name), out)
