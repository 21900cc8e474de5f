"""Build the demo zoo: a tiny Llama base and experts fine-tuned from it, really trained on CPU.

``python -m explorer.zoo OUT`` writes

- ``OUT/base``: a character-level ``LlamaForCausalLM`` (~0.7M parameters, untied ``lm_head``)
  pre-trained on Python's own documentation (``pydoc_data.topics``, ~465k characters of English);
- ``OUT/expert-add``, ``OUT/expert-reverse``, ``OUT/expert-upper``: full fine-tunes of the base,
  each on one synthetic task (``explorer.zoo.tasks``), with a ``zoo_info.json`` (task, number of
  training examples, steps, final train loss: what FedAvg weighting needs);
- ``OUT/tasks``: one offline lm-eval task per expert (``zoo_add``, ``zoo_reverse``, ``zoo_upper``);
- ``OUT/zoo_config.json``: the settings used.

Every checkpoint is a normal Hugging Face folder (float32 safetensors, tokenizer, generation
config). Seeds are fixed: a rebuild on the same machine gives the same weights.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
from dataclasses import asdict
from pathlib import Path

import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from explorer.zoo.tasks import TASK_PREFIX, TaskSplit, make_tasks, write_task
from explorer.zoo.train import (
    Progress,
    ZooConfig,
    build_base_model,
    build_tokenizer,
    final_loss,
    finetune,
    pydoc_text,
    save_checkpoint,
    step_reporter,
    text_batches,
    timed,
    torch_threads,
    train_steps,
)

__all__ = [
    "EXPERT_TASKS",
    "ZooConfig",
    "build_zoo",
    "zoo_is_built",
]

# expert-<task> folders and zoo_<task> lm-eval tasks
EXPERT_TASKS = ("add", "reverse", "upper")
BASE_SHARE = 0.5  # share of the progress bar given to pre-training


def _pretrain_base(out: Path, text: str, cfg: ZooConfig, progress: Progress | None) -> Path:
    """Pre-train the tiny base on ``text`` and save it to ``out``."""
    tokenizer = build_tokenizer(cfg.max_positions)
    model = build_base_model(tokenizer, cfg)
    ids = torch.tensor(tokenizer(text, verbose=False)["input_ids"])  # (n_chars,)
    batches = text_batches(ids, cfg.block_size, cfg.base_batch, cfg.seed)
    on_step = step_reporter(progress, 0.0, BASE_SHARE, cfg.base_steps, "pre-training base")
    losses = train_steps(model, batches, cfg.base_steps, cfg.base_lr, on_step)
    info = {
        "pretrain_text": "pydoc_data.topics",
        "n_chars": len(text),
        "steps": cfg.base_steps,
        "batch_size": cfg.base_batch,
        "block_size": cfg.block_size,
        "learning_rate": cfg.base_lr,
        "final_train_loss": round(final_loss(losses), 6),
    }
    return save_checkpoint(model, tokenizer, out, info)


def _train_expert(
    base: Path,
    split: TaskSplit,
    cfg: ZooConfig,
    out: Path,
    progress: Progress | None,
    span: tuple[float, float],
) -> Path:
    """Fine-tune a fresh copy of the checkpoint at ``base`` on ``split`` and save it to ``out``."""
    model = LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(base)
    on_step = step_reporter(progress, *span, cfg.expert_steps, out.name)
    loss = finetune(
        model,
        tokenizer,
        split.train,
        cfg.expert_steps,
        cfg.expert_lr,
        cfg.expert_batch,
        cfg.seed,
        on_step,
    )
    info = {
        "task": split.name,
        "lm_eval_task": TASK_PREFIX + split.name,
        "n_train_examples": len(split.train),
        "steps": cfg.expert_steps,
        "batch_size": cfg.expert_batch,
        "learning_rate": cfg.expert_lr,
        "final_train_loss": round(loss, 6),
        "base": base.name,
    }
    return save_checkpoint(model, tokenizer, out, info)


def zoo_is_built(out_dir: Path, cfg: ZooConfig | None = None) -> bool:
    """Whether ``out_dir`` holds a complete zoo built with ``cfg`` (default ``ZooConfig()``).

    ``zoo_config.json`` is written last, so its presence marks a finished build; its content must
    equal ``cfg``. Checkpoints and task files must all be there.
    """
    out_dir = Path(out_dir)
    marker = out_dir / "zoo_config.json"
    if not marker.exists() or json.loads(marker.read_text()) != asdict(cfg or ZooConfig()):
        return False
    folders = ["base", *(f"expert-{t}" for t in EXPERT_TASKS)]
    tasks = [f"tasks/{TASK_PREFIX}{t}.{ext}" for t in EXPERT_TASKS for ext in ("yaml", "jsonl")]
    return all((out_dir / f / "model.safetensors").exists() for f in folders) and all(
        (out_dir / t).exists() for t in tasks
    )


def build_zoo(out_dir: Path, progress: Progress | None = None, cfg: ZooConfig | None = None) -> Path:
    """Build the demo zoo into ``out_dir`` (see the module docstring) and return ``out_dir``.

    Prints the seconds each stage took. Runs with ``cfg.num_threads`` torch threads.

    Args:
        out_dir: target folder, created if missing; zoo folders already in it are replaced.
        progress: optional ``callable(fraction, message)``, told about every stage and step.
        cfg: sizes and training settings; ``ZooConfig()`` if omitted.
    """
    cfg = cfg or ZooConfig()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "zoo_config.json").unlink(missing_ok=True)  # written last: marks a finished zoo
    timings: dict[str, float] = {}
    text = pydoc_text()
    with torch_threads(cfg.num_threads):
        with timed("tasks", timings):
            splits = make_tasks(text, cfg.n_train, cfg.n_heldout, cfg.seed)
            for split in splits.values():
                write_task(out_dir / "tasks", split)
        with timed("base", timings):
            _pretrain_base(out_dir / "base", text, cfg, progress)
        share = (1 - BASE_SHARE) / len(EXPERT_TASKS)
        for i, name in enumerate(EXPERT_TASKS):
            span = (BASE_SHARE + i * share, BASE_SHARE + (i + 1) * share)
            out = out_dir / f"expert-{name}"
            with timed(out.name, timings):
                _train_expert(out_dir / "base", splits[name], cfg, out, progress, span)

    (out_dir / "zoo_config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    total = sum(timings.values())
    print(f"[zoo] total: {total:.1f}s -> {out_dir}", flush=True)
    if progress:
        progress(1.0, f"zoo built in {total:.0f}s")
    return out_dir
