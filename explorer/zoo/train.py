"""Training pieces of the demo zoo: char tokenizer, tiny Llama, pre-training, fine-tuning, saving.

Everything runs on CPU in float32 and is seeded, so the same settings give the same weights on the
same machine.
"""

from __future__ import annotations

import json
import shutil
import string
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from pydoc_data.topics import topics

import torch
import torch.nn.functional as F
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    get_cosine_with_min_lr_schedule_with_warmup,
)

from explorer.zoo.tasks import Example

Progress = Callable[[float, str], None]  # progress(fraction in [0, 1], message)
Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # input_ids, attention_mask, labels: (B, T)
LossFn = Callable[[PreTrainedModel, Batch], torch.Tensor]  # (model, batch) -> scalar loss
Schedule = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]
WARMUP_STEPS = 20  # the tiny zoo's linear warm-up (pre-training and fine-tuning)
MIN_LR_RATE = 0.1  # its final learning rate as a share of the peak

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]
CHARS = [c for c in string.printable if c not in "\r\x0b\x0c"]  # printable ASCII, space, \t, \n


@dataclass(frozen=True)
class ZooConfig:
    """Sizes and training settings of the demo zoo (defaults: ~0.7M parameters, ~2 CPU minutes)."""

    seed: int = 0  # fixes initialisation, batches and task splits
    num_threads: int = 1  # torch CPU threads while building: same sums on any core count, and
    # tiny matmuls gain little from more threads but lose a lot when other processes compete
    hidden_size: int = 128  # model width
    num_layers: int = 4  # decoder blocks
    num_heads: int = 4  # attention heads (head size 32)
    intermediate_size: int = 256  # MLP width
    max_positions: int = 256  # context length the model supports
    base_steps: int = 300  # pre-training steps on pydoc text
    base_lr: float = 3e-3  # peak AdamW learning rate of pre-training
    base_batch: int = 8  # sequences per pre-training step
    block_size: int = 128  # characters per pre-training sequence
    expert_steps: int = 400  # fine-tuning steps per expert
    expert_lr: float = 3e-3  # peak AdamW learning rate of fine-tuning
    expert_batch: int = 64  # examples per fine-tuning step
    n_heldout: int = 150  # held-out eval examples per task
    n_train: dict[str, int] = field(  # distinct training examples per task (differ: FedAvg demos)
        default_factory=lambda: {"add": 2800, "reverse": 4000, "upper": 1200}
    )


def build_tokenizer(max_length: int = 256) -> PreTrainedTokenizerFast:
    """A character-level tokenizer over printable ASCII plus ``<pad> <s> </s> <unk>``.

    Every character is one token (a ``WordLevel`` model behind a split-every-character
    pre-tokenizer); the ``Fuse`` decoder joins them back, so ``decode(encode(s)) == s`` for ASCII.
    Other characters become ``<unk>``. No special tokens are added on encode.
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


def cosine_schedule(steps: int, warmup: int = WARMUP_STEPS, min_lr_rate: float = MIN_LR_RATE) -> Schedule:
    """Linear warm-up over ``warmup`` steps, then cosine decay to ``min_lr_rate`` x peak (defaults: the tiny zoo's).

    transformers' ``get_cosine_with_min_lr_schedule_with_warmup`` over ``steps`` optimizer steps.
    """
    return lambda opt: get_cosine_with_min_lr_schedule_with_warmup(opt, warmup, steps, min_lr_rate=min_lr_rate)


def lm_loss(model: PreTrainedModel, batch: Batch) -> torch.Tensor:
    """The model's own next-token loss on ``batch`` (mean over the labelled tokens)."""
    input_ids, attention_mask, labels = batch
    return model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss


def answer_loss(model: PreTrainedModel, batch: Batch) -> torch.Tensor:
    """``lm_loss`` with the output layer applied only where a label is set.

    Hidden states ``(B, T, H)`` -> the ``K`` positions whose next token is labelled ``(K, H)`` ->
    logits ``(K, V)`` -> mean cross-entropy: the same value as ``lm_loss``, without the
    ``(B, T, V)`` logits. On SmolLM2-135M (V = 49,152) with ~4 labelled of ~13 tokens per example
    a training step takes ~20% less time.
    """
    input_ids, attention_mask, labels = batch
    hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask)
    targets = labels[:, 1:]  # (B, T-1): the token after each position
    keep = targets != -100  # (B, T-1)
    logits = model.get_output_embeddings()(hidden.last_hidden_state[:, :-1][keep])  # (K, V)
    return F.cross_entropy(logits.float(), targets[keep])


