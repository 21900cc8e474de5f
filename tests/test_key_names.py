"""Tensor names compared and written as transformers loads them: prefix, conversion mapping, ignored buffers.

Each pair below differs only by what ``from_pretrained`` renames or drops on load (GPT-2 without its
``transformer.`` prefix, a Gemma3 vision-language model in the transformers 4, 5 and module layouts, a
LoRA on it, Llama's old per-layer ``rotary_emb.inv_freq``, GPT-2's ``attn.bias``/``attn.masked_bias``).
Each merges, equals the merge of the same weights stored under the model's own names, and the output
loads with no missing, unexpected or mismatched keys; a real difference is still refused, naming the
tensors that differ on both sides.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable, Optional

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, Gemma3Config, Gemma3ForConditionalGeneration, GPT2LMHeadModel

from explorer.executor import merge_to_folder
from explorer.io.checkpoint import CheckpointError, check_compatible, open_checkpoint
from explorer.io.keymap import ignored_tensors
from explorer.recipe import MergeRecipe
from tests.helpers import assert_expected
from tests.tiny import save_tiny_gpt2, save_tiny_llama
from tests.tiny_formats import state


def restored(src: Path, dst: Path, rename: Callable[[str], Optional[str]], extra: Optional[dict] = None) -> Path:
    """A copy of checkpoint folder ``src`` whose tensors are stored as ``rename(name)`` (None drops), plus ``extra``."""
    shutil.copytree(src, dst)
    tensors = state(src)
    for f in dst.glob("*.safetensors*"):
        f.unlink()
    out = {rename(k): v for k, v in tensors.items() if rename(k) is not None} | (extra or {})
    save_file({k: v.contiguous() for k, v in out.items()}, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def noisy(src: Path, dst: Path, seed: int, cls=AutoModelForCausalLM) -> Path:
    """A 'fine-tune' of ``src``: every parameter plus seeded noise, saved with save_pretrained."""
    torch.manual_seed(seed)
    model = cls.from_pretrained(src)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    model.save_pretrained(dst)
    return dst


def linear(models: list[Path], base: Optional[Path] = None, method: str = "linear") -> MergeRecipe:
    params = {"lambda": 1.0} if method == "task_arithmetic" else {}
    weight = 1.0 if method == "task_arithmetic" else 0.5  # base + (ft - base) = ft; or the plain average
    return MergeRecipe(
        merge_method=method,
        base_model=str(base) if base else None,
        models=[{"model": str(m), "parameters": {"weight": weight}} for m in models],
        parameters=params,
    )


def loads_cleanly(folder: Path, cls=AutoModelForCausalLM) -> torch.nn.Module:
    """The model at ``folder``, asserting transformers found no missing, unexpected or mismatched key."""
    model, info = cls.from_pretrained(folder, output_loading_info=True)
    assert (info["missing_keys"], info["unexpected_keys"], info["mismatched_keys"]) == (set(), set(), set())
    return model


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    for name in sa:
        assert_expected(sa[name].float(), sb[name].float())


# GPT-2 with and without base_model_prefix ----------------------------------------------------------


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gpt2")
    base = save_tiny_gpt2(root / "base")
    ft = noisy(base, root / "ft", seed=1)
    bare = restored(base, root / "bare", lambda k: k.removeprefix("transformer."))  # as GPT2Model saves it
    return {"base": base, "ft": ft, "bare": bare}


def test_gpt2_without_prefix_opens_under_the_model_names(gpt2):
    bare, base = open_checkpoint(gpt2["bare"]), open_checkpoint(gpt2["base"])
    assert sorted(bare.names()) == sorted(base.names())
    assert all(n.startswith("transformer.") for n in bare.names())
    for name in base.names():
        assert torch.equal(bare.get(name), base.get(name))


@pytest.mark.parametrize("reference", ["bare", "ft"])
def test_gpt2_without_prefix_merges_with_a_prefixed_fine_tune(gpt2, tmp_path, reference):
    """Either as base (the reference whose names are written) or as an expert, with the prefixed fine-tune."""
    if reference == "bare":
        recipe, expected = linear([gpt2["ft"]], base=gpt2["bare"], method="task_arithmetic"), gpt2["ft"]
    else:
        recipe, expected = linear([gpt2["ft"], gpt2["bare"]]), None
    out = merge_to_folder(recipe, tmp_path / "out")
    assert all(k.startswith("transformer.") for k in load_file(out / "model.safetensors"))
    merged = loads_cleanly(out, GPT2LMHeadModel)
    if expected is not None:  # base + 1.0 * (ft - base) = ft
        same_weights(merged, GPT2LMHeadModel.from_pretrained(expected))
    else:
        prefixed = merge_to_folder(linear([gpt2["ft"], gpt2["base"]]), tmp_path / "prefixed")
        same_weights(merged, GPT2LMHeadModel.from_pretrained(prefixed))


# Ignored buffers ------------------------------------------------------------------------------------


def test_gpt2_attn_bias_and_masked_bias_are_ignored_and_listed(gpt2, tmp_path):
    """GPT-2 saved by older transformers: each block's attn.bias mask and attn.masked_bias scalar."""
    extra = {}
    for i in range(2):
        extra[f"transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(64, 64, dtype=torch.uint8)).view(1, 1, 64, 64)
        extra[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    old = restored(gpt2["base"], tmp_path / "old", lambda k: k, extra)
    ckpt = open_checkpoint(old)
    assert sorted(ignored_tensors(ckpt)) == sorted(extra)
    assert not set(extra) & set(ckpt.names())
    out = merge_to_folder(linear([gpt2["ft"]], base=old, method="task_arithmetic"), tmp_path / "out")
    assert not set(extra) & set(load_file(out / "model.safetensors"))
    same_weights(loads_cleanly(out, GPT2LMHeadModel), GPT2LMHeadModel.from_pretrained(gpt2["ft"]))
    card = (out / "README.md").read_text()
    assert "transformer.h.0.attn.masked_bias" in card and "transformer.h.1.attn.bias" in card


def test_llama_rotary_inv_freq_beside_a_model_without_it(tmp_path):
    """An older Llama stores model.layers.N.self_attn.rotary_emb.inv_freq; transformers 5 computes it."""
    base = save_tiny_llama(tmp_path / "base")
    ft = save_tiny_llama(tmp_path / "ft", seed=1, base=base)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 8, 2).float() / 8))
    extra = {f"model.layers.{i}.self_attn.rotary_emb.inv_freq": inv_freq.clone() for i in range(2)}
    old = restored(ft, tmp_path / "old", lambda k: k, extra)
    out = merge_to_folder(linear([old, base]), tmp_path / "out")
    reference = merge_to_folder(linear([ft, base]), tmp_path / "reference")
    assert load_file(out / "model.safetensors").keys() == load_file(reference / "model.safetensors").keys()
    same_weights(loads_cleanly(out), loads_cleanly(reference))
    assert sorted(ignored_tensors(open_checkpoint(old))) == sorted(extra)
    assert "model.layers.1.self_attn.rotary_emb.inv_freq" in (out / "README.md").read_text()  # old is the reference


