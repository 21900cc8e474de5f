"""What every checkpoint format provides: tensor names, shapes, dtypes, lazy reads, config, tokenizer.

A format (safetensors folder, .bin pickles, GGUF file, LoRA adapter, ...) is a ``Checkpoint`` subclass
that fills ``files`` (tensor name -> file that holds it) and implements ``shape``, ``dtype`` and
``get``. Everything above this layer (compatibility checks, vocabulary alignment, the executor) sees
only this interface. Every refusal is a ``CheckpointError`` whose message names the model, the file or
tensor where there is one, and what to do.
"""

from __future__ import annotations

import json
import shutil
from functools import cached_property
from pathlib import Path
from typing import Optional

import torch
import transformers
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

TIED_NAMES = ("lm_head.weight",)
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "vocab.txt", "added_tokens.json", "chat_template.jinja",
)
ASSET_FILES = TOKENIZER_FILES + ("generation_config.json",)

# safetensors dtype names <-> torch dtypes (the names ``Checkpoint.dtype`` reports for every format).
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or merged; the message says which file/tensor and the fix."""


def read_json(file: Path, what: str = "JSON file") -> dict:
    """Parse ``file``; CheckpointError naming it when it is not valid JSON."""
    try:
        return json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file}: unreadable {what} ({e}); re-download or re-save it") from None


def has_tokenizer_files(folder: Optional[Path]) -> bool:
    return folder is not None and any((folder / f).is_file() for f in TOKENIZER_FILES)


def empty_model(config: PretrainedConfig, architecture: str, where: Path) -> torch.nn.Module:
    """An ``architecture`` model on the meta device (no memory, no weights): its module tree and shapes."""
    cls = getattr(transformers, architecture, None)
    if cls is None:
        raise CheckpointError(f"{where}: architecture {architecture} is not in transformers {transformers.__version__}; custom-code models are not run")
    with torch.device("meta"):
        return cls(config)


class Checkpoint:
    """One model's tensors, read lazily by name, with its config (a config.json dict) and tokenizer.

    Attributes:
        path: what the user named: a folder, a .gguf file, or an adapter folder.
        config: the model's config.json as a dict (for GGUF and adapters: the equivalent dict).
        files: tensor name -> file holding it, in the checkpoint's order.
        format: short format name shown in reports ("safetensors", "bin", "gguf", "lora", ...).
    """

    format = "checkpoint"

    def __init__(self, path: Path, config: dict, files: dict[str, Path]):
        self.path, self.config, self.files = path, config, files

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, {len(self.files)} tensors)"

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def architecture(self) -> str:
        archs = self.config.get("architectures") or [self.config.get("model_type", "?")]
        return archs[0]

    @property
    def num_layers(self) -> Optional[int]:
        return self.config.get("num_hidden_layers")

    @cached_property
    def hf_config(self) -> PretrainedConfig:
        """``self.config`` as a transformers config object (class defaults filled in)."""
        try:
            return AutoConfig.for_model(**self.config)
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{self.path}: config.json is not a model config transformers knows ({e}); custom-code models are not run") from None

    @property
    def tied_embeddings(self) -> bool:
        """True when the output embedding is the input embedding (config says so, or lm_head is absent)."""
        return bool(self.hf_config.tie_word_embeddings) or not any(n in self.files for n in TIED_NAMES)

    @property
    def sources(self) -> list[Path]:
        """Every file or folder this checkpoint reads from (never written to, never an output)."""
        return [self.path]

    @property
    def spec(self) -> str:
        """How a recipe names this checkpoint so that ``open_checkpoint(spec)`` opens it again."""
        return str(self.path)

    @property
    def assets_dir(self) -> Optional[Path]:
        """Folder holding this model's tokenizer and generation config files, if any."""
        return self.path if self.path.is_dir() else None

    def names(self) -> list[str]:
        """Tensor names in file order (stable across calls)."""
        return list(self.files)

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of tensor ``name`` without reading its data."""
        raise NotImplementedError

    def dtype(self, name: str) -> str:
        """dtype name of ``name`` as ``get`` returns it (``F32``, ``F16``, ``BF16``, ...), without reading it."""
        raise NotImplementedError

    def get(self, name: str) -> torch.Tensor:
        """Tensor ``name`` (its stored dtype), read from disk now; CheckpointError if there is none."""
        raise NotImplementedError

    def close(self) -> None:
        """Release open files; reading again reopens them."""

    def _missing(self, name: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: no tensor {name!r}; the checkpoint has {len(self.files)} tensors")

    def has_tokenizer(self) -> bool:
        return has_tokenizer_files(self.assets_dir)

    def tokenizer(self) -> Optional[PreTrainedTokenizerBase]:
        """A freshly loaded tokenizer of this model, or None when it ships none."""
        if not self.has_tokenizer():
            return None
        try:
            return AutoTokenizer.from_pretrained(self.assets_dir)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{self.assets_dir}: the tokenizer files do not load ({e}); re-save the tokenizer") from None

    def save_assets(self, dst: Path) -> None:
        """Copy this model's tokenizer and generation config files into ``dst`` (a new output folder)."""
        if self.assets_dir is None:
            return
        for name in ASSET_FILES:
            if (self.assets_dir / name).is_file():
                shutil.copyfile(self.assets_dir / name, dst / name)