def train_steps(
    model: PreTrainedModel,
    batches: Iterator[Batch],
    steps: int,
    lr: float,
    on_step: Callable[[int], None] | None = None,
    *,
    loss_fn: LossFn = lm_loss,
    schedule: Schedule | None = None,
    fused: bool = False,
) -> list[float]:
    """Run ``steps`` AdamW steps (gradient norm clipped to 1) of ``loss_fn`` on ``batches``.

    Args:
        model: trained in place.
        batches: endless ``(input_ids, attention_mask, labels)`` batches, each ``(B, T)``.
        steps: optimizer steps.
        lr: peak learning rate.
        on_step: called with the step index after every step.
        loss_fn: ``(model, batch) -> scalar``; ``lm_loss`` or ``answer_loss``.
        schedule: makes the learning-rate scheduler from the optimizer (e.g. a
            ``transformers.get_*_schedule_with_warmup``), stepped after every step; ``None``:
            ``cosine_schedule(steps)``.
        fused: use the fused AdamW kernel (faster on CPU for large models; other rounding).

    Returns:
        The loss of every step. The model is left in eval mode.
    """
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.95), fused=fused or None)
    scheduler = (schedule or cosine_schedule(steps))(opt)
    losses = []
    for step in range(steps):
        loss = loss_fn(model, next(batches))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        scheduler.step()
        losses.append(loss.item())
        if on_step:
            on_step(step)
    model.eval()
    return losses


def final_loss(losses: Sequence[float], last: int = 10) -> float:
    """The mean of the last ``last`` losses: a less noisy "final train loss"."""
    tail = losses[-last:]
    return sum(tail) / len(tail)


def text_batches(ids: torch.Tensor, block_size: int, batch_size: int, seed: int) -> Iterator[Batch]:
    """Endless random windows of ``block_size`` tokens from the 1-D token tensor ``ids``."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        starts = torch.randint(0, len(ids) - block_size, (batch_size,), generator=gen)
        x = torch.stack([ids[s : s + block_size] for s in starts.tolist()])  # (B, T)
        yield x, torch.ones_like(x), x


def encode_example(tokenizer: PreTrainedTokenizerBase, ex: Example) -> tuple[list[int], list[int]]:
    """Token ids of ``prompt + answer + eos`` and labels that score only ``answer + eos``.

    The whole string is encoded at once and the prompt's own token count masks the labels: the
    split lm-eval uses when it scores a continuation.
    """
    ids = tokenizer(ex.prompt + ex.answer)["input_ids"] + [tokenizer.eos_token_id]
    n_prompt = len(tokenizer(ex.prompt)["input_ids"])
    return ids, [-100] * n_prompt + ids[n_prompt:]


def example_batches(
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    batch_size: int,
    seed: int,
) -> Iterator[Batch]:
    """Endless right-padded batches of ``examples``, reshuffled every epoch."""
    encoded = [encode_example(tokenizer, ex) for ex in examples]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    gen = torch.Generator().manual_seed(seed)
    batch_size = min(batch_size, len(encoded))
    while True:
        order = torch.randperm(len(encoded), generator=gen).tolist()
        for i in range(0, len(order) - batch_size + 1, batch_size):
            rows = [encoded[j] for j in order[i : i + batch_size]]
            width = max(len(ids) for ids, _ in rows)
            input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in rows])
            mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows])
            labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in rows])
            yield input_ids, mask, labels


def finetune(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    on_step: Callable[[int], None] | None = None,
    **train_options,
) -> float:
    """Fully fine-tune ``model`` in place on prompt/answer ``examples`` (loss on answers only).

    ``train_options`` (``loss_fn``, ``schedule``, ``fused``) go to ``train_steps``.

    Returns:
        The final train loss (mean of the last 10 steps).
    """
    torch.manual_seed(seed)
    batches = example_batches(tokenizer, examples, batch_size, seed)
    return final_loss(train_steps(model, batches, steps, lr, on_step, **train_options))


def save_checkpoint(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    out: Path,
    info: dict | None = None,
) -> Path:
    """Save a float32 safetensors checkpoint with tokenizer and generation config to ``out``.

    Writes the hidden ``.<name>.partial-build`` first and renames it when complete, replacing an
    older ``out``, so a failed build never leaves a folder that looks finished (``discover`` skips
    hidden folders, ``open_checkpoint`` refuses ``.partial-`` ones). ``info`` goes to
    ``zoo_info.json``.
    """
    tmp = out.with_name(f".{out.name}.partial-build")
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
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` torch CPU threads, restoring the previous count afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextmanager
def timed(name: str, timings: dict[str, float]) -> Iterator[None]:
    """Time a build stage, print its seconds and record them in ``timings[name]``."""
    start = time.perf_counter()
    yield
    timings[name] = time.perf_counter() - start
    print(f"[zoo] {name}: {timings[name]:.1f}s", flush=True)


def step_reporter(
    progress: Progress | None, lo: float, hi: float, steps: int, message: str
) -> Callable[[int], None] | None:
    """An ``on_step`` callback mapping step ``i`` of ``steps`` onto ``[lo, hi]`` of ``progress``."""
    if progress is None:
        return None
    every = max(1, steps // 20)

    def report(step: int) -> None:
        if step % every == 0 or step == steps - 1:
            progress(
                lo + (hi - lo) * (step + 1) / steps,
                f"{message}: step {step + 1}/{steps}",
            )

    return report