# A real difference is still refused ---------------------------------------------------------------


def test_a_real_name_difference_is_refused_naming_both_sides(gpt2, tmp_path):
    moved = restored(
        gpt2["ft"], tmp_path / "moved", lambda k: k.replace("h.0.attn.c_attn.weight", "h.0.attn.c_attn2.weight")
    )
    with pytest.raises(CheckpointError) as e:
        check_compatible(open_checkpoint(gpt2["bare"]), [open_checkpoint(moved)])
    assert "transformer.h.0.attn.c_attn.weight" in str(e.value) and "transformer.h.0.attn.c_attn2.weight" in str(
        e.value
    )


def test_a_parameter_the_config_does_not_declare_is_refused_not_ignored(tmp_path):
    """A q_proj bias on a Llama without attention_bias: a declared slot (Linear.bias), a real difference."""
    base = save_tiny_llama(tmp_path / "base")
    biased = restored(base, tmp_path / "biased", lambda k: k, {"model.layers.0.self_attn.q_proj.bias": torch.ones(16)})
    assert ignored_tensors(open_checkpoint(biased)) == ()
    with pytest.raises(CheckpointError, match=r"'model\.layers\.0\.self_attn\.q_proj\.bias'.*is not in"):
        check_compatible(open_checkpoint(base), [open_checkpoint(biased)])


# Gemma3 vision-language model: transformers 4 layout, transformers 5 save, module names -------------------


def tiny_gemma3() -> Gemma3ForConditionalGeneration:
    text = dict(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    vision = dict(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14
    )
    text["head_dim"] = 8
    config = Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=4,
        image_token_index=60,
        boi_token_index=61,
        eoi_token_index=62,
    )
    return Gemma3ForConditionalGeneration(config)


