"""Tiny inputs in every supported format, made on the fly: tokenizers, .bin, LoRA, Trainer runs, hub cache."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from tests.tiny import save_tiny_llama

SPECIALS = ["[UNK]", "[PAD]", "<s>", "</s>"]


def state(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors checkpoint folder (single or sharded)."""
    return {k: v for f in sorted(path.glob("*.safetensors")) for k, v in load_file(f).items()}


def save_tokenizer(path: Path, size: int = 64, added: tuple[str, ...] = ()) -> PreTrainedTokenizerFast:
    """A word-level tokenizer of ``size`` tokens (4 specials + w0, w1, ...) plus ``added`` tokens, saved to ``path``."""
    vocab = {t: i for i, t in enumerate(SPECIALS + [f"w{i}" for i in range(size - len(SPECIALS))])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", bos_token="<s>", eos_token="</s>"
    )
    tok.add_tokens(list(added))
    tok.save_pretrained(path)
    return tok


def llama_with_tokenizer(
    path: Path,
    seed: int = 0,
    base: Path | None = None,
    added: tuple[str, ...] = (),
    pad_to: int | None = None,
    **overrides,
) -> Path:
    """A tiny Llama with a 64-token tokenizer plus ``added`` tokens; embeddings resized to fit (padded to ``pad_to`` rows)."""
    save_tiny_llama(path, seed=seed, base=base, **overrides)
    tok = save_tokenizer(path, added=added)
    rows = pad_to or len(tok)
    if rows != 64:
        model = LlamaForCausalLM.from_pretrained(path)
        torch.manual_seed(seed + 100)
        model.resize_token_embeddings(rows, mean_resizing=False)
        with torch.no_grad():
            model.get_input_embeddings().weight[64:].normal_(0, 0.02)
            if model.get_output_embeddings().weight is not model.get_input_embeddings().weight:
                model.get_output_embeddings().weight[64:].normal_(0, 0.02)
        model.save_pretrained(path)
    return path


def to_bin(src: Path, dst: Path, shards: int = 1) -> Path:
    """Copy of checkpoint ``src`` with its weights as pytorch_model.bin (or ``shards`` .bin files + index)."""
    dst.mkdir(parents=True)
    (dst / "config.json").write_text((src / "config.json").read_text())
    tensors = state(src)
    if shards == 1:
        torch.save(tensors, dst / "pytorch_model.bin")
        return dst
    names = list(tensors)
    weight_map = {}
    for i in range(shards):
        file = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {n: tensors[n] for n in names[i::shards]}
        torch.save(part, dst / file)
        weight_map |= {n: file for n in part}
    (dst / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dst


def save_sharded(tensors: dict[str, torch.Tensor], config_from: Path, dst: Path, shards: int = 2) -> Path:
    """``tensors`` as ``shards`` safetensors files + index in ``dst`` with ``config_from``'s config."""
    dst.mkdir(parents=True)
    (dst / "config.json").write_text((config_from / "config.json").read_text())
    names, weight_map = list(tensors), {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n].contiguous() for n in names[i::shards]}, str(dst / file))
        weight_map |= {n: file for n in names[i::shards]}
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dst


def save_lora(base: Path, dst: Path, seed: int = 0, **config) -> dict[str, torch.Tensor]:
    """A PEFT LoRA adapter on ``base`` with random (nonzero) A and B; returns PEFT's own merged state dict."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    settings = {
        "r": 4,
        "lora_alpha": 8,
        "target_modules": ["q_proj", "v_proj", "down_proj"],
        "init_lora_weights": False,
    }
    settings.update(config)
    model = get_peft_model(LlamaForCausalLM.from_pretrained(base), LoraConfig(**settings))
    model.save_pretrained(dst)
    return {k: v.detach().clone() for k, v in model.merge_and_unload().state_dict().items()}


def trainer_run(root: Path, base: Path, steps: tuple[int, ...] = (10, 20, 30)) -> Path:
    """A Trainer-style run folder: checkpoint-STEP/ model folders with trainer_state.json (loss = 3 / step)."""
    history = [{"step": s, "loss": 3.0 / s, "epoch": s / 10} for s in steps] + [
        {"step": s, "eval_loss": 4.0 / s} for s in steps[1:]
    ]
    for i, step in enumerate(steps):
        folder = save_tiny_llama(root / f"checkpoint-{step}", seed=50 + i, base=base)
        logged = [h for h in history if h["step"] <= step]
        (folder / "trainer_state.json").write_text(
            json.dumps({"global_step": step, "epoch": step / 10, "log_history": logged})
        )
        (folder / "training_args.bin").write_bytes(b"not weights")
    return root


def hub_cache(cache: Path, repo_id: str, src: Path, commit: str = "0" * 40) -> Path:
    """Lay out ``src``'s files as the hub cache does (blobs + symlinked snapshot + refs/main); returns the snapshot."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for i, file in enumerate(sorted(src.iterdir())):
        blob = repo / "blobs" / f"blob{i}"
        blob.write_bytes(file.read_bytes())
        os.symlink(os.path.relpath(blob, snapshot), snapshot / file.name)
    return snapshot
