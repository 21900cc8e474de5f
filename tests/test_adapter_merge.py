"""LoRA adapters merged into a new adapter: PEFT's add_weighted_adapter as the oracle, identities, refusals, CLI.

Every adapter is made by PEFT on a tiny Llama (q_proj, v_proj, down_proj and the embedding); a merged
adapter is checked by folding it into the base (``open_checkpoint("BASE+ADAPTER")``) or by loading it
with ``PeftModel.from_pretrained``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM

from explorer.adapter_merge import merge_adapters
from explorer.cli import main
from explorer.executor import merge_to_folder
from explorer.io.checkpoint import CheckpointError, open_checkpoint
from explorer.recipe import MergeRecipe
from tests.helpers import assert_expected
from tests.tiny import save_tiny_llama
from tests.tiny_formats import save_lora, state

TARGETS = ["q_proj", "v_proj", "down_proj", "embed_tokens"]
WEIGHTS = [0.7, -0.4]


@pytest.fixture(scope="module")
def lora_family(tmp_path_factory) -> tuple[Path, list[Path]]:
    """A tiny base and two adapters on it with different ranks and scales (r=4, alpha=8; r=2, alpha=3)."""
    root = tmp_path_factory.mktemp("adapters")
    base = save_tiny_llama(root / "base")
    save_lora(base, root / "a", seed=1, target_modules=TARGETS)
    save_lora(base, root / "b", seed=2, r=2, lora_alpha=3, target_modules=TARGETS)
    return base, [root / "a", root / "b"]


def _folded(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    ckpt = open_checkpoint(f"{base}+{adapter}")
    return {name: ckpt.get(name).float() for name in ckpt.names()}


def _weighted_sum(base: Path, adapters: list[Path], weights: list[float]) -> dict[str, torch.Tensor]:
    """base + sum_i w_i (folded_i - base): the exact task-arithmetic merge of the adapters."""
    expected = {n: t.float() for n, t in state(base).items()}
    for adapter, w in zip(adapters, weights, strict=True):
        for name, tensor in _folded(base, adapter).items():
            expected[name] += w * (tensor - state(base)[name].float())
    return expected


def _assert_same(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], atol: float = 1e-6) -> None:
    """Every tensor close.

    An SVD's float32 rounding is about 1e-7 of a tensor's largest entries (here up to ~20), so SVD
    results are compared with atol=1e-4.
    """
    assert sorted(actual) == sorted(expected)
    for name, tensor in expected.items():
        assert_expected(actual[name].float(), tensor.float(), rtol=1e-5, atol=atol)


def _peft_weighted(
    base: Path, adapters: list[Path], weights: list[float], combination: str, out: Path, **settings
) -> Path:
    """PEFT's add_weighted_adapter(combination_type=combination) result, saved as an adapter folder."""
    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base), adapters[0], adapter_name="a0")
    for i, adapter in enumerate(adapters[1:], 1):
        model.load_adapter(adapter, adapter_name=f"a{i}")
    model.add_weighted_adapter(
        [f"a{i}" for i in range(len(adapters))], weights, "merged", combination_type=combination, **settings
    )
    model.save_pretrained(out, selected_adapters=["merged"])
    return out / "merged"


def test_cat_equals_peft_bit_for_bit(lora_family, tmp_path):
    base, adapters = lora_family
    ours = merge_adapters(adapters, tmp_path / "ours", WEIGHTS, method="cat")
    peft = _peft_weighted(base, adapters, WEIGHTS, "cat", tmp_path / "peft")
    mine, theirs = load_file(ours / "adapter_model.safetensors"), load_file(peft / "adapter_model.safetensors")
    assert sorted(mine) == sorted(theirs)
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    config = json.loads((ours / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["rank_pattern"]) == (6, 6, {})  # scale 1, rank 4 + 2
    _assert_same(_folded(base, ours), _weighted_sum(base, adapters, WEIGHTS))


def test_cat_rank_patterns_and_rslora_load_in_peft_exactly(lora_family, tmp_path):
    base, _ = lora_family
    a = tmp_path / "a"
    save_lora(base, a, seed=3, use_rslora=True, rank_pattern={"down_proj": 2}, alpha_pattern={"q_proj": 3})
    b = tmp_path / "b"
    save_lora(base, b, seed=4, r=3, lora_alpha=5)
    out = merge_adapters([a, b], tmp_path / "out", [1.5, 0.5])
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 7 and not config["use_rslora"] and set(config["rank_pattern"].values()) == {5}
    assert config["alpha_pattern"] == config["rank_pattern"]
    loaded = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base), out).merge_and_unload().state_dict()
    _assert_same(loaded, _weighted_sum(base, [a, b], [1.5, 0.5]))


