"""What every checkpoint format provides: tensor names, shapes, dtypes, lazy reads, config, tokenizer.

A format (safetensors folder, .bin pickles, GGUF file, LoRA adapter, ...) is a ``Checkpoint`` subclass
that fills ``files`` (tensor name -> file that holds it) and implements ``shape``, ``dtype`` and
``get``. Everything above this layer (compatibility checks, vocabulary alignment, the executor) sees
only this interface. Every refusal is a ``CheckpointError`` whose message names the model, the file or
tensor where there is one, and what to do.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Optional

import torch

from explorer.io.model_facts import remembered

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

TIED_NAMES = ("lm_head.weight",)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "added_tokens.json",
    "chat_template.jinja",
)
# Small JSON tokenizer files that are parsed outside the tokenizer loader too (checked when a model is opened).
TOKENIZER_JSON = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")
# Not copied beside a merge's weights: weights and their indexes, the config (written), files a merge writes
# itself or that describe another model (card, recipe, manifest, prune report, Trainer state, adapter config,
# the training record of a model this project trained: ``explorer.zoo``).
NOT_COPIED = ("config.json", "README.md", "merge_recipe.yaml", "merge_manifest.json", "prune_report.json")
NOT_COPIED += ("trainer_state.json", "adapter_config.json", "zoo_info.json")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx", ".index.json")

# safetensors dtype names <-> torch dtypes (the names ``Checkpoint.dtype`` reports for every format).
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or merged; the message says which file/tensor and the fix."""


def check_finite(checkpoint: Checkpoint, name: str, tensor: torch.Tensor) -> None:
    """Raise CheckpointError naming ``checkpoint`` and tensor ``name`` if ``tensor`` holds NaN or inf.

    ``tensor``: any shape, float. One aminmax pass (NaN propagates into min and max).
    """
    if tensor.numel() and not all(math.isfinite(v.item()) for v in torch.aminmax(tensor)):
        bad = int((~torch.isfinite(tensor)).sum())
        raise CheckpointError(
            f"{checkpoint.path}: tensor {name!r} has {bad} NaN/inf values; this checkpoint is corrupt or diverged; re-export or drop it"
        )


def is_float_dtype(name: str) -> bool:
    """True for a floating dtype name (F8_*, F16, BF16, F32, F64); False for integers, bool and unknown names."""
    return name in DTYPES and DTYPES[name].is_floating_point


def read_json(file: Path, what: str = "JSON file") -> dict:
    """Parse ``file``; CheckpointError naming it when it is not valid JSON or not a JSON object."""
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file}: unreadable {what} ({e}); re-download or re-save it") from None
    if not isinstance(data, dict):
        raise CheckpointError(
            f"{file}: holds a JSON {type(data).__name__} where {what} must be an object {{...}}; re-download or re-save it"
        )
    return data


def check_tokenizer_files(folder: Optional[Path]) -> None:
    """CheckpointError naming the file when one of ``folder``'s small JSON tokenizer files is not a JSON object."""
    if folder is None:
        return
    for name in TOKENIZER_JSON:
        if (folder / name).is_file():
            read_json(folder / name, f"tokenizer file {name}")


def load_tokenizer(folder: Path, gguf_file: Optional[str] = None) -> PreTrainedTokenizerBase:
    """The tokenizer in ``folder`` (or in its ``gguf_file``); any failure becomes a CheckpointError naming it.

    The loader fails in many ways on broken files (JSONDecodeError, KeyError, TypeError, the Rust
    tokenizers' plain Exception), so every Exception is wrapped here, at this one boundary.
    """
    from transformers import AutoTokenizer  # imported when first needed: a merge of agreeing configs never is

    try:
        return AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    except Exception as e:
        raise CheckpointError(
            f"{folder / gguf_file if gguf_file else folder}: the tokenizer does not load ({type(e).__name__}: {e}); "
            "re-save the tokenizer (tokenizer.save_pretrained) or copy the base model's tokenizer files"
        ) from None


def has_tokenizer_files(folder: Optional[Path]) -> bool:
    """True when ``folder`` holds any tokenizer file (tokenizer.json, vocab.json, ...)."""
    return folder is not None and any((folder / f).is_file() for f in TOKENIZER_FILES)


