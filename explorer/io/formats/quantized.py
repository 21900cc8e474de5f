"""Quantized checkpoints (a ``quantization_config`` in config.json): block-FP8 dequantized on read, others refused.

transformers' finegrained FP8 (``quant_method: fp8``) stores a linear weight ``X.weight`` as
float8_e4m3fn codes and ``X.weight_scale_inv`` as float32 scales, one per ``weight_block_size``
block [b0, b1] (a grid of ceil(rows / b0) x ceil(cols / b1): edge blocks are partial), or a single
scale without ``weight_block_size``. The weight is ``code[i, j] * scale_inv[i // b0, j // b1]``, as
transformers' ``_dequantize_fp8_weight`` computes it (leading dims, e.g. stacked experts, kept).
``dequantized(checkpoint)`` wraps such a checkpoint so that every reader sees plain float weights:
``get`` returns the dequantized float32 weight (``dtype`` says F32), the scale tensors (and static
``activation_scale``) are consumed and hidden from ``names``, and ``config`` has no
``quantization_config`` (so the output config, ``hf_config`` and models built from it are plain
float). Any other scheme (bitsandbytes, gptq, awq, compressed-tensors, hqq, torchao, ...) is refused
when the model is opened, naming folder, scheme and the fix; so are scale tensors without a
quantization_config. Plain float8 tensors without scales and without a quantization_config are
numbers like any other float tensor (not wrapped).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import torch
from typing_extensions import override

from explorer.io.formats.base import Checkpoint, CheckpointError, CheckpointView, is_float_dtype

DEQUANTIZED = ("fp8",)  # quant_method values read here; any other is refused
SCALE_SUFFIX = "_scale_inv"  # X.weight -> X.weight_scale_inv
CONSUMED_SUFFIXES = (SCALE_SUFFIX, ".activation_scale")  # read with their weight (or unused), never merged
CODE_DTYPES = ("F8_E4M3", "F8_E5M2")
LEGACY_CONFIGS = {"quantize_config.json": "gptq", "quant_config.json": "awq"}  # AutoGPTQ / AutoAWQ side files
FIX = (
    "dequantize it with transformers first (AutoModelForCausalLM.from_pretrained, then model.dequantize() where "
    "the scheme supports it, then save_pretrained in bfloat16 or float32 without the quantization_config) and "
    "merge that folder"
)


def dequantized(checkpoint: Checkpoint) -> Checkpoint:
    """``checkpoint`` as plain float weights: FP8 dequantized on read; CheckpointError for any other scheme.

    A checkpoint without a quantization_config is returned as it is (after checking that it holds no
    FP8 scale tensors it would otherwise merge as weights).
    """
    qc = checkpoint.config.get("quantization_config")
    if qc is None:
        _check_unquantized(checkpoint)
        return checkpoint
    method = qc.get("quant_method", "?") if isinstance(qc, dict) else "?"
    if method not in DEQUANTIZED:
        raise CheckpointError(
            f"{checkpoint.path}: a quantized checkpoint (quantization_config quant_method {method!r}); {method} "
            f"weights are not dequantized here (only {', '.join(DEQUANTIZED)}); {FIX}"
        )
    return Fp8Checkpoint(checkpoint, qc)


def _check_unquantized(checkpoint: Checkpoint) -> None:
    """CheckpointError for a quantization side file (AutoGPTQ/AutoAWQ) or FP8 scales without a quantization_config."""
    folder = checkpoint.assets_dir
    for file, method in LEGACY_CONFIGS.items():
        if folder is not None and (folder / file).is_file() and checkpoint.format != "lora":
            raise CheckpointError(f"{folder / file}: a {method} quantized checkpoint; its weights are codes; {FIX}")
    for name in checkpoint.names():
        weight = name.removesuffix(SCALE_SUFFIX)
        if weight != name and weight in checkpoint.files and checkpoint.dtype(weight) in CODE_DTYPES:
            raise CheckpointError(
                f"{checkpoint.path}: tensor {weight!r} is {checkpoint.dtype(weight)} codes with scales {name!r}, but "
                "config.json has no quantization_config to say how to apply them; add the quantization_config the "
                f"model was saved with ({{quant_method: fp8, weight_block_size: [...]}}), or {FIX}"
            )


def block_size(path: Path, qc: dict) -> Optional[tuple[int, int]]:
    """``weight_block_size`` as (b0, b1), None for per-tensor scales; CheckpointError when it is malformed."""
    block = qc.get("weight_block_size")
    if block is None:
        return None
    if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise CheckpointError(
            f"{path}: quantization_config weight_block_size {block!r} is not two positive integers [rows, cols]; "
            "fix config.json (transformers writes e.g. [128, 128])"
        )
    return block[0], block[1]


def scale_grid(shape: tuple[int, ...], block: Optional[tuple[int, int]]) -> Optional[tuple[int, ...]]:
    """The scale shape a weight of ``shape`` has: leading dims + ceil(rows / b0) x ceil(cols / b1); None: one scale."""
    if block is None:
        return None
    *lead, rows, cols = shape
    return (*lead, math.ceil(rows / block[0]), math.ceil(cols / block[1]))


def dequantize_fp8(codes: torch.Tensor, scale_inv: torch.Tensor, block: Optional[tuple[int, int]]) -> torch.Tensor:
    """float32 ``codes[..., i, j] * scale_inv[..., i // b0, j // b1]`` (one scale for ``block`` None).

    ``codes`` (..., rows, cols) float8; ``scale_inv`` (..., ceil(rows / b0), ceil(cols / b1)), or one
    element. The products are float32, as transformers computes them before casting to the model dtype.
    """
    weight, scale = codes.to(torch.float32), scale_inv.to(torch.float32)
    if block is None:
        return weight.mul_(scale.reshape(()))
    rows, cols = weight.shape[-2:]
    scale = scale.repeat_interleave(block[0], dim=-2)[..., :rows, :]
    scale = scale.repeat_interleave(block[1], dim=-1)[..., :cols]
    return weight.mul_(scale)


class Fp8Checkpoint(CheckpointView):
    """``inner`` (a transformers finegrained-FP8 checkpoint) read as float weights; scales hidden, config plain.

    Each weight with a ``_scale_inv`` beside it must be float8 codes whose scale grid fits its shape
    (checked at open, from headers only); other tensors (embeddings, norms, modules_to_not_convert) read
    as stored.
    """

    def __init__(self, inner: Checkpoint, qc: dict):
        self.block = block_size(inner.path, qc)
        config = {k: v for k, v in inner.config.items() if k != "quantization_config"}
        files = {n: f for n, f in inner.files.items() if not n.endswith(CONSUMED_SUFFIXES)}
        super().__init__(inner, config, files)
        self.format = f"{inner.format}, fp8 dequantized"
        names = inner.names()
        self._scales = {n.removesuffix(SCALE_SUFFIX): n for n in names if n.endswith(SCALE_SUFFIX)}
        for weight, scale in self._scales.items():
            self._check_pair(weight, scale)

    def _check_pair(self, weight: str, scale: str) -> None:
        inner = self.inner
        if weight not in inner.files:
            raise CheckpointError(
                f"{inner.path}: scale tensor {scale!r} has no weight {weight!r} beside it; the checkpoint is incomplete: "
                "re-download it"
            )
        if inner.dtype(weight) not in CODE_DTYPES or not is_float_dtype(inner.dtype(scale)):
            raise CheckpointError(
                f"{inner.path}: tensor {weight!r} is {inner.dtype(weight)} with {inner.dtype(scale)} scales {scale!r}; "
                f"fp8 dequantization reads float8 codes with float scales (not packed FP4 or exponent-only scales); {FIX}"
            )
        shape, grid = inner.shape(weight), scale_grid(inner.shape(weight), self.block)
        have = inner.shape(scale)
        fits = math.prod(have) == 1 if grid is None else (len(shape) >= 2 and have == grid)
        if not fits:
            raise CheckpointError(
                f"{inner.path}: tensor {weight!r} {list(shape)} has scales {scale!r} of shape {list(have)}, but "
                f"weight_block_size {list(self.block) if self.block else None} needs {list(grid) if grid else [1]}; "
                f"fix weight_block_size in config.json's quantization_config, or {FIX}"
            )

    @override
    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self.files:
            raise self._missing(name)
        return self.inner.shape(name)

    @override
    def dtype(self, name: str) -> str:
        if name not in self.files:
            raise self._missing(name)
        return "F32" if name in self._scales else self.inner.dtype(name)

    @override
    def get(self, name: str) -> torch.Tensor:
        if name not in self.files:
            raise self._missing(name)
        if name not in self._scales:
            return self.inner.get(name)
        return dequantize_fp8(self.inner.get(name), self.inner.get(self._scales[name]), self.block)