# PEFT's ties elects signs on unweighted task vectors and divides by the agreeing count (see test_methods_vs_peft).
PEFT_TIES = {"density": 0.5, "election": "unweighted", "divisor": "count", "normalize": True}


@pytest.mark.parametrize(
    ("method", "parameters", "combination"), [("task_arithmetic", {}, "svd"), ("ties", PEFT_TIES, "ties_svd")]
)
def test_svd_matches_peft(lora_family, tmp_path, method, parameters, combination):
    base, adapters = lora_family
    ours = merge_adapters(adapters, tmp_path / "ours", WEIGHTS, method=method, parameters=parameters)
    peft = _peft_weighted(base, adapters, WEIGHTS, combination, tmp_path / "peft", density=parameters.get("density"))
    assert json.loads((ours / "adapter_config.json").read_text())["r"] == 4  # the largest input rank
    _assert_same(_folded(base, ours), _folded(base, peft), atol=1e-4)


@pytest.mark.parametrize("method", ["ties", "dare_ties"])
def test_svd_at_full_rank_equals_the_full_checkpoint_merge(lora_family, tmp_path, method):
    base, adapters = lora_family
    out = merge_adapters(
        adapters, tmp_path / "adapter", WEIGHTS, method=method, parameters={"density": 0.5}, rank=64, seed=3
    )
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 16  # min(out, in) of every module
    recipe = MergeRecipe(
        merge_method=method,
        base_model=str(base),
        parameters={"density": 0.5},
        seed=3,
        models=[{"model": str(a), "parameters": {"weight": w}} for a, w in zip(adapters, WEIGHTS, strict=True)],
    )
    full = merge_to_folder(recipe, tmp_path / "full")
    _assert_same(_folded(base, out), state(full), atol=1e-4)


@pytest.mark.parametrize("method", ["cat", "task_arithmetic"])
def test_single_adapter_with_weight_one_is_itself(lora_family, tmp_path, method):
    base, adapters = lora_family
    out = merge_adapters(adapters[:1], tmp_path / "out", [1.0], method=method)
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4
    _assert_same(_folded(base, out), _folded(base, adapters[0]), atol=1e-4)


def test_svd_rank_truncates_to_the_best_approximation(lora_family, tmp_path):
    base, adapters = lora_family
    out = merge_adapters(adapters, tmp_path / "out", WEIGHTS, method="task_arithmetic", rank=1)
    name = "model.layers.0.self_attn.q_proj.weight"
    merged = (_weighted_sum(base, adapters, WEIGHTS)[name] - state(base)[name]).double()
    ours = _folded(base, out)[name].double() - state(base)[name].double()
    assert torch.linalg.matrix_rank(ours.float(), atol=1e-5) == 1
    s = torch.linalg.svdvals(merged)
    assert_expected(torch.linalg.norm(merged - ours), torch.linalg.norm(s[1:]), rtol=1e-4, atol=1e-6)  # Eckart-Young


def test_different_module_sets_are_refused_before_writing(lora_family, tmp_path):
    base, adapters = lora_family
    save_lora(base, tmp_path / "qv", target_modules=["q_proj", "v_proj"])
    with pytest.raises(
        CheckpointError,
        match=r"qv: does not adapt 'model.embed_tokens' \(3 modules differ\).*same modules: retrain .*fold the adapters into the base",
    ):
        merge_adapters([adapters[0], tmp_path / "qv"], tmp_path / "out", method="cat")
    assert not (tmp_path / "out").exists()