def transformers4_name(name: str) -> str:
    """Gemma3ForConditionalGeneration's names as transformers 4.4x saved them (language_model.model.*)."""
    for new, old in (
        ("model.language_model.", "language_model.model."),
        ("model.vision_tower.", "vision_tower.vision_model."),
        ("model.multi_modal_projector.", "multi_modal_projector."),
    ):
        if name.startswith(new):
            return old + name[len(new) :]
    return name


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gemma3")
    torch.manual_seed(0)
    tiny_gemma3().save_pretrained(root / "base")  # transformers 5 save: language_model.model.*, vision_tower.*
    ft = noisy(root / "base", root / "ft", seed=1, cls=Gemma3ForConditionalGeneration)
    modules = Gemma3ForConditionalGeneration.from_pretrained(ft)
    modules.save_pretrained(root / "ft-modules", save_original_format=False)  # model.language_model.*
    v4 = restored(root / "base", root / "base-v4", lambda k: k)
    names = list(Gemma3ForConditionalGeneration.from_pretrained(root / "base").state_dict())
    weights = Gemma3ForConditionalGeneration.from_pretrained(root / "base").state_dict()
    save_file(
        {transformers4_name(n): weights[n].contiguous() for n in names if n != "lm_head.weight"},
        v4 / "model.safetensors",
        metadata={"format": "pt"},
    )
    return {"base": root / "base", "ft": ft, "ft-modules": root / "ft-modules", "base-v4": v4}


def test_gemma3_layouts_differ_on_disk_but_open_alike(gemma3):
    stored = {k: set(load_file(p / "model.safetensors")) for k, p in gemma3.items()}
    assert len({frozenset(s) for s in stored.values()}) == 3  # three layouts on disk
    assert "language_model.model.layers.0.self_attn.q_proj.weight" in stored["base-v4"]
    assert "vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight" in stored["base-v4"]
    names = {k: sorted(open_checkpoint(p).names()) for k, p in gemma3.items()}
    assert names["base"] == names["ft"] == names["ft-modules"] == names["base-v4"]
    assert names["base"] == sorted(
        n for n in Gemma3ForConditionalGeneration.from_pretrained(gemma3["ft"]).state_dict() if n != "lm_head.weight"
    )


def test_gemma3_layouts_merge_and_the_output_loads(gemma3, tmp_path):
    out = merge_to_folder(
        linear([gemma3["ft-modules"]], base=gemma3["base-v4"], method="task_arithmetic"), tmp_path / "out"
    )
    merged = loads_cleanly(out, Gemma3ForConditionalGeneration)
    same_weights(merged, Gemma3ForConditionalGeneration.from_pretrained(gemma3["ft"]))
    averaged = merge_to_folder(linear([gemma3["ft"], gemma3["base-v4"]]), tmp_path / "avg")
    reference = merge_to_folder(linear([gemma3["ft"], gemma3["base"]]), tmp_path / "ref")
    same_weights(
        loads_cleanly(averaged, Gemma3ForConditionalGeneration),
        loads_cleanly(reference, Gemma3ForConditionalGeneration),
    )


def gemma3_lora(base: Path, dst: Path, transformers4: bool) -> dict[str, torch.Tensor]:
    """A PEFT LoRA (attention + tied embedding, save_embedding_layers=False); PEFT's merged state dict.

    ``transformers4``: its keys renamed to the names a transformers 4 model's modules had.
    """
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(3)
    model = Gemma3ForConditionalGeneration.from_pretrained(base)
    config = LoraConfig(
        r=4, lora_alpha=8, init_lora_weights=False, target_modules=r".*language_model.*\.(q_proj|v_proj|embed_tokens)"
    )
    peft = get_peft_model(model, config)
    peft.save_pretrained(dst, save_embedding_layers=False)
    if transformers4:
        weights = load_file(dst / "adapter_model.safetensors")
        prefix = "base_model.model."
        save_file(
            {prefix + transformers4_name(k.removeprefix(prefix)): v for k, v in weights.items()},
            dst / "adapter_model.safetensors",
        )
    keys = list(load_file(dst / "adapter_model.safetensors"))
    assert any("embed_tokens.lora_embedding_A" in k for k in keys) and not any("base_layer" in k for k in keys)
    assert all(("language_model.model." in k) == transformers4 for k in keys)
    return {k: v.detach().clone() for k, v in peft.merge_and_unload().state_dict().items()}


@pytest.mark.parametrize("transformers4", [True, False])
@pytest.mark.parametrize("base_layout", ["base-v4", "base"])
def test_gemma3_lora_folds_into_a_base_of_another_layout(gemma3, tmp_path, transformers4, base_layout):
    expected = gemma3_lora(gemma3["base"], tmp_path / "adapter", transformers4)
    folded = open_checkpoint(f"{gemma3[base_layout]}+{tmp_path / 'adapter'}")
    assert sorted(folded.names()) == sorted(k for k in expected if k != "lm_head.weight")
    for name in folded.names():
        assert_expected(folded[name], expected[name].float())
    if transformers4:  # PEFT itself loads the renamed adapter onto the model, to the same weights
        from peft import PeftModel

        model = Gemma3ForConditionalGeneration.from_pretrained(gemma3["base"])
        loaded = PeftModel.from_pretrained(model, tmp_path / "adapter").merge_and_unload().state_dict()
        for name in folded.names():
            assert_expected(folded[name], loaded[name].float())
    out = merge_to_folder(linear([f"{gemma3[base_layout]}+{tmp_path / 'adapter'}", gemma3["ft"]]), tmp_path / "out")
    loads_cleanly(out, Gemma3ForConditionalGeneration)


