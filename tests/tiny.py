"""Tiny checkpoints made on the fly: a Llama base and experts that are the base plus known deltas."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

# The sizes of every tiny decoder in the tests (Llama, Mistral, a composite model's text config).
TINY_DECODER = dict(
    vocab_size=64,
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=2,
    max_position_embeddings=64,
    tie_word_embeddings=False,
)


def tiny_llama_config(**overrides) -> LlamaConfig:
    return LlamaConfig(**{**TINY_DECODER, **overrides})


def save_tiny_llama(path: Path, seed: int = 0, base: Path | None = None, scale: float = 0.02, **overrides) -> Path:
    """A tiny LlamaForCausalLM at ``path``: fresh from ``seed``, or ``base`` plus seeded noise * scale."""
    torch.manual_seed(seed)
    if base is None:
        model = LlamaForCausalLM(tiny_llama_config(**overrides))
    else:
        model = LlamaForCausalLM.from_pretrained(base)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(scale * torch.randn_like(p))
    model.save_pretrained(path)
    return path


def save_tiny_gpt2(path: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2, n_positions=64)).save_pretrained(path)
    return path


def tiny_family(root: Path, n_experts: int = 2) -> tuple[Path, list[Path]]:
    """A base and ``n_experts`` experts fine-tuned from it (base + noise), under ``root``."""
    base = save_tiny_llama(root / "base")
    experts = [save_tiny_llama(root / f"expert{i}", seed=i + 1, base=base) for i in range(n_experts)]
    return base, experts
