"""Malformed files of every format: a clear CheckpointError naming file, tensor and fix at open, nothing written.

Each test builds its broken input from tiny checkpoints (``tests.tiny``, ``tests.tiny_formats``) in
seconds: safetensors headers, config and tokenizer JSON, configs without ``architectures``, empty
checkpoints, GGUF tensor types, LoRA adapters (saved into their base, wrong rank, '+' in the folder
name), and integer tensors beside floating ones.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from explorer.executor import merge_to_folder
from explorer.io.checkpoint import (
    CheckpointError,
    check_compatible,
    open_checkpoint,
    split_adapter_ref,
)
from explorer.io.inputs import compatibility_report
from explorer.recipe import MergeRecipe
from tests.helpers import assert_expected
from tests.tiny import tiny_family, tiny_llama_config
from tests.tiny_formats import llama_with_tokenizer, save_lora, state

Q_PROJ = "model.layers.0.self_attn.q_proj.weight"


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return tiny_family(tmp_path_factory.mktemp("family"), n_experts=2)


def _recipe(models, base=None, method="linear") -> MergeRecipe:
    return MergeRecipe(
        merge_method=method, base_model=str(base) if base else None, models=[{"model": str(m)} for m in models]
    )


def _refused(models, out: Path, match: str, base=None) -> None:
    """The merge of ``models`` raises CheckpointError matching ``match`` and leaves no output folder behind."""
    with pytest.raises(CheckpointError, match=match):
        merge_to_folder(_recipe(models, base), out)
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]


def _copy(src: Path, dst: Path, change=None) -> Path:
    """Copy of checkpoint folder ``src`` with ``change(state_dict)`` applied to its tensors when given."""
    shutil.copytree(src, dst)
    if change is not None:
        tensors = state(src)
        change(tensors)
        save_file(tensors, str(dst / "model.safetensors"))
    return dst


def _edit_json(file: Path, change) -> None:
    data = json.loads(file.read_text())
    change(data)
    file.write_text(json.dumps(data))


def _edit_header(file: Path, change) -> None:
    """Rewrite the JSON header of safetensors ``file`` with ``change(header)`` applied, keeping the data bytes."""
    raw = file.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    change(header)
    text = json.dumps(header).encode()
    file.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])


# B4: safetensors headers -----------------------------------------------------------------------


def test_safetensors_header_not_an_object_refused(family, tmp_path):
    _, experts = family
    bad = _copy(experts[0], tmp_path / "hdr")
    (bad / "model.safetensors").write_bytes(struct.pack("<Q", 5) + b'"abc"')
    with pytest.raises(
        CheckpointError,
        match=r"hdr/model.safetensors: not a readable safetensors file .*not an object.*re-download or re-save",
    ):
        open_checkpoint(bad)
    _refused([bad, experts[1]], tmp_path / "out", r"hdr/model.safetensors: not a readable safetensors file")


HEADER_CASES = {  # case: (q_proj's header entry -> a broken one, what the error says about it)
    "short": (
        lambda e: {**e, "data_offsets": [e["data_offsets"][0], e["data_offsets"][1] - 4]},
        r"has data_offsets \[\d+, \d+\] spanning 1020 bytes, but F32 \[16, 16\] takes 1024",
    ),
    "negative": (
        lambda e: {**e, "data_offsets": [-4, e["data_offsets"][1]]},
        r"has data_offsets \[-4, \d+\], not two non-negative integers",
    ),
    "dtype": (
        lambda e: {**e, "dtype": "Q9"},
        r"has dtype 'Q9', which torch cannot hold \(save it as F16, BF16 or F32\)",
    ),
    "shape": (lambda e: {**e, "shape": [16, "x"]}, r"has shape \[16, 'x'\], not a list of non-negative integers"),
    "entry": (lambda e: [1, 2], r"has an entry that is a JSON list, not an object"),
}


@pytest.mark.parametrize("case", HEADER_CASES)
def test_safetensors_header_entry_checked_at_open(family, tmp_path, case):
    change, match = HEADER_CASES[case]
    _, experts = family
    bad = _copy(experts[0], tmp_path / case)
    _edit_header(bad / "model.safetensors", lambda h: h.update({Q_PROJ: change(h[Q_PROJ])}))
    full = rf"{case}/model.safetensors: tensor '{Q_PROJ}' {match} in the file's header; re-download or re-save the checkpoint"
    with pytest.raises(CheckpointError, match=full):
        open_checkpoint(bad)
    _refused([experts[1], bad], tmp_path / "out", full)


def test_safetensors_offsets_past_the_end_refused(family, tmp_path):
    _, experts = family
    bad = _copy(experts[0], tmp_path / "past")
    _edit_header(bad / "model.safetensors", lambda h: h[Q_PROJ].update(data_offsets=[10**6, 10**6 + 1024]))
    _refused(
        [experts[1], bad],
        tmp_path / "out",
        rf"past/model.safetensors: file is truncated .*tensor '{Q_PROJ}' ends past it.*fetch the file again",
    )


# B5: JSON that is not an object ----------------------------------------------------------------


@pytest.mark.parametrize("text", ["[]", '"llama"', "3"])
def test_config_json_not_an_object_refused(family, tmp_path, text):
    _, experts = family
    bad = _copy(experts[0], tmp_path / "cfg")
    (bad / "config.json").write_text(text)
    _refused(
        [bad, experts[1]],
        tmp_path / "out",
        r"cfg/config.json: holds a JSON \w+ where config.json must be an object .*re-download or re-save",
    )


# B6: config.json without "architectures" -------------------------------------------------------


def test_config_without_architectures_uses_model_type(family, tmp_path):
    base, experts = family
    plain = [_copy(e, tmp_path / f"noarch{i}") for i, e in enumerate(experts)]
    for folder in plain:
        _edit_json(folder / "config.json", lambda c: c.pop("architectures"))
    assert open_checkpoint(plain[0]).architecture == "LlamaForCausalLM"
    for models in (plain, [experts[0], plain[1]]):  # both without, and one with, one without
        out = merge_to_folder(
            _recipe(models, base, "task_arithmetic"), tmp_path / f"out{len(list(tmp_path.iterdir()))}"
        )
        merged, a, b, c = state(out), state(experts[0]), state(experts[1]), state(base)
        assert_expected(merged[Q_PROJ], a[Q_PROJ] + b[Q_PROJ] - c[Q_PROJ])


# B7: tokenizer files ---------------------------------------------------------------------------


def test_invalid_tokenizer_config_named_at_open_and_reported(family, tmp_path):
    _, experts = family
    bad = _copy(experts[0], tmp_path / "tok")
    (bad / "tokenizer_config.json").write_text("{bad")
    match = r"tok/tokenizer_config.json: unreadable tokenizer file tokenizer_config.json \(Expecting property name.*re-download or re-save"
    _refused([experts[1], bad], tmp_path / "out", match)
    report = compatibility_report([experts[1], bad])
    assert report.status.tolist() == ["ok", "unreadable"] and "tok/tokenizer_config.json" in report.message[1]


def test_tokenizer_that_does_not_load_names_folder(tmp_path):
    a = llama_with_tokenizer(tmp_path / "a")
    b = llama_with_tokenizer(tmp_path / "b", seed=1, base=a, added=("<x>",))
    (b / "tokenizer.json").write_text("{}")  # valid JSON the tokenizer loader fails on (KeyError inside transformers)
    _refused([a, b], tmp_path / "out", r"b: the tokenizer does not load \(.*\); re-save the tokenizer")
    assert compatibility_report([a, b]).status.tolist() == ["ok", "incompatible"]


# B8: empty checkpoints and configs in the report -----------------------------------------------


def test_zero_tensor_checkpoint_refused_and_reported(family, tmp_path):
    _, experts = family
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(experts[0] / "config.json", empty)
    (empty / "model.safetensors").write_bytes(struct.pack("<Q", 2) + b"{}")
    with pytest.raises(CheckpointError, match=r"empty: the checkpoint holds no tensors; re-download or re-save"):
        open_checkpoint(empty)
    _refused([experts[1], empty], tmp_path / "out", "holds no tensors")
    report = compatibility_report([experts[1], empty, experts[0]])
    assert report.status.tolist() == ["ok", "unreadable", "ok"] and "holds no tensors" in report.message[1]


def test_report_rows_for_empty_config_and_unreadable_reference(family, tmp_path):
    _, experts = family
    blank = _copy(experts[0], tmp_path / "blank")
    (blank / "config.json").write_text("{}")
    report = compatibility_report([blank, experts[0], experts[1]])
    assert report.status.tolist() == ["unreadable", "ok", "ok"]
    assert "blank: config.json is not a model config" in report.message[0] and report.message[1] == "reference"


# B9: GGUF tensor types the gguf package cannot dequantize --------------------------------------


def _tiny_gguf(path: Path, odd: dict[str, object]) -> Path:
    """A tiny random Llama as a GGUF of F32 tensors (values not permuted: only opening is tested); ``odd``: name -> type."""
    import gguf
    from transformers import LlamaForCausalLM

    config = tiny_llama_config()
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    for name, tensor in LlamaForCausalLM(config).state_dict().items():
        module, _, suffix = name.rpartition(".")
        if name in odd:
            writer.add_tensor(
                f"{names.get_name(module)}.{suffix}", np.zeros(tensor.shape, np.int8), raw_dtype=odd[name]
            )
        else:
            writer.add_tensor(f"{names.get_name(module)}.{suffix}", tensor.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_tensor_type_not_dequantizable_refused_at_open(tmp_path):
    from gguf import GGMLQuantizationType

    plain = _tiny_gguf(tmp_path / "plain.gguf", {})
    assert open_checkpoint(plain).format == "gguf (F32)"
    up = "model.layers.0.mlp.up_proj.weight"
    bad = _tiny_gguf(tmp_path / "i8.gguf", {up: GGMLQuantizationType.I8})
    match = rf"i8.gguf: tensor '{up}' \(GGUF 'blk.0.ffn_up.weight'\) has type I8, which the gguf package cannot dequantize; re-export .*Q8_0"
    with pytest.raises(CheckpointError, match=match):
        open_checkpoint(bad)
    _refused([plain, bad], tmp_path / "out", match)
    assert compatibility_report([plain, bad]).status.tolist() == ["ok", "unreadable"]


# B10, B11, B13: LoRA adapters -------------------------------------------------------------------


def test_adapter_saved_into_its_base_folder_refused(family, tmp_path):
    base, experts = family
    both = _copy(base, tmp_path / "both")
    save_lora(both, both)
    match = r"both: holds a full model and a LoRA adapter whose base_model_name_or_path is this same folder; move adapter_config.json and adapter_model.\*"
    with pytest.raises(CheckpointError, match=match):
        open_checkpoint(both)
    _refused([both, experts[1]], tmp_path / "out", match)


def test_adapters_whose_bases_loop_refused(family, tmp_path):
    base, experts = family
    for name, other in (("a", "b"), ("b", "a")):
        save_lora(base, tmp_path / name)
        config = tmp_path / name / "adapter_config.json"
        config.write_text(
            json.dumps(json.loads(config.read_text()) | {"base_model_name_or_path": str(tmp_path / other)})
        )
    match = r"a: the adapters' base models loop \(.*/a -> .*/b -> .*/a\); set base_model_name_or_path"
    with pytest.raises(CheckpointError, match=match):
        open_checkpoint(tmp_path / "a")
    _refused([tmp_path / "a", experts[1]], tmp_path / "out", match)


@pytest.mark.parametrize(
    "config, module, ranks",
    [
        ({"r": 8}, "q_proj", "rank 8 .* rank 4"),
        ({"rank_pattern": {"v_proj": 2}}, "v_proj", "rank 2 .* rank 4"),
    ],
)
def test_adapter_rank_differs_from_its_tensors_refused(family, tmp_path, config, module, ranks):
    base, _ = family
    adapter = tmp_path / "adapter"
    save_lora(base, adapter, target_modules=["q_proj", "v_proj"])
    _edit_json(adapter / "adapter_config.json", lambda c: c.update(config))
    match = rf"adapter: LoRA of 'model.layers.0.self_attn.{module}' has {ranks} \(lora_A \[4, 16\], lora_B \[16, 4\]\); fix r / rank_pattern"
    with pytest.raises(CheckpointError, match=match):
        open_checkpoint(adapter)
    _refused([adapter], tmp_path / "out", match)


def test_split_adapter_ref_with_plus_in_folder_names(family, tmp_path, monkeypatch):
    base, experts = family
    adapter = tmp_path / "lora+v2"
    expected = save_lora(base, adapter)
    ref = f"{base}+{adapter}"
    assert split_adapter_ref(ref) == (str(base), str(adapter))
    assert_expected(open_checkpoint(ref).get(Q_PROJ), expected[Q_PROJ])
    monkeypatch.chdir(tmp_path)
    save_lora(base, tmp_path / "v2")  # "v2" now also qualifies after the last '+', but its left side names no model
    assert split_adapter_ref(ref) == (str(base), str(adapter))
    assert split_adapter_ref(f"{ref}+v2") == (ref, "v2")  # an adapter on BASE+ADAPTER
    assert split_adapter_ref(str(adapter)) is None  # an existing path names itself
    assert split_adapter_ref(f"{base}+nothing") is None and split_adapter_ref("plain") is None
    out = merge_to_folder(_recipe([ref, experts[0]]), tmp_path / "out")
    assert_expected(state(out)[Q_PROJ], (expected[Q_PROJ] + state(experts[0])[Q_PROJ]) / 2)


# B3: integer or bool tensors beside floating ones ------------------------------------------------


@pytest.mark.parametrize("dtype, name", [(torch.int8, "I8"), (torch.bool, "BOOL")])
def test_integer_tensor_beside_float_refused(family, tmp_path, dtype, name):
    base, experts = family
    codes = _copy(
        experts[0],
        tmp_path / "codes",
        lambda t: t.update({Q_PROJ: (t[Q_PROJ] * 1000).round().clamp(-127, 127).to(dtype)}),
    )
    match = (
        rf"codes: tensor '{Q_PROJ}' is {name} but .*expert1 has it as F32; .*dequantize the quantized checkpoint first"
    )
    _refused([experts[1], codes], tmp_path / "out", match)
    match = rf"expert1: tensor '{Q_PROJ}' is F32 but .*codes has it as {name}"
    _refused([codes, experts[1]], tmp_path / "out", match)


def test_float8_float16_bfloat16_float32_mix_accepted(family, tmp_path):
    base, experts = family
    f8 = _copy(experts[0], tmp_path / "f8", lambda t: t.update({Q_PROJ: t[Q_PROJ].to(torch.float8_e4m3fn)}))
    half = _copy(experts[1], tmp_path / "half", lambda t: t.update({k: v.half() for k, v in t.items()}))
    brain = _copy(base, tmp_path / "brain", lambda t: t.update({k: v.bfloat16() for k, v in t.items()}))
    ckpts = [open_checkpoint(p) for p in (base, f8, half, brain)]
    assert {c.dtype(Q_PROJ) for c in ckpts} == {"F32", "F8_E4M3", "F16", "BF16"}
    assert Q_PROJ in check_compatible(ckpts[0], ckpts[1:])
    out = merge_to_folder(_recipe([f8, half, brain]), tmp_path / "out")
    expected = sum(state(p)[Q_PROJ].float() for p in (f8, half, brain)) / 3
    assert_expected(state(out)[Q_PROJ], expected)