def test_refusals_name_the_fix(lora_family, tmp_path):
    base, adapters = lora_family
    with pytest.raises(ValueError, match="method linear merges whole weights.*use cat or one of task_arithmetic"):
        merge_adapters(adapters, tmp_path / "out", method="linear")
    with pytest.raises(ValueError, match="unknown merge method 'tie'. Did you mean ties"):
        merge_adapters(adapters, tmp_path / "out", method="tie")
    with pytest.raises(ValueError, match="one finite weight per adapter"):
        merge_adapters(adapters, tmp_path / "out", [1.0])
    save_lora(base, tmp_path / "dora", use_dora=True)
    with pytest.raises(CheckpointError, match="dora: DoRA adapters are not folded here"):
        merge_adapters([adapters[0], tmp_path / "dora"], tmp_path / "out")
    for i in range(2):
        save_lora(base, tmp_path / f"head{i}", seed=10 + i, modules_to_save=["lm_head"])
    out = merge_adapters([tmp_path / "head0", tmp_path / "head1"], tmp_path / "same-head")  # saved heads equal: copied
    assert_expected(_folded(base, out)["lm_head.weight"], state(base)["lm_head.weight"])
    file = tmp_path / "head1" / "adapter_model.safetensors"
    save_file({k: v + 1 if "lm_head" in k else v for k, v in load_file(file).items()}, str(file))  # a trained head
    with pytest.raises(CheckpointError, match="head1: saves whole tensor 'lm_head.weight' .*fold the adapters"):
        merge_adapters([tmp_path / "head0", tmp_path / "head1"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_base_named_differently_or_nan_is_refused(lora_family, tmp_path):
    base, adapters = lora_family
    other = tmp_path / "other"
    save_lora(base, other, seed=5, target_modules=TARGETS)
    config = other / "adapter_config.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | {"base_model_name_or_path": "someone/else"}))
    with pytest.raises(
        CheckpointError, match="other: trained on base 'someone/else', but .*/a on '.*base'.*give it explicitly"
    ):
        merge_adapters([adapters[0], other], tmp_path / "out")
    out = merge_adapters([adapters[0], other], tmp_path / "out", base=str(base))
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base)
    file = other / "adapter_model.safetensors"
    save_file(
        {k: v * float("nan") if "layers.1.self_attn.v_proj.lora_B" in k else v for k, v in load_file(file).items()},
        str(file),
    )
    with pytest.raises(CheckpointError, match="other: LoRA of 'model.layers.1.self_attn.v_proj' holds NaN/inf"):
        merge_adapters([adapters[0], other], tmp_path / "nan", method="ties", base=str(base))
    assert not (tmp_path / "nan").exists()


def test_given_base_the_adapters_do_not_fit_is_refused(lora_family, tmp_path):
    _, adapters = lora_family
    wide = save_tiny_llama(tmp_path / "wide", hidden_size=32)
    with pytest.raises(
        CheckpointError, match=r"LoRA for .* makes shape .* but base .*wide has .*trained on another base"
    ):
        merge_adapters(adapters, tmp_path / "out", base=str(wide))
    assert not (tmp_path / "out").exists()


def test_adapter_whose_config_rank_differs_from_its_tensors_is_refused(lora_family, tmp_path):
    base, adapters = lora_family
    save_lora(base, tmp_path / "r", target_modules=TARGETS)
    config = tmp_path / "r" / "adapter_config.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | {"r": 8}))
    with pytest.raises(
        CheckpointError, match=r"/r: LoRA of .* has rank 8 in adapter_config.json .* but its tensors have rank"
    ):
        merge_adapters([adapters[0], tmp_path / "r"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_output_overlapping_an_input_is_refused_and_nothing_written(lora_family, tmp_path):
    _, adapters = lora_family
    before = {p: p.read_bytes() for a in adapters for p in a.iterdir()}
    for out in (adapters[0], adapters[1] / "merged"):
        with pytest.raises(CheckpointError, match="overlaps input"):
            merge_adapters(adapters, out)
    assert {p: p.read_bytes() for a in adapters for p in a.iterdir()} == before
    assert not any(p.name.startswith(".") for a in adapters for p in a.parent.iterdir())  # no temporary folder left


def test_cli_merges_and_peft_loads_and_generates(lora_family, tmp_path, capsys):
    base, adapters = lora_family
    out = tmp_path / "merged"
    args = [
        "merge-adapters",
        *map(str, adapters),
        "--weights",
        "1",
        "1",
        "--method",
        "ties",
        "--density",
        "0.5",
        "--rank",
        "8",
    ]
    assert main([*args, "--out", str(out)]) == 0
    assert main([*args, "--out", str(adapters[0])]) == 2
    assert "error: output folder" in capsys.readouterr().err
    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base), out)
    _assert_same(model.merge_and_unload().state_dict(), _folded(base, out))
    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base), out)
    tokens = model.generate(torch.tensor([[2, 5, 6]]), max_new_tokens=4, do_sample=False)
    folded = LlamaForCausalLM.from_pretrained(base)
    folded.load_state_dict(_folded(base, out))
    assert torch.equal(tokens, folded.generate(torch.tensor([[2, 5, 6]]), max_new_tokens=4, do_sample=False))
    assert tokens.shape == (1, 7) and tokens[0, :3].tolist() == [2, 5, 6]
