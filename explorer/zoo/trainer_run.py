"""One expert's fine-tune saved as a real Hugging Face Trainer run: ``RUN/checkpoint-STEP/`` folders.

``train_run(bed, task, out)`` fine-tunes the testbed's base on one task with ``transformers.Trainer``
(not a hand-written loop) and the settings the testbed's experts were trained with: the same AdamW
(betas 0.9/0.95, no weight decay, fused where the set used it), learning-rate schedule, batch size,
steps, gradient clipping at 1 and loss on the answer tokens only (label -100 on the prompt,
``explorer.zoo.train.encode_example``; the set's own ``loss_fn``). ``save_steps`` gives a
``checkpoint-STEP`` every few steps, each with ``trainer_state.json`` (the training loss of every step
and an ``eval_loss`` on ``n_validation`` examples held back from the task's training split: never
trained on, and not the lm-eval held-out examples), weights only (``save_only_model``: no optimizer
state). ``explorer.io.formats.trainer`` reads the folder; ``python -m explorer average-run`` averages it.

Caching: the run is written to a hidden ``.NAME.partial-run`` folder and renamed when complete, and
reused when its ``run_info.json`` records the same settings. An interrupted run starts again from the
base: weights-only checkpoints hold no optimizer state to resume from.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase, PrinterCallback, Trainer, TrainingArguments

from explorer.zoo.tasks import Example
from explorer.zoo.testbed import Testbed, load_model
from explorer.zoo.train import cosine_schedule, encode_example, torch_threads

RUN_INFO = "run_info.json"  # settings of a finished run, written last


def train_run(
    bed: Testbed, task: str, out: str | Path, save_steps: int, n_validation: int = 64, steps: int | None = None
) -> Path:
    """Fine-tune ``bed.base`` on ``task`` with ``transformers.Trainer`` into the run folder ``out``.

    Args:
        bed: the testbed: its base, the task's training split and the experts' fine-tune settings.
        task: one of ``bed.splits``.
        out: the run folder (Trainer ``output_dir``); replaced when it holds another run.
        save_steps: steps between checkpoints (and eval-loss evaluations); the last step is saved too.
        n_validation: the last ``n_validation`` training examples, held back for ``eval_loss``.
        steps: optimizer steps; default the testbed's steps for ``task``.

    Returns:
        ``out``, holding ``checkpoint-STEP/`` folders (float32 safetensors, tokenizer,
        ``trainer_state.json``) and ``run_info.json``.

    Raises:
        ValueError: fewer training examples than ``n_validation`` plus one batch.
    """
    out = Path(out)
    settings = bed.finetune
    steps = settings.steps[task] if steps is None else steps
    info = {"task": task, "steps": steps, "save_steps": save_steps, "n_validation": n_validation, "base": str(bed.base)}
    info |= {"lr": settings.lr, "batch_size": settings.batch_size, "seed": settings.seed}
    if (out / RUN_INFO).is_file() and json.loads((out / RUN_INFO).read_text()) == info:
        return out
    examples = bed.splits[task].train
    if len(examples) < n_validation + settings.batch_size:
        raise ValueError(f"{task}: {len(examples)} training examples; need {n_validation} + one batch")
    tmp = out.with_name(f".{out.name}.partial-run")
    shutil.rmtree(tmp, ignore_errors=True)
    model, tokenizer = load_model(bed.base)
    with torch_threads(settings.num_threads):
        torch.manual_seed(settings.seed)
        trainer = AnswerLossTrainer(
            loss_fn=settings.loss_fn,
            model=model,
            args=_arguments(tmp, steps, save_steps, settings.batch_size, settings.lr, settings.seed),
            train_dataset=_encode(tokenizer, examples[:-n_validation]),
            eval_dataset=_encode(tokenizer, examples[-n_validation:]),
            data_collator=PadCollator(_pad_id(tokenizer)),
            processing_class=tokenizer,
            optimizers=_optimizer(model, bed, steps),
        )
        trainer.remove_callback(PrinterCallback)  # the losses go to trainer_state.json, not the console
        trainer.train()
    (tmp / RUN_INFO).write_text(json.dumps(info, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


class AnswerLossTrainer(Trainer):
    """``Trainer`` whose loss is the testbed's ``loss_fn(model, (input_ids, attention_mask, labels))``.

    ``answer_loss`` applies the output layer only at labelled positions: the same value as the model's
    own loss (mean cross-entropy over the answer tokens), without the ``(B, T, V)`` logits.
    """

    def __init__(self, *args, loss_fn, **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_fn = loss_fn

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The batch's mean answer-token loss; ``(loss, {})`` when outputs are asked for (eval)."""
        loss = self.loss_fn(model, (inputs["input_ids"], inputs["attention_mask"], inputs["labels"]))
        return (loss, {}) if return_outputs else loss


class PadCollator:
    """Right-pads encoded examples into ``input_ids``, ``attention_mask``, ``labels`` tensors ``(B, T)``."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        """The batch of ``rows`` (``{"input_ids", "labels"}`` lists), padded to the longest row."""
        width = max(len(r["input_ids"]) for r in rows)
        gaps = [width - len(r["input_ids"]) for r in rows]
        return {
            "input_ids": torch.tensor([r["input_ids"] + [self.pad_id] * g for r, g in zip(rows, gaps, strict=True)]),
            "attention_mask": torch.tensor(
                [[1] * len(r["input_ids"]) + [0] * g for r, g in zip(rows, gaps, strict=True)]
            ),
            "labels": torch.tensor([r["labels"] + [-100] * g for r, g in zip(rows, gaps, strict=True)]),
        }


def _encode(tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example]) -> list[dict]:
    """Each example as ``{"input_ids", "labels"}`` with the prompt's labels -100 (loss on the answer)."""
    return [dict(zip(("input_ids", "labels"), encode_example(tokenizer, ex), strict=True)) for ex in examples]


def _pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _arguments(out: Path, steps: int, save_steps: int, batch_size: int, lr: float, seed: int) -> TrainingArguments:
    """Trainer settings: ``steps`` steps, a weights-only checkpoint and an eval loss every ``save_steps``."""
    return TrainingArguments(
        output_dir=str(out),
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=batch_size,
        learning_rate=lr,  # the optimizer below carries it; recorded in the run's arguments
        max_grad_norm=1.0,
        logging_steps=1,
        eval_strategy="steps",
        eval_steps=save_steps,
        save_strategy="steps",
        save_steps=save_steps,
        save_only_model=True,
        seed=seed,
        data_seed=seed,
        use_cpu=True,
        report_to="none",
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
    )


def _optimizer(model, bed: Testbed, steps: int) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """The experts' AdamW and learning-rate schedule (``FinetuneSettings``), stretched to ``steps``."""
    settings = bed.finetune
    options = settings.train_options(steps)
    opt = torch.optim.AdamW(
        model.parameters(), lr=settings.lr, weight_decay=0.0, betas=(0.9, 0.95), fused=settings.fused or None
    )
    return opt, options.get("schedule", cosine_schedule(steps))(opt)  # default: what train_steps uses