def test_gemma3_lora_that_adapts_another_model_is_still_refused(gemma3, tmp_path):
    gemma3_lora(gemma3["base"], tmp_path / "adapter", transformers4=False)
    weights = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    save_file(
        {k.replace("layers.1.self_attn", "layers.7.self_attn"): v for k, v in weights.items()},
        tmp_path / "adapter" / "adapter_model.safetensors",
    )
    with pytest.raises(
        CheckpointError, match=r"adapts 'model\.language_model\.layers\.7\.self_attn\.(q|v)_proj\.weight'"
    ):
        open_checkpoint(f"{gemma3['base-v4']}+{tmp_path / 'adapter'}")


def test_names_are_left_as_stored_for_a_class_transformers_lacks(tmp_path):
    base = save_tiny_llama(tmp_path / "base")
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "architectures": ["NoSuchForCausalLM"]}))
    ckpt = open_checkpoint(base)
    assert sorted(ckpt.names()) == sorted(state(base))


# A LoRA on a tied base's output embedding, saved with save_embedding_layers=False ------------------------


@pytest.mark.parametrize("model", ["llama", "gemma3"])
def test_lora_on_the_tied_output_embedding_folds_like_peft(gemma3, tmp_path, model):
    """The base stores one tensor for lm_head and the input embedding; PEFT adds the delta to it, still tied."""
    from peft import LoraConfig, get_peft_model

    if model == "llama":
        base, cls = save_tiny_llama(tmp_path / "base", tie_word_embeddings=True), AutoModelForCausalLM
    else:
        base, cls = gemma3["base-v4"], Gemma3ForConditionalGeneration
    torch.manual_seed(4)
    config = LoraConfig(
        r=4, lora_alpha=8, init_lora_weights=False, target_modules=r".*(layers\.0\.self_attn\.q_proj|lm_head)"
    )
    peft = get_peft_model(cls.from_pretrained(base), config)
    peft.save_pretrained(tmp_path / "adapter", save_embedding_layers=False)
    assert any(
        k.startswith("base_model.model.lm_head.lora_A")
        for k in load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    )
    expected = peft.merge_and_unload().state_dict()
    folded = open_checkpoint(f"{base}+{tmp_path / 'adapter'}")
    assert folded.tied_embeddings and "lm_head.weight" not in folded.names()
    for name in folded.names():
        assert_expected(folded[name], expected[name].float())
    out = merge_to_folder(linear([f"{base}+{tmp_path / 'adapter'}", base]), tmp_path / "out")
    merged = loads_cleanly(out, cls)
    assert merged.get_output_embeddings().weight is merged.get_input_embeddings().weight


def test_model_class_facts_are_kept_on_disk_and_read_back_without_building_the_model(gpt2, tmp_path, monkeypatch):
    """A second open of the same kind of checkpoint builds no model class; an unreadable record is redone."""
    from explorer.io import keymap
    from explorer.io.formats import base

    monkeypatch.setenv("MERGE_EXPLORER_FACTS_CACHE", str(tmp_path / "facts"))
    monkeypatch.setattr(base, "_NAMES", {})
    first, names = open_checkpoint(gpt2["bare"]), base.embedding_names(open_checkpoint(gpt2["base"]))
    records = {r: json.loads(r.read_text())["value"] for r in (tmp_path / "facts").glob("*.json")}
    assert sorted(r.name.split("-")[0] for r in records) == ["embeddings", "renaming", "renaming"]
    bare = next(r for r, value in records.items() if r.name.startswith("renaming") and value)  # prefix added

    def refuse(*_):
        raise AssertionError("a model class was built again")

    built = keymap._model_names
    monkeypatch.setattr(keymap, "_model_names", refuse)
    monkeypatch.setattr(base, "empty_model", refuse)
    monkeypatch.setattr(base, "_NAMES", {})
    again = open_checkpoint(gpt2["bare"])
    assert again.names() == first.names() and ignored_tensors(again) == ignored_tensors(first)
    assert base.embedding_names(open_checkpoint(gpt2["base"])) == names
    bare.write_text("{not json")
    monkeypatch.setattr(keymap, "_model_names", built)
    redone = open_checkpoint(gpt2["bare"])
    assert redone.names() == first.names() and json.loads(bare.read_text())["value"] == records[bare]
