"""Quantized checkpoints: block-FP8 weights are dequantized on read, every other scheme is refused.

Tiny Llama-shaped checkpoints (hidden 64, 2 layers) whose linear weights are stored the way
transformers' finegrained FP8 stores them: ``X.weight`` as float8_e4m3fn codes and ``X.weight_scale_inv``
(float32, one per 32x32 block) with ``quantization_config: {quant_method: fp8, weight_block_size: [32,
32]}`` in config.json. The expected weights are dequantized here, block by block, independently of
``explorer.io.formats.quantized``, and cross-checked against transformers' own dequantization.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

from explorer.cli import main
from explorer.executor import merge_to_folder
from explorer.io.checkpoint import CheckpointError, open_checkpoint
from explorer.io.formats.quantized import dequantize_fp8
from explorer.recipe import MergeRecipe
from explorer.session import MergeSession
from tests.helpers import assert_expected

BLOCK = (32, 32)
FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
Q_PROJ = "model.layers.0.self_attn.q_proj.weight"
GATE = "model.layers.1.mlp.gate_proj.weight"
FP8_CONFIG = {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": list(BLOCK)}


def _config(intermediate: int = 96) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=intermediate,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        initializer_range=0.1,
    )


def _is_linear(name: str) -> bool:
    return name.endswith(".weight") and any(f".{m}." in name for m in LINEARS)


def _float_state(config: LlamaConfig, seed: int, base_seed: int = 0) -> dict[str, torch.Tensor]:
    """A base model's weights (seed ``base_seed``) plus a seeded perturbation: an 'expert' of one base, bf16."""
    torch.manual_seed(base_seed)
    model = LlamaForCausalLM(config)
    g = torch.Generator().manual_seed(seed)
    return {
        n: (p.detach() + 0.03 * torch.randn(p.shape, generator=g)).to(torch.bfloat16)
        for n, p in model.state_dict().items()
    }


