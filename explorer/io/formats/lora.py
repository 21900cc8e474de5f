"""PEFT LoRA adapters folded into their base: a full-checkpoint view with W' = W + scale * B A.

An adapter folder holds adapter_config.json and adapter_model.safetensors (or adapter_model.bin). For
an adapted linear module X the file has X.lora_A.weight (r, in) and X.lora_B.weight (out, r); the view
returns X.weight + scale * B @ A, transposed for fan_in_fan_out layers (GPT-2's Conv1D), with
scale = lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora, and per-module r and alpha taken from
rank_pattern / alpha_pattern matched the way PEFT matches them. Embedding adapters
(lora_embedding_A (r, V), lora_embedding_B (H, r)) add scale * (B @ A)^T. Whole tensors the adapter
saves (modules_to_save, a resized embedding saved as X.base_layer.weight) replace the base's. Folded
tensors are float32. Refused, with the fix: DoRA, LoRA biases, trainable-token adapters, target_parameters.

The base is given explicitly (recipe syntax ``BASE+ADAPTER``, as mergekit writes it) or found from
``base_model_name_or_path``: as a path, relative to the adapter's folder, then in the Hugging Face cache.
An adapter saved into its own base's folder (base_model_name_or_path naming that same folder) is
refused rather than opened as base + adapter: the folder would then name two models (the plain base,
as other adapters and recipes mean it, and the folded one), so the fix is to move the adapter files
into a folder of their own. Each module's rank in adapter_config.json (``r``, or its ``rank_pattern``
entry) must be the rank of its A and B tensors, as PEFT requires when it loads the adapter.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import torch
from typing_extensions import override

from explorer.io.config_compat import with_vocab_size
from explorer.io.formats.base import (
    TIED_NAMES,
    Checkpoint,
    CheckpointError,
    embedding_names,
    has_tokenizer_files,
    read_json,
)
from explorer.io.formats.bin import PickleFile
from explorer.io.formats.hf_cache import hub_snapshot
from explorer.io.formats.refs import ADAPTER_CONFIG
from explorer.io.formats.safetensors_io import SafetensorsFile
from explorer.io.keymap import name_mapper

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")
PREFIX = "base_model.model."
LORA_KEYS = {
    ".lora_A.weight": ("A", False),
    ".lora_B.weight": ("B", False),
    ".lora_embedding_A": ("A", True),
    ".lora_embedding_B": ("B", True),
}
UNSUPPORTED = {
    "use_dora": "DoRA",
    "lora_bias": "LoRA biases",
    "trainable_token_indices": "trainable tokens",
    "target_parameters": "target_parameters",
}


def adapter_base(path: Path) -> Path:
    """The local folder of the adapter's base model, from ``base_model_name_or_path``; CheckpointError if absent."""
    ref = read_json(path / ADAPTER_CONFIG, ADAPTER_CONFIG).get("base_model_name_or_path")
    if not ref:
        raise CheckpointError(f"{path}: adapter_config.json names no base model; give it as BASE+ADAPTER in the recipe")
    for candidate in (Path(ref).expanduser(), path / ref, path.parent / ref):
        if candidate.exists():
            return _not_itself(path, candidate)
    snapshot = hub_snapshot(ref)
    if snapshot is None:
        raise CheckpointError(
            f"{path}: base model {ref!r} of this adapter is neither a local folder nor in the Hugging Face cache; give it as BASE+ADAPTER in the recipe"
        )
    return _not_itself(path, snapshot)


def _not_itself(path: Path, base: Path) -> Path:
    """``base``, unless it is the adapter folder ``path`` itself (an adapter saved into its base's folder)."""
    if base.resolve() == path.resolve():
        raise CheckpointError(
            f"{path}: holds a full model and a LoRA adapter whose base_model_name_or_path is this same folder; move "
            f"{ADAPTER_CONFIG} and adapter_model.* into a folder of their own and name it as BASE+ADAPTER (or with its base path)"
        )
    return base


def read_adapter_config(path: Path) -> dict:
    """adapter_config.json of the adapter folder ``path``; CheckpointError (with the fix) if it is not plain LoRA."""
    config = read_json(path / ADAPTER_CONFIG, ADAPTER_CONFIG)
    for key, what in UNSUPPORTED.items():
        if config.get(key):
            raise CheckpointError(
                f"{path}: {what} adapters are not folded here; merge it with PEFT (merge_and_unload(), then save_pretrained) and use that folder"
            )
    if config.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(
            f"{path}: a {config['peft_type']} adapter, not LoRA; merge it with PEFT (merge_and_unload) first"
        )
    return config


