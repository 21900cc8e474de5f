"""Build the demo zoo: a tiny Llama base and experts fine-tuned from it, really trained on CPU.

``python -m explorer.zoo OUT`` writes

- ``OUT/base``: a character-level ``LlamaForCausalLM`` pre-trained on Python's own documentation
  (``pydoc_data.topics``, ~465k characters of English);
- ``OUT/expert-add``, ``OUT/expert-reverse``, ``OUT/expert-upper``: full fine-tunes of the base, each on
  one synthetic task (see ``explorer.zoo_tasks``), with a ``zoo_info.json`` (task, number of training
  examples, steps, final train loss: what FedAvg weighting needs);
- ``OUT/tasks``: one offline lm-eval task per expert (``zoo_add``, ``zoo_reverse``, ``zoo_upper``).

Every checkpoint is a normal Hugging Face folder (float32 safetensors, tokenizer, generation config).
Seeds are fixed, so a rebuild on the same machine gives the same weights. The real-model path
(``--smollm2``, ``--smollm2-expert``) lives in ``explorer.zoo_smollm2``.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import json
import math
import shutil
import string
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from pydoc_data.topics import topics
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from explorer.zoo_tasks import Example, TaskSplit, make_tasks, write_task

Progress = Callable[[float, str], None]

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]
CHARS = [c for c in string.printable if c not in "\r\x0b\x0c"]  # printable ASCII, space, \t, \n
EXPERT_TASKS = ("add", "reverse", "upper")


@dataclass(frozen=True)
class ZooConfig:
    """Sizes and training settings of the demo zoo (defaults: ~0.7M parameters, ~2 CPU minutes)."""

    seed: int = 0  # fixes initialisation, batches and task splits
    hidden_size: int = 128  # model width
    num_layers: int = 4  # decoder blocks
    num_heads: int = 4  # attention heads (head size 32)
    intermediate_size: int = 256  # MLP width
    max_positions: int = 256  # context length the model supports
    base_steps: int = 300  # pre-training steps on pydoc text
    base_lr: float = 3e-3  # peak AdamW learning rate of pre-training
    base_batch: int = 16  # sequences per pre-training step
    block_size: int = 128  # characters per pre-training sequence
    expert_steps: int = 150  # fine-tuning steps per expert
    expert_lr: float = 1e-3  # peak AdamW learning rate of fine-tuning
    expert_batch: int = 32  # examples per fine-tuning step
    n_heldout: int = 150  # held-out eval examples per task
    n_train: dict[str, int] = field(  # training examples per task (differ, for FedAvg demos)
        default_factory=lambda: {"add": 4000, "reverse": 3000, "upper": 2000}
    )


def build_tokenizer(max_length: int = 256) -> PreTrainedTokenizerFast:
    """A character-level tokenizer over printable ASCII plus ``<pad> <s> </s> <unk>``.

    Every character is one token (a ``WordLevel`` model behind a split-every-character
    pre-tokenizer); the ``Fuse`` decoder joins them back, so ``decode(encode(s)) == s`` for ASCII.
    No special tokens are added on encode.
    """
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=max_length,
        clean_up_tokenization_spaces=False,
    )


def build_base_model(tokenizer: PreTrainedTokenizerBase, cfg: ZooConfig) -> LlamaForCausalLM:
    """A freshly initialised tiny Llama (untied ``lm_head``) seeded by ``cfg.seed``, in float32."""
    torch.manual_seed(cfg.seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_positions,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return LlamaForCausalLM(config).float()


def pydoc_text() -> str:
    """Python's documentation topics (``pydoc_data.topics``) as one English text, in key order."""
    return "\n\n".join(topics[k] for k in sorted(topics))


def _lr(step: int, steps: int, peak: float, warmup: int = 20) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay from ``peak`` to ``peak / 10``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * t)))


def _train(
    model: PreTrainedModel,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    steps: int,
    lr: float,
    progress: Callable[[int], None] | None = None,
) -> list[float]:
    """Run ``steps`` AdamW steps of next-token loss over ``(input_ids, attention_mask, labels)``.

    Returns:
        The loss of every step.
    """
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.95))
    losses = []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = _lr(step, steps, lr)
        input_ids, attention_mask, labels = next(batches)
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if progress:
            progress(step)
    model.eval()
    return losses


