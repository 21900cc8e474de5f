"""A built expert set seen the same way whichever it is: the tiny zoo or the SmolLM2 experts.

The scenarios of ``explorer.zoo.scenarios`` (Fisher, checkpoint averaging, FedAvg, WiSE-FT, sparse
soups, LoRA experts) run on a ``Testbed``: fast on the tiny zoo for the tests, real on SmolLM2 for
README's tables. A testbed names the base, the experts, the task splits the experts were trained on
(regenerated from the set's seed, so new fine-tunes in a scenario see the same data), the lm-eval
task of every task, and the fine-tuning settings that made the experts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from explorer.zoo import experts, tiny
from explorer.zoo.tasks import TASK_PREFIX, Example, TaskSplit, make_smol_tasks, make_tasks
from explorer.zoo.train import ZooConfig, answer_loss, cosine_schedule, finetune, lm_loss, pydoc_text, torch_threads


@dataclass(frozen=True)
class FinetuneSettings:
    """How the set's experts were fine-tuned: what a scenario's own fine-tunes reuse.

    Attributes:
        steps: AdamW steps per task.
        lr: peak learning rate.
        batch_size: examples per step.
        seed: the set's seed (task splits, batch order).
        num_threads: torch CPU threads while training (the set's builds use 1: same bytes anywhere).
        loss_fn: ``explorer.zoo.train.lm_loss`` or ``answer_loss``.
        fused: the fused AdamW kernel.
        warmup_ratio: share of the steps with linear warm-up before a cosine decay to
            ``min_lr_rate * lr``; ``None``: the tiny zoo's ``cosine_schedule``.
        min_lr_rate: final learning rate as a share of ``lr``.
    """

    steps: dict[str, int]
    lr: float
    batch_size: int
    seed: int
    num_threads: int
    loss_fn: Callable = lm_loss
    fused: bool = False
    warmup_ratio: float | None = None
    min_lr_rate: float = 0.0

    def train_options(self, steps: int) -> dict:
        """Keyword arguments of ``explorer.zoo.train.finetune`` for a run of ``steps`` steps."""
        options = {"loss_fn": self.loss_fn, "fused": self.fused}
        if self.warmup_ratio is not None:
            options["schedule"] = cosine_schedule(steps, round(self.warmup_ratio * steps), self.min_lr_rate)
        return options


@dataclass(frozen=True)
class Testbed:
    """One built expert set: base, experts, task data, lm-eval tasks and fine-tuning settings.

    Attributes:
        name: ``"tiny"`` or ``"smollm2"``.
        root: the set's folder.
        base: the base checkpoint folder.
        experts: ``{task: expert checkpoint folder}`` in the set's task order.
        splits: ``{task: TaskSplit}``: the training and held-out examples of every task.
        task_dir: folder of the lm-eval task YAML files.
        lm_eval_tasks: ``{task: lm-eval task name}``.
        finetune: the settings the experts were fine-tuned with.
    """

    name: str
    root: Path
    base: Path
    experts: dict[str, Path]
    splits: dict[str, TaskSplit]
    task_dir: Path
    lm_eval_tasks: dict[str, str]
    finetune: FinetuneSettings


def tiny_testbed(zoo_dir: str | Path, cfg: ZooConfig | None = None) -> Testbed:
    """The tiny zoo in ``zoo_dir`` (``explorer.zoo.tiny.build_zoo``) as a testbed.

    Raises:
        FileNotFoundError: ``zoo_dir`` holds no finished zoo built with ``cfg`` (default settings);
            build it with ``python -m explorer.zoo DIR``.
    """
    cfg = cfg or ZooConfig()
    root = Path(zoo_dir)
    if not tiny.zoo_is_built(root, cfg):
        raise FileNotFoundError(
            f"{root}: no finished tiny zoo with these settings; build it: python -m explorer.zoo {root}"
        )
    tasks = tiny.EXPERT_TASKS
    splits = make_tasks(pydoc_text(), cfg.n_train, cfg.n_heldout, cfg.seed)
    settings = FinetuneSettings(
        steps=dict.fromkeys(tasks, cfg.expert_steps),
        lr=cfg.expert_lr,
        batch_size=cfg.expert_batch,
        seed=cfg.seed,
        num_threads=cfg.num_threads,
    )
    return Testbed(
        name="tiny",
        root=root,
        base=root / "base",
        experts={t: root / f"expert-{t}" for t in tasks},
        splits={t: splits[t] for t in tasks},
        task_dir=root / "tasks",
        lm_eval_tasks={t: TASK_PREFIX + t for t in tasks},
        finetune=settings,
    )


def smollm2_testbed(set_dir: str | Path, cfg: experts.SmolSetConfig | None = None) -> Testbed:
    """The SmolLM2 expert set in ``set_dir`` (``explorer.zoo.experts``) as a testbed.

    Raises:
        FileNotFoundError: ``set_dir`` holds no finished set built with ``cfg`` (default settings);
            build it with ``python -m explorer.zoo --smollm2-experts DIR``.
    """
    cfg = cfg or experts.SmolSetConfig()
    root = Path(set_dir)
    if not experts.smollm2_experts_built(root, cfg):
        raise FileNotFoundError(
            f"{root}: no finished SmolLM2 expert set with these settings; "
            f"build it: python -m explorer.zoo --smollm2-experts {root}"
        )
    splits = make_smol_tasks(pydoc_text(), cfg.n_train, cfg.n_heldout, cfg.seed)
    settings = FinetuneSettings(
        steps=dict(cfg.steps),
        lr=cfg.lr,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        num_threads=cfg.num_threads,
        loss_fn=answer_loss,
        fused=True,
        warmup_ratio=cfg.warmup_ratio,
        min_lr_rate=cfg.min_lr_rate,
    )
    return Testbed(
        name="smollm2",
        root=root,
        base=root / experts.BASE_DIR,
        experts={t: root / experts.expert_dir(t) for t in experts.SMOL_TASKS},
        splits={t: splits[t] for t in experts.SMOL_TASKS},
        task_dir=root / "tasks",
        lm_eval_tasks={t: experts.task_name(t) for t in experts.SMOL_TASKS},
        finetune=settings,
    )


def load_model(folder: str | Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A checkpoint folder of the testbed as a float32 causal LM (eval mode) and its tokenizer."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(folder)


def fine_tune(
    bed: Testbed,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    steps: int,
    seed: int | None = None,
    on_step: Callable[[int], None] | None = None,
) -> float:
    """Fine-tune ``model`` in place on ``examples`` as the testbed's experts were; return the final loss.

    Same learning rate, batch size, loss, schedule (stretched to ``steps``) and thread count as the
    set's experts; ``seed`` (default: the set's) fixes the batch order.
    """
    settings = bed.finetune
    with torch_threads(settings.num_threads):
        return finetune(
            model,
            tokenizer,
            examples,
            steps,
            settings.lr,
            settings.batch_size,
            settings.seed if seed is None else seed,
            on_step,
            **settings.train_options(steps),
        )