def open_adapter(path: Path) -> SafetensorsFile | PickleFile:
    """The weights file of the adapter folder ``path`` (safetensors, else a weights-only .bin)."""
    for name in ADAPTER_FILES:
        if (path / name).is_file():
            return SafetensorsFile(path / name) if name.endswith(".safetensors") else PickleFile(path / name)
    raise CheckpointError(f"{path}: adapter_config.json but no {' or '.join(ADAPTER_FILES)}; copy the adapter weights")


def index_adapter(path: Path, adapter: SafetensorsFile | PickleFile) -> tuple[dict[str, dict], dict[str, str]]:
    """Sort the adapter's keys: (lora, whole).

    lora: target weight name -> {"module": str, "embedding": bool, "A": key, "B": key}. whole: base
    tensor name -> adapter key of a tensor that replaces it (modules_to_save, a resized embedding).
    CheckpointError for a "lora_" tensor that is not A or B, or a module with only one of them.
    """
    lora: dict[str, dict] = {}
    whole: dict[str, str] = {}
    for key in adapter.keys():
        name = key.removeprefix(PREFIX)
        for suffix, (part, embedding) in LORA_KEYS.items():
            if name.endswith(suffix):
                module = name[: -len(suffix)]
                lora.setdefault(module + ".weight", {"module": module, "embedding": embedding})[part] = key
                break
        else:
            if "lora_" in name:
                raise CheckpointError(
                    f"{path}: adapter tensor {key!r} is not a plain LoRA A/B matrix (DoRA or LoRA bias?); merge it with PEFT (merge_and_unload) first"
                )
            whole[name.replace(".base_layer.", ".")] = key
    for entry in lora.values():
        if "A" not in entry or "B" not in entry:
            raise CheckpointError(
                f"{path}: adapter has only one of lora_A/lora_B for {entry['module']!r}; the adapter file is incomplete"
            )
    return lora, whole


def _pattern_key(patterns: dict, module: str) -> str:
    """The key of ``patterns`` (rank_pattern, alpha_pattern) that PEFT matches ``module`` with.

    PEFT's own ``get_pattern_key``, imported only when there are patterns: importing PEFT takes 2 s,
    which every merge from the command line would otherwise pay.
    """
    if not patterns:
        return module
    from peft.utils.other import get_pattern_key

    return get_pattern_key(list(patterns), module)


def lora_rank(config: dict, module: str) -> int:
    """The rank adapter_config.json gives ``module``: its rank_pattern entry when one matches, else r."""
    ranks = config.get("rank_pattern") or {}
    return ranks.get(_pattern_key(ranks, module), config["r"])


def lora_scale(config: dict, module: str) -> float:
    """lora_alpha / r (or / sqrt(r) with use_rslora), per module when rank_pattern/alpha_pattern match it."""
    alphas = config.get("alpha_pattern") or {}
    r = lora_rank(config, module)
    alpha = alphas.get(_pattern_key(alphas, module), config["lora_alpha"])
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def check_ranks(path: Path, adapter: SafetensorsFile | PickleFile, lora: dict[str, dict], config: dict) -> None:
    """CheckpointError when a module's A (r, in) or B (out, r) has another rank than adapter_config.json gives it.

    The scale alpha / r would be wrong for it; PEFT refuses to load such an adapter.
    """
    for entry in lora.values():
        r = lora_rank(config, entry["module"])
        a, b = adapter.shape(entry["A"]), adapter.shape(entry["B"])
        if a[0] != r or b[-1] != r:
            raise CheckpointError(
                f"{path}: LoRA of {entry['module']!r} has rank {r} in {ADAPTER_CONFIG} (r / rank_pattern) but its tensors have rank "
                f"{a[0]} (lora_A {list(a)}, lora_B {list(b)}); fix r / rank_pattern in {ADAPTER_CONFIG} or re-save the adapter with PEFT"
            )


def fold_delta(adapter: SafetensorsFile | PickleFile, entry: dict, config: dict) -> torch.Tensor:
    """scale * B @ A for one ``index_adapter`` entry, float32, in the weight's layout.

    (out, r) @ (r, in) -> (out, in); transposed for embeddings and fan_in_fan_out layers.
    """
    a, b = adapter.read(entry["A"]).float(), adapter.read(entry["B"]).float()
    delta = b @ a
    if entry["embedding"] or config.get("fan_in_fan_out"):
        delta = delta.T
    return delta.mul_(lora_scale(config, entry["module"]))


