"""GGUF files (llama.cpp): each tensor dequantized to float32 when read, under its Hugging Face name.

Chosen approach: per-tensor reading, no converted copy on disk. transformers' GGUF support gives the
config (``load_gguf_checkpoint``) and the per-architecture ``TENSOR_PROCESSORS`` that undo llama.cpp's
layout changes (e.g. Llama q/k weights, which llama.cpp stores with the rotary halves interleaved, are
permuted back); the gguf package gives the name map (``get_tensor_name_map``: HF module name -> GGUF
name, applied to the names of an empty meta-device model of the architecture) and ``dequantize``,
which turns one quantized tensor into float32. Memory stays one tensor at a time and nothing is written next to the input.
Architectures whose GGUF tensors do not map one-to-one onto HF tensors (e.g. stacked MoE experts) are
refused with a conversion hint.
"""

from __future__ import annotations

from collections import Counter
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np
import torch
from typing_extensions import override

from explorer.io.formats.base import (
    TIED_NAMES,
    Checkpoint,
    CheckpointError,
    empty_model,
    load_tokenizer,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

SUFFIX = ".gguf"


def is_gguf(path: Path) -> bool:
    """True for a file whose name ends in .gguf."""
    return path.is_file() and path.suffix == SUFFIX


@lru_cache(maxsize=None)
def dequantizable(tensor_type) -> bool:
    """True when the installed gguf package dequantizes ``tensor_type`` (tried on one block of zeros)."""
    from gguf import GGML_QUANT_SIZES, dequantize

    try:
        dequantize(np.zeros((1, GGML_QUANT_SIZES[tensor_type][1]), np.uint8), tensor_type)
    except NotImplementedError:
        return False
    return True


class GgufCheckpoint(Checkpoint):
    """One .gguf file. ``dtype`` is always F32 (dequantized); ``format`` names the quantization."""

    def __init__(self, path: Path):
        from gguf import GGUFReader
        from transformers import AutoConfig
        from transformers.modeling_gguf_pytorch_utils import (
            TENSOR_PROCESSORS,
            TensorProcessor,
            load_gguf_checkpoint,
            read_field,
        )
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        if "-of-" in path.stem:
            raise CheckpointError(
                f"{path}: is one part of a split GGUF; join the parts first (llama-gguf-split --merge) and give the joined file"
            )
        try:
            self._meta = load_gguf_checkpoint(str(path))
            self._reader = GGUFReader(str(path))
        except (ValueError, NotImplementedError, OSError) as e:
            raise CheckpointError(
                f"{path}: cannot read this GGUF file ({e}); check that transformers supports its architecture"
            ) from None
        gguf_config = self._meta["config"]
        model_type = gguf_config["model_type"]
        if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            raise CheckpointError(
                f"{path}: GGUF architecture {model_type} is not a causal LM transformers can rebuild; convert it to safetensors first"
            )
        config = AutoConfig.for_model(**gguf_config).to_dict()
        config["architectures"] = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]]
        config.pop("_name_or_path", None)
        model = empty_model(AutoConfig.for_model(**config), config["architectures"][0], path)
        gguf_arch = read_field(self._reader, "general.architecture")[0]
        self._processor = TENSOR_PROCESSORS.get(gguf_arch, TensorProcessor)(config=gguf_config)
        self._shapes = {name: tuple(p.shape) for name, p in model.state_dict().items()}
        self._mapping = self._name_map(path, gguf_arch, config.get("num_hidden_layers", 0))
        self._tensors = {self._mapping[t.name]: t for t in self._reader.tensors if t.name in self._mapping}
        super().__init__(path, config, {name: path for name in self._tensors})
        unmapped = [
            n for n in self._shapes if n not in self._tensors and not (n in TIED_NAMES and self.tied_embeddings)
        ]
        if unmapped:
            raise CheckpointError(
                f"{path}: {len(unmapped)} tensors of {config['architectures'][0]} (e.g. {unmapped[0]!r}) have no one-to-one GGUF "
                "tensor; convert the file once with transformers (AutoModelForCausalLM.from_pretrained(folder, gguf_file=...)"
                ".save_pretrained(new_folder)) and merge the converted folder"
            )
        self._check_types()
        kinds = Counter(t.tensor_type.name for t in self._tensors.values() if len(t.shape) > 1)
        self.format = f"gguf ({kinds.most_common(1)[0][0]})" if kinds else "gguf"

    def _name_map(self, path: Path, gguf_arch: str, layers: int) -> dict[str, str]:
        """GGUF tensor name -> HF tensor name, for the HF tensors of this architecture."""
        from gguf import MODEL_ARCH_NAMES, get_tensor_name_map

        arch = next((a for a, n in MODEL_ARCH_NAMES.items() if n == gguf_arch), None)
        if arch is None:
            raise CheckpointError(
                f"{path}: GGUF architecture {gguf_arch!r} is unknown to the installed gguf package; convert the file to safetensors first"
            )
        names, mapping = get_tensor_name_map(arch, layers), {}
        for hf_name in self._shapes:
            module, _, suffix = self._processor.preprocess_name(hf_name).rpartition(".")
            gguf_name = names.get_name(module)
            if gguf_name is not None:
                mapping[f"{gguf_name}.{suffix}"] = hf_name
        return mapping

    def _check_types(self) -> None:
        """CheckpointError for the first tensor whose type the gguf package cannot dequantize (e.g. I8, Q8_K)."""
        for name, tensor in self._tensors.items():
            if not dequantizable(tensor.tensor_type):
                raise CheckpointError(
                    f"{self.path}: tensor {name!r} (GGUF {tensor.name!r}) has type {tensor.tensor_type.name}, which the gguf package "
                    "cannot dequantize; re-export the model as F16, BF16, F32 or a common quantization (Q8_0, Q4_K, ...), "
                    "or convert it to safetensors"
                )

    @property
    @override
    def assets_dir(self) -> Optional[Path]:
        return None

    @override
    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self._tensors:
            raise self._missing(name)
        return self._shapes[name]

    @override
    def dtype(self, name: str) -> str:
        if name not in self._tensors:
            raise self._missing(name)
        return "F32"

    def get(self, name: str) -> torch.Tensor:
        """Tensor ``name`` dequantized to float32, with the architecture's layout fix-up applied."""
        from gguf import dequantize

        if name not in self._tensors:
            raise self._missing(name)
        tensor = self._tensors[name]
        weights = dequantize(tensor.data, tensor.tensor_type)
        result = self._processor.process(
            weights=weights, name=tensor.name, tensor_key_mapping=self._mapping, parsed_parameters=self._meta
        )
        return torch.from_numpy(np.copy(result.weights)).reshape(self._shapes[name])

    @override
    def has_tokenizer(self) -> bool:
        return bool(self._meta.get("tokenizer", {}).get("tokens"))

    def tokenizer(self) -> Optional[PreTrainedTokenizerBase]:
        """The tokenizer stored in the GGUF metadata, rebuilt by transformers."""
        if not self.has_tokenizer():
            return None
        return load_tokenizer(self.path.parent, self.path.name)

    @override
    def save_assets(self, dst: Path) -> None:
        tokenizer = self.tokenizer()
        if tokenizer is not None:
            tokenizer.save_pretrained(dst)