def quantize_fp8(weight: torch.Tensor, block=BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes float8_e4m3fn, scale_inv float32 per block), as transformers' Fp8Quantize: code = w / (max|w| / 448).

    Blocks at the right and bottom edges of a shape that is not a multiple of the block are partial
    (the scale grid is ceil(rows / 32) x ceil(cols / 32), as FP8Linear allocates it).
    """
    rows, cols = weight.shape
    grid = (math.ceil(rows / block[0]), math.ceil(cols / block[1]))
    codes = torch.empty(rows, cols, dtype=FP8)
    scale_inv = torch.empty(grid, dtype=torch.float32)
    w = weight.float()
    for i in range(grid[0]):
        for j in range(grid[1]):
            tile = w[i * block[0] : (i + 1) * block[0], j * block[1] : (j + 1) * block[1]]
            peak = tile.abs().max()
            scale_inv[i, j] = peak / FP8_MAX if peak > 0 else 1.0
            codes[i * block[0] : (i + 1) * block[0], j * block[1] : (j + 1) * block[1]] = (
                (tile / scale_inv[i, j]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
            )
    return codes, scale_inv


def dequantize_reference(codes: torch.Tensor, scale_inv: torch.Tensor, block=BLOCK) -> torch.Tensor:
    """weight[i, j] = code[i, j] * scale_inv[i // 32, j // 32], block by block (float32)."""
    out = codes.float()
    for i in range(scale_inv.shape[0]):
        for j in range(scale_inv.shape[1]):
            out[i * block[0] : (i + 1) * block[0], j * block[1] : (j + 1) * block[1]] *= scale_inv[i, j]
    return out


def save_fp8(folder: Path, config: LlamaConfig, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Write ``weights`` as a block-FP8 checkpoint; returns the float32 weights it dequantizes to."""
    folder.mkdir(parents=True)
    stored, dequantized = {}, {}
    for name, w in weights.items():
        if _is_linear(name):
            codes, scale_inv = quantize_fp8(w)
            stored[name], stored[name.removesuffix(".weight") + ".weight_scale_inv"] = codes, scale_inv
            dequantized[name] = dequantize_reference(codes, scale_inv)
        else:
            stored[name], dequantized[name] = w, w.float()
    save_file(stored, folder / "model.safetensors", metadata={"format": "pt"})
    cfg = config.to_dict() | {"architectures": ["LlamaForCausalLM"], "torch_dtype": "bfloat16"}
    (folder / "config.json").write_text(json.dumps(cfg | {"quantization_config": FP8_CONFIG}))
    return dequantized


def save_plain(folder: Path, config: LlamaConfig, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Write ``weights`` as a plain (bf16) checkpoint; returns them as float32."""
    folder.mkdir(parents=True)
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    cfg = config.to_dict() | {"architectures": ["LlamaForCausalLM"], "torch_dtype": "bfloat16"}
    (folder / "config.json").write_text(json.dumps(cfg))
    return {n: w.float() for n, w in weights.items()}


@pytest.fixture(scope="module")
def fp8_pair(tmp_path_factory):
    """Two FP8 experts of one base: (folders, their dequantized float32 weights)."""
    root, config = tmp_path_factory.mktemp("fp8"), _config()
    folders = [root / "expert-a", root / "expert-b"]
    weights = [save_fp8(f, config, _float_state(config, seed)) for f, seed in zip(folders, (1, 2), strict=True)]
    return folders, weights


def _linear(models, dtype: str = "float32") -> MergeRecipe:
    return MergeRecipe(merge_method="linear", models=[{"model": str(m)} for m in models], dtype=dtype)


def _average(weights: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {n: sum(w[n] for w in weights) / len(weights) for n in weights[0]}


def _output(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def _plain_config(folder: Path) -> dict:
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config
    return config


def test_fp8_checkpoint_reads_as_its_dequantized_weights(fp8_pair):
    """Names hide the scales, dtypes are float, every tensor is the block-wise dequantization of its codes."""
    (folder, _), (weights, _) = fp8_pair
    checkpoint = open_checkpoint(folder)
    assert sorted(checkpoint.names()) == sorted(weights)
    assert not any(n.endswith("_scale_inv") for n in checkpoint.names())
    assert "quantization_config" not in checkpoint.config
    assert "quantization_config" not in checkpoint.hf_config.to_dict()
    assert checkpoint.dtype(Q_PROJ) == "F32"
    assert checkpoint.dtype("model.embed_tokens.weight") == "BF16"  # stored unquantized: as stored
    for name in weights:
        assert_expected(checkpoint[name], weights[name], rtol=0, atol=0)


def test_dequantization_matches_transformers(fp8_pair, tmp_path):
    """transformers loads the FP8 folder on CPU (it dequantizes there); its weights are ours, bit for bit.

    A weight shape that is not a multiple of the block (gate_proj 80 x 64) is checked against
    transformers' block-wise formula (``_dequantize_fp8_weight``): its loader refuses such shapes.
    """
    (folder, _), _ = fp8_pair
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    checkpoint = open_checkpoint(folder)
    theirs = model.state_dict()
    for name in checkpoint.names():
        assert_expected(checkpoint[name], theirs[name].float(), rtol=0, atol=0)

    config = _config(intermediate=80)
    odd = save_fp8(tmp_path / "odd", config, _float_state(config, 3))
    stored = load_file(tmp_path / "odd" / "model.safetensors")
    scale = stored[GATE.removesuffix(".weight") + ".weight_scale_inv"]
    assert scale.shape == (3, 2)  # ceil(80 / 32) x ceil(64 / 32)
    expected = _dequantize_fp8_weight(stored[GATE], scale, list(BLOCK), torch.float32)
    assert_expected(open_checkpoint(tmp_path / "odd")[GATE], expected, rtol=0, atol=0)
    assert_expected(expected, odd[GATE], rtol=0, atol=0)


@pytest.mark.parametrize("intermediate", [96, 80])
def test_linear_average_of_fp8_pair_is_average_of_dequantized(tmp_path, intermediate):
    """linear over two FP8 experts = mean of their dequantized weights (block-aligned and partial blocks)."""
    config = _config(intermediate)
    folders = [tmp_path / "a", tmp_path / "b"]
    weights = [save_fp8(f, config, _float_state(config, seed)) for f, seed in zip(folders, (4, 5), strict=True)]
    out = merge_to_folder(_linear(folders), tmp_path / "out")
    merged, expected = _output(out), _average(weights)
    assert sorted(merged) == sorted(expected)  # no scale tensors written
    for name in expected:
        assert merged[name].dtype == torch.float32
        assert_expected(merged[name], expected[name])
    config_out = _plain_config(out)
    assert config_out["dtype"] == "float32"


def test_output_loads_with_transformers_and_matches(fp8_pair, tmp_path):
    """The merged folder is a plain float checkpoint: AutoModelForCausalLM loads it with the averaged weights."""
    folders, weights = fp8_pair
    out = merge_to_folder(_linear(folders, dtype="bfloat16"), tmp_path / "out")
    _plain_config(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert getattr(model.config, "quantization_config", None) is None
    assert model.dtype == torch.bfloat16
    state, expected = model.state_dict(), _average(weights)
    for name in expected:
        assert_expected(state[name], expected[name].to(torch.bfloat16), rtol=0, atol=0)
    ids = torch.tensor([[1, 5, 7, 9]])
    assert torch.isfinite(model(ids).logits).all()


def test_lora_on_fp8_base_folds_onto_dequantized_weights(fp8_pair, tmp_path):
    """An adapter trained (here: built) with PEFT on the float model folds onto the dequantized base, as PEFT merges it."""
    (base, _), (base_weights, _) = fp8_pair
    float_model = LlamaForCausalLM(_config())
    float_model.load_state_dict(base_weights)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    torch.manual_seed(0)
    peft_model = get_peft_model(float_model, lora)
    peft_model.save_pretrained(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(base)
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(config))

    expected = peft_model.merge_and_unload().state_dict()
    for ref in (tmp_path / "adapter", f"{base}+{tmp_path / 'adapter'}"):
        folded = open_checkpoint(ref)
        assert "quantization_config" not in folded.config
        assert sorted(folded.names()) == sorted(base_weights)
        for name in base_weights:
            assert_expected(folded[name], expected[name], rtol=1e-6, atol=1e-7)
    assert not torch.equal(expected[Q_PROJ], base_weights[Q_PROJ])  # the adapter changes the weight


def test_mixed_fp8_and_bf16_experts(fp8_pair, tmp_path):
    """An FP8 expert beside a plain bf16 one: both read as numbers, either order, output has no quantization_config."""
    (fp8_folder, _), (fp8_weights, _) = fp8_pair
    config = _config()
    plain = save_plain(tmp_path / "plain", config, _float_state(config, 7))
    expected = _average([fp8_weights, plain])
    for order in ([fp8_folder, tmp_path / "plain"], [tmp_path / "plain", fp8_folder]):
        out = merge_to_folder(_linear(order), tmp_path / f"out-{order[0].name}")
        merged = _output(out)
        assert sorted(merged) == sorted(expected)
        for name in expected:
            assert_expected(merged[name], expected[name])
        _plain_config(out)


def test_session_builds_float_model_from_fp8_pair(fp8_pair):
    """The in-memory session merges an FP8 pair and builds a float model (no quantization_config, no FP8 layers)."""
    folders, weights = fp8_pair
    session = MergeSession(None, folders)
    assert "quantization_config" not in session.reference.hf_config.to_dict()
    state = session.merge(session.recipe("linear", {}, [{"weight": 1.0}, {"weight": 1.0}]))
    model = session.build_model(state)
    assert getattr(model.config, "quantization_config", None) is None
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(type(m).__name__ != "FP8Linear" for m in model.modules())
    expected, params = _average(weights), model.state_dict()
    for name in expected:
        assert_expected(params[name], expected[name])
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


def test_cli_merges_fp8_pair(fp8_pair, tmp_path, capsys):
    """``python -m explorer merge RECIPE --out DIR`` (its main) on an FP8 pair writes the dequantized average."""
    folders, weights = fp8_pair
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump({"merge_method": "linear", "models": [{"model": str(f)} for f in folders], "dtype": "float32"})
    )
    assert main(["merge", str(recipe), "--out", str(tmp_path / "out")]) == 0
    merged, expected = _output(tmp_path / "out"), _average(weights)
    assert sorted(merged) == sorted(expected)
    for name in expected:
        assert_expected(merged[name], expected[name])
    _plain_config(tmp_path / "out")


def _quantized_folder(folder: Path, quantization_config: dict, tensors: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True)
    save_file(tensors, folder / "model.safetensors")
    cfg = _config().to_dict() | {"architectures": ["LlamaForCausalLM"], "quantization_config": quantization_config}
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def _bnb(folder: Path) -> Path:
    """bitsandbytes 4-bit: packed uint8 codes with absmax and quant_state tensors beside them."""
    tensors = {n: w for n, w in _float_state(_config(), 8).items() if not _is_linear(n)}
    tensors[Q_PROJ] = torch.randint(0, 255, (64 * 64 // 2, 1), dtype=torch.uint8)
    tensors[Q_PROJ + ".absmax"] = torch.rand(64 * 64 // 64)
    config = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
    return _quantized_folder(folder, config, tensors)


def _gptq(folder: Path) -> Path:
    """GPTQ 4-bit: int32 qweight / qzeros, float16 scales, g_idx."""
    tensors = {n: w for n, w in _float_state(_config(), 9).items() if not _is_linear(n)}
    prefix = Q_PROJ.removesuffix(".weight")
    tensors |= {
        f"{prefix}.qweight": torch.randint(0, 2**30, (64 // 8, 64), dtype=torch.int32),
        f"{prefix}.qzeros": torch.randint(0, 2**30, (2, 64 // 8), dtype=torch.int32),
        f"{prefix}.scales": torch.rand(2, 64).half(),
        f"{prefix}.g_idx": torch.arange(64, dtype=torch.int32) // 32,
    }
    return _quantized_folder(folder, {"quant_method": "gptq", "bits": 4, "group_size": 32}, tensors)


def _autogptq(folder: Path) -> Path:
    """An AutoGPTQ folder: GPTQ tensors, the scheme in quantize_config.json, none in config.json."""
    _gptq(folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "quantize_config.json").write_text(json.dumps(config.pop("quantization_config")))
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _awq(folder: Path) -> Path:
    tensors = {n: w for n, w in _float_state(_config(), 10).items() if not _is_linear(n)}
    prefix = Q_PROJ.removesuffix(".weight")
    tensors |= {
        f"{prefix}.qweight": torch.randint(0, 2**30, (64, 64 // 8), dtype=torch.int32),
        f"{prefix}.scales": torch.rand(2, 64).half(),
    }
    return _quantized_folder(folder, {"quant_method": "awq", "bits": 4, "group_size": 32, "version": "gemm"}, tensors)


def _compressed(folder: Path) -> Path:
    """compressed-tensors FP8: float8 codes with a per-channel ``weight_scale`` (not transformers' fp8 layout)."""
    tensors = dict(_float_state(_config(), 11))
    tensors[Q_PROJ] = tensors[Q_PROJ].to(FP8)
    tensors[Q_PROJ.removesuffix(".weight") + ".weight_scale"] = torch.rand(64, 1)
    return _quantized_folder(folder, {"quant_method": "compressed-tensors", "format": "float-quantized"}, tensors)


@pytest.mark.parametrize(
    "build, scheme",
    [
        (_bnb, "bitsandbytes"),
        (_gptq, "gptq"),
        (_autogptq, "gptq"),
        (_awq, "awq"),
        (_compressed, "compressed-tensors"),
    ],
)
def test_other_schemes_are_refused_before_anything_is_written(fp8_pair, tmp_path, build, scheme):
    """A quant_method we do not dequantize is refused at open, naming folder, scheme and fix; no output folder.

    Both beside a float model and beside a second model of the same scheme (codes facing codes would
    otherwise pass the float-vs-integer check).
    """
    folder = build(tmp_path / scheme)
    twin = build(tmp_path / f"{scheme}-twin")
    for models in ([fp8_pair[0][0], folder], [folder, twin]):
        out = tmp_path / "out"
        with pytest.raises(CheckpointError) as refused:
            merge_to_folder(_linear(models), out)
        message = str(refused.value)
        assert str(folder) in message and scheme in message
        assert "save_pretrained" in message and "dequantize" in message
        assert not out.exists()
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_fp8_without_scales_config_or_with_bad_scales(tmp_path):
    """Plain float8 without a quantization_config reads as numbers; scales without it or of the wrong grid are refused.

    Plain float8 tensors (no scales, no quantization_config) are read as they were before; scales
    without the config, or a scale grid that does not fit its weight, are refused naming the tensor.
    """
    config = _config()
    weights = _float_state(config, 12)
    plain = {n: w.to(FP8) if _is_linear(n) else w for n, w in weights.items()}
    save_plain(tmp_path / "plain-fp8", config, plain)
    checkpoint = open_checkpoint(tmp_path / "plain-fp8")
    assert checkpoint.dtype(Q_PROJ) == "F8_E4M3"
    assert_expected(checkpoint[Q_PROJ], plain[Q_PROJ].float(), rtol=0, atol=0)

    save_fp8(tmp_path / "fp8", config, weights)
    stored = load_file(tmp_path / "fp8" / "model.safetensors")
    no_config = tmp_path / "scales-no-config"
    save_plain(no_config, config, stored)
    with pytest.raises(CheckpointError, match="quantization_config") as refused:
        open_checkpoint(no_config)
    assert "weight_scale_inv" in str(refused.value)

    scale = Q_PROJ.removesuffix(".weight") + ".weight_scale_inv"
    bad = _quantized_folder(tmp_path / "bad-grid", FP8_CONFIG, stored | {scale: torch.ones(3, 3)})
    with pytest.raises(CheckpointError, match="q_proj") as refused:
        open_checkpoint(bad)
    assert str(bad) in str(refused.value)


def test_per_tensor_scales_and_stacked_experts_match_transformers(tmp_path):
    """Without weight_block_size one scale per weight; stacked (experts, rows, cols) weights keep their leading dim."""
    config = _config()
    weights = _float_state(config, 13)
    stored, expected = {}, {}
    for name, w in weights.items():
        if _is_linear(name):
            scale = w.float().abs().max() / FP8_MAX
            stored[name] = (w.float() / scale).to(FP8)
            stored[name + "_scale_inv"] = scale.reshape(1)
            expected[name] = _dequantize_fp8_weight(stored[name], stored[name + "_scale_inv"], None, torch.float32)
        else:
            stored[name] = expected[name] = w
    per_tensor = {"quant_method": "fp8", "activation_scheme": "dynamic"}
    checkpoint = open_checkpoint(_quantized_folder(tmp_path / "per-tensor", per_tensor, stored))
    assert sorted(checkpoint.names()) == sorted(weights)
    for name in weights:
        assert_expected(checkpoint[name], expected[name].float(), rtol=0, atol=0)

    experts = torch.randn(3, 80, 48)
    codes = (experts * 100).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    scale_inv = torch.rand(3, 3, 2) + 0.5  # ceil(80 / 32) x ceil(48 / 32) per expert
    assert_expected(
        dequantize_fp8(codes, scale_inv, BLOCK),
        _dequantize_fp8_weight(codes, scale_inv, list(BLOCK), torch.float32),
        rtol=0,
        atol=0,
    )