class LoraCheckpoint(Checkpoint):
    """``base`` with the adapter at ``path`` folded in; reads the base tensor and the adapter's A and B per get."""

    format = "lora"

    def __init__(self, path: Path, base: Checkpoint):
        self.base, self.adapter_config = base, read_adapter_config(path)
        self._adapter = open_adapter(path)
        lora, whole = index_adapter(path, self._adapter)
        loaded = name_mapper(base)  # the base's names as transformers loads them (the base is opened under them)
        self._lora = {loaded(target): entry for target, entry in lora.items()}
        self._whole = {loaded(name): key for name, key in whole.items()}
        self._fold_tied_output(path, base)
        check_ranks(path, self._adapter, self._lora, self.adapter_config)
        config = dict(base.config)
        files = dict(base.files) | {name: self._adapter.path for name in self._whole if name not in base.files}
        super().__init__(path, config, files)
        if any(n in TIED_NAMES for n in self._whole):
            self.config["tie_word_embeddings"] = False
        embed = embedding_names(base).input
        if embed in self._whole:  # a resized embedding (tokens added during fine-tuning)
            self.config = with_vocab_size(self.config, self.shape(embed)[0])  # in text_config for composite models
        self._check_fits_base()

    def _fold_tied_output(self, path: Path, base: Checkpoint) -> None:
        """A LoRA on a tied base's output embedding (saved with save_embedding_layers=False) adapts the input one.

        The base stores one tensor for both; PEFT's merge_and_unload adds the delta to it and the model
        stays tied, so the delta is folded into the input embedding here.
        """
        names = embedding_names(base)
        if names.output not in self._lora or names.output in base.files or not base.tied_embeddings:
            return
        if names.input in self._lora:
            raise CheckpointError(
                f"{path}: adapts both {names.input!r} and {names.output!r}, one tensor in tied base {base.path}; "
                "merge it with PEFT (merge_and_unload(), then save_pretrained) and use that folder"
            )
        self._lora[names.input] = self._lora.pop(names.output)

    def _check_fits_base(self) -> None:
        for target, entry in self._lora.items():
            if target not in self.files:
                raise CheckpointError(
                    f"{self.path}: adapts {target!r}, which base {self.base.path} does not have; give the right base as BASE+ADAPTER"
                )
            out_in = self._delta_shape(entry)
            if self.shape(target) != out_in:
                raise CheckpointError(
                    f"{self.path}: LoRA for {target!r} makes shape {list(out_in)} but base {self.base.path} has {list(self.shape(target))}; "
                    "this adapter was trained on another base model: give the right one as BASE+ADAPTER"
                )

    def _delta_shape(self, entry: dict) -> tuple[int, ...]:
        a, b = self._adapter.shape(entry["A"]), self._adapter.shape(entry["B"])
        shape = (b[0], a[1])
        return shape[::-1] if entry["embedding"] or self.adapter_config.get("fan_in_fan_out") else shape

    @property
    @override
    def sources(self) -> list[Path]:
        return [self.path] + self.base.sources

    @property
    def ref(self) -> str:
        """``BASE+ADAPTER``: the base this adapter was folded into, explicitly (found or given)."""
        return f"{self.base.ref}+{self.path}"

    @property
    def assets_dir(self) -> Optional[Path]:
        """The adapter's own tokenizer files when it has them (added tokens), else the base's."""
        return self.path if has_tokenizer_files(self.path) else self.base.assets_dir

    @override
    def shape(self, name: str) -> tuple[int, ...]:
        if name in self._whole:
            return tuple(self._adapter.shape(self._whole[name]))
        return self.base.shape(name)

    @override
    def dtype(self, name: str) -> str:
        if name in self._lora:
            return "F32"
        return self._adapter.dtype(self._whole[name]) if name in self._whole else self.base.dtype(name)

    def get(self, name: str) -> torch.Tensor:
        """Base tensor ``name`` with the adapter folded in (float32 where adapted)."""
        if name not in self.files:
            raise self._missing(name)
        tensor = self._adapter.read(self._whole[name]) if name in self._whole else self.base.get(name)
        entry = self._lora.get(name)
        if entry is None:
            return tensor
        return tensor.float() + fold_delta(self._adapter, entry, self.adapter_config)

    @override
    def close(self) -> None:
        self.base.close()