def text_batches(
    ids: torch.Tensor, block_size: int, batch_size: int, seed: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Endless random windows of ``block_size`` tokens from the 1-D token tensor ``ids``."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        starts = torch.randint(0, len(ids) - block_size, (batch_size,), generator=gen)
        x = torch.stack([ids[s : s + block_size] for s in starts.tolist()])  # (B, T)
        yield x, torch.ones_like(x), x


def encode_example(tokenizer: PreTrainedTokenizerBase, ex: Example) -> tuple[list[int], list[int]]:
    """Token ids of ``prompt + answer + eos`` and labels that score only ``answer + eos``.

    The whole string is encoded at once and the prompt's token count masks the labels, as lm-eval
    does when it scores a continuation.
    """
    ids = tokenizer(ex.prompt + ex.answer)["input_ids"] + [tokenizer.eos_token_id]
    n_prompt = len(tokenizer(ex.prompt)["input_ids"])
    return ids, [-100] * n_prompt + ids[n_prompt:]


def example_batches(
    tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example], batch_size: int, seed: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Endless right-padded batches of ``examples``, reshuffled every epoch."""
    encoded = [encode_example(tokenizer, ex) for ex in examples]
    gen = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(encoded), generator=gen).tolist()
        for i in range(0, len(order) - batch_size + 1, batch_size):
            rows = [encoded[j] for j in order[i : i + batch_size]]
            width = max(len(ids) for ids, _ in rows)
            pad = tokenizer.pad_token_id
            input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in rows])
            labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in rows])
            yield input_ids, (input_ids != pad).long(), labels


def finetune(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    progress: Callable[[int], None] | None = None,
) -> float:
    """Fully fine-tune ``model`` in place on prompt/answer ``examples`` (loss on answers only).

    Returns:
        The final train loss: the mean loss of the last 10 steps.
    """
    torch.manual_seed(seed)
    batches = example_batches(tokenizer, examples, batch_size, seed)
    losses = _train(model, batches, steps, lr, progress)
    return sum(losses[-10:]) / len(losses[-10:])


def save_checkpoint(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    out: Path,
    info: dict | None = None,
) -> Path:
    """Save a float32 safetensors checkpoint with tokenizer and generation config to ``out``.

    Writes into ``out.partial`` first and renames it when complete, replacing any old ``out``;
    ``info`` (if given) goes to ``zoo_info.json``.
    """
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.to(torch.float32).save_pretrained(tmp, safe_serialization=True)
    model.generation_config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if info is not None:
        (tmp / "zoo_info.json").write_text(json.dumps(info, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


@contextmanager
def _stage(name: str, timings: dict[str, float]) -> Iterator[None]:
    """Time a build stage, print it and record its seconds in ``timings[name]``."""
    start = time.perf_counter()
    yield
    timings[name] = time.perf_counter() - start
    print(f"[zoo] {name}: {timings[name]:.1f}s", flush=True)


def _sub_progress(progress: Progress | None, lo: float, hi: float, steps: int, msg: str):
    """Map step ``i`` of ``steps`` onto the fraction range ``[lo, hi]`` of ``progress``."""
    if progress is None:
        return None
    every = max(1, steps // 20)

    def report(step: int) -> None:
        if step % every == 0 or step == steps - 1:
            progress(lo + (hi - lo) * (step + 1) / steps, f"{msg} step {step + 1}/{steps}")

    return report


def _train_expert(
    base: Path, split: TaskSplit, cfg: ZooConfig, out: Path, progress
) -> dict[str, object]:
    """Fine-tune a copy of the base checkpoint at ``base`` on ``split``; save it to ``out``."""
    model = LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(base)
    loss = finetune(
        model, tokenizer, split.train, cfg.expert_steps, cfg.expert_lr, cfg.expert_batch,
        cfg.seed, progress,
    )
    info = {
        "task": split.name,
        "lm_eval_task": f"zoo_{split.name}",
        "n_train_examples": len(split.train),
        "steps": cfg.expert_steps,
        "batch_size": cfg.expert_batch,
        "learning_rate": cfg.expert_lr,
        "final_train_loss": round(loss, 6),
        "base": "base",
    }
    save_checkpoint(model, tokenizer, out, info)
    return info


def build_zoo(out_dir: Path, progress: Progress | None = None, cfg: ZooConfig | None = None) -> Path:
    """Build the demo zoo into ``out_dir`` (see the module docstring) and return ``out_dir``.

    Args:
        out_dir: target folder; created if missing. Existing zoo folders in it are replaced.
        progress: optional ``callable(fraction, message)`` told about each stage and step.
        cfg: sizes and training settings; ``ZooConfig()`` if omitted.
    """
    cfg = cfg or ZooConfig()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))
    timings: dict[str, float] = {}
    report = progress or (lambda fraction, message: None)
    text = pydoc_text()
    tokenizer = build_tokenizer(cfg.max_positions)

    with _stage("tasks", timings):
        splits = make_tasks(text, cfg.n_train, cfg.n_heldout, cfg.seed)
        for split in splits.values():
            write_task(out_dir / "tasks", split)
    report(0.02, "wrote tasks")

    with _stage("base", timings):
        model = build_base_model(tokenizer, cfg)
        ids = torch.tensor(tokenizer(text)["input_ids"])
        batches = text_batches(ids, cfg.block_size, cfg.base_batch, cfg.seed)
        step_report = _sub_progress(progress, 0.02, 0.5, cfg.base_steps, "pre-training base")
        losses = _train(model, batches, cfg.base_steps, cfg.base_lr, step_report)
        base_info = {"pretrain_text": "pydoc_data.topics", "n_chars": len(text),
                     "steps": cfg.base_steps, "final_train_loss": round(sum(losses[-10:]) / 10, 6)}
        save_checkpoint(model, tokenizer, out_dir / "base", base_info)

    for i, name in enumerate(EXPERT_TASKS):
        lo = 0.5 + 0.5 * i / len(EXPERT_TASKS)
        hi = 0.5 + 0.5 * (i + 1) / len(EXPERT_TASKS)
        with _stage(f"expert-{name}", timings):
            step_report = _sub_progress(progress, lo, hi, cfg.expert_steps, f"expert-{name}")
            _train_expert(out_dir / "base", splits[name], cfg, out_dir / f"expert-{name}", step_report)

    total = sum(timings.values())
    print(f"[zoo] total: {total:.1f}s -> {out_dir}", flush=True)
    report(1.0, f"zoo built in {total:.0f}s")
    (out_dir / "zoo_config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    return out_dir