def empty_model(config: PretrainedConfig, architecture: str, where: Path) -> torch.nn.Module:
    """An ``architecture`` model on the meta device (no memory, no weights): its module tree and shapes."""
    import transformers

    cls = getattr(transformers, architecture, None)
    if cls is None:
        raise CheckpointError(
            f"{where}: architecture {architecture} is not in transformers {transformers.__version__}; custom-code models are not run"
        )
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
        if not files:
            raise CheckpointError(f"{path}: the checkpoint holds no tensors; re-download or re-save the checkpoint")
        self.path, self.config, self.files = path, config, files

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, {len(self.files)} tensors)"

    @property
    def name(self) -> str:
        """The folder (or file) name, for messages and labels."""
        return self.path.name

    @property
    def architecture(self) -> str:
        """The first of config.json's ``architectures``; without them, the causal LM class of its ``model_type``.

        That is the class ``AutoModelForCausalLM`` loads such a config with (``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``);
        a model_type that has none is returned as it is ("?" when there is no model_type either).
        """
        archs = self.config.get("architectures")
        if archs:
            return archs[0]
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        model_type = self.config.get("model_type", "?")
        return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type, model_type)

    @property
    def num_layers(self) -> Optional[int]:
        """num_hidden_layers from the config, or None when it has none."""
        return self.config.get("num_hidden_layers")

    @cached_property
    def hf_config(self) -> PretrainedConfig:
        """``self.config`` as a transformers config object (class defaults filled in)."""
        from transformers import AutoConfig

        try:
            return AutoConfig.for_model(**self.config)
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(
                f"{self.path}: config.json is not a model config transformers knows ({e}); custom-code models are not run"
            ) from None

    @cached_property
    def tie_word_embeddings(self) -> bool:
        """``hf_config.tie_word_embeddings`` (the config class's default when config.json does not say).

        Remembered on disk per config (``model_facts.remembered``): a fresh process opening checkpoints
        it has seen before needs no transformers import for it.
        """
        key = json.dumps(self.config, sort_keys=True, default=str)
        return remembered("tie_word_embeddings", key, lambda: bool(self.hf_config.tie_word_embeddings))

    @property
    def tied_embeddings(self) -> bool:
        """True when the output embedding is the input embedding (config says so, or lm_head is absent)."""
        return self.tie_word_embeddings or not any(n in self.files for n in TIED_NAMES)

    @property
    def sources(self) -> list[Path]:
        """Every file or folder this checkpoint reads from (never written to, never an output)."""
        return [self.path]

    @property
    def ref(self) -> str:
        """How a recipe names this checkpoint so that ``open_checkpoint(ref)`` opens it again."""
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

    def read_into(self, name: str, out: torch.Tensor) -> None:
        """Tensor ``name`` converted into ``out`` (float32, its shape), read from disk now.

        A format that can read straight into ``out`` overrides this (``SafetensorsDir``: one copy for an
        F32 tensor); here ``get`` then a copy. No NaN/inf check (``finite.read_stacked`` does it).
        CheckpointError as ``get``.
        """
        out.copy_(self.get(name))

    def __getitem__(self, name: str) -> torch.Tensor:
        """Tensor ``name`` as float32 (from F16, BF16, F32, dequantized GGUF, ...), read now; non-float tensors as stored.

        How every tensor is read for a merge or a statistic: a checkpoint is a read-only mapping of
        tensor name -> float32 tensor, like the dicts of an in-memory session (``explorer.io.inputs``).
        Raises CheckpointError naming model and tensor if it holds NaN or inf, or if there is none.
        """
        tensor = self.get(name)
        if not tensor.is_floating_point():
            return tensor
        tensor = tensor.to(torch.float32)
        check_finite(self, name, tensor)
        return tensor

    def __iter__(self) -> Iterator[str]:
        """Tensor names in file order."""
        return iter(self.files)

    def close(self) -> None:
        """Release open files; reading again reopens them."""

    def own_name(self, name: str) -> str:
        """The name under which the model itself stores what ``get(name)`` returns.

        ``name`` here; an aligned view (``explorer.io.vocab``) of a tied model answers its input
        embedding for the output embedding.
        """
        return name

    def place_rows(self, name: str, tensor: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """``tensor``, shaped like the model's own ``own_name(name)`` (e.g. its Fisher), laid out as ``get(name)``.

        Unchanged here; an aligned view moves token rows into the shared vocabulary and gives the rows
        the model lacks the value ``fill``.
        """
        return tensor

    def _missing(self, name: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: no tensor {name!r}; the checkpoint has {len(self.files)} tensors")

    def has_tokenizer(self) -> bool:
        """True when this model ships tokenizer files."""
        return has_tokenizer_files(self.assets_dir)

    def tokenizer(self) -> Optional[PreTrainedTokenizerBase]:
        """A freshly loaded tokenizer of this model, or None when it ships none."""
        if not self.has_tokenizer():
            return None
        return load_tokenizer(self.assets_dir)

    def save_assets(self, dst: Path) -> None:
        """Copy this model's side files (``side_files``: tokenizer, generation and processor configs, ...) into ``dst``."""
        for file in side_files(self.assets_dir):
            shutil.copyfile(file, dst / file.name)


class CheckpointView(Checkpoint):
    """Another checkpoint (``inner``) seen differently: other names, shapes, values or config, the same files.

    Its sources, reference, side files, tokenizer and handles are ``inner``'s; a subclass overrides what
    it changes (``shape``, ``dtype``, ``get``, ...). Used for dequantized FP8 (``formats.quantized``),
    names as transformers loads them (``io.keymap``) and aligned vocabularies (``io.vocab``).
    """

    def __init__(self, inner: Checkpoint, config: dict, files: dict[str, Path]):
        super().__init__(inner.path, config, files)
        self.inner = inner
        self.format = inner.format

    @property
    def sources(self) -> list[Path]:
        """``inner``'s source files."""
        return self.inner.sources

    @property
    def ref(self) -> str:
        """``inner``'s reference in a recipe."""
        return self.inner.ref

    @property
    def assets_dir(self) -> Optional[Path]:
        """``inner``'s folder of side files."""
        return self.inner.assets_dir

    def shape(self, name: str) -> tuple[int, ...]:
        """``inner``'s shape of ``name``."""
        return self.inner.shape(name)

    def dtype(self, name: str) -> str:
        """``inner``'s dtype name of ``name``."""
        return self.inner.dtype(name)

    def get(self, name: str) -> torch.Tensor:
        """``inner``'s tensor ``name``."""
        return self.inner.get(name)

    def has_tokenizer(self) -> bool:
        """Whether ``inner`` ships tokenizer files."""
        return self.inner.has_tokenizer()

    def tokenizer(self) -> Optional[PreTrainedTokenizerBase]:
        """``inner``'s tokenizer."""
        return self.inner.tokenizer()

    def save_assets(self, dst: Path) -> None:
        """``inner``'s side files, copied into ``dst``."""
        self.inner.save_assets(dst)

    def close(self) -> None:
        """Close ``inner``'s open files."""
        self.inner.close()


def side_files(folder: Optional[Path]) -> list[Path]:
    """Every file beside a model's weights that a copy of the model needs, sorted by name.

    All plain, visible files directly in ``folder`` (tokenizer files of any format, generation_config.json,
    preprocessor_config.json, processor_config.json, chat templates, ...) except weights and their indexes
    (``WEIGHT_SUFFIXES``) and ``NOT_COPIED``. [] when ``folder`` is None.
    """
    if folder is None:
        return []
    return [
        f
        for f in sorted(folder.iterdir())
        if f.is_file()
        and not f.name.startswith(".")
        and f.name not in NOT_COPIED
        and not f.name.endswith(WEIGHT_SUFFIXES)
    ]


@dataclass(frozen=True)
class EmbeddingNames:
    """Tensor names of an architecture's embeddings, e.g. Llama: model.embed_tokens.weight, lm_head.weight."""

    input: str
    output: Optional[str]  # None for models without an output embedding (encoders)
    vocab: tuple[str, ...]  # every tensor indexed by token on dim 0


_NAMES: dict[tuple[str, str], EmbeddingNames] = {}  # (architecture, config JSON) -> names


def embedding_names(checkpoint: Checkpoint) -> EmbeddingNames:
    """The embedding tensor names of ``checkpoint``'s architecture, read off an empty (meta) model.

    Worked out once per architecture and config, then read from disk (``model_facts.remembered``).
    """
    key = (checkpoint.architecture, json.dumps(checkpoint.config, sort_keys=True, default=str))

    def compute() -> list:
        model = empty_model(checkpoint.hf_config, checkpoint.architecture, checkpoint.path)
        module_names = {id(m): n for n, m in model.named_modules()}
        inp = f"{module_names[id(model.get_input_embeddings())]}.weight"
        out = model.get_output_embeddings()
        if out is None:
            return [inp, None, [inp]]
        prefix = module_names[id(out)]
        return [inp, f"{prefix}.weight", [inp] + [f"{prefix}.{p}" for p, _ in out.named_parameters(recurse=False)]]

    if key not in _NAMES:
        inp, out, vocab = remembered("embeddings", list(key), compute)
        _NAMES[key] = EmbeddingNames(inp, out, tuple(vocab))
    return _NAMES[key]
