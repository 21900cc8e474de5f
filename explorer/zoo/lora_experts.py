"""LoRA experts of a testbed's tasks: PEFT adapters trained on the base with the full experts' data.

``train_lora_expert(bed, task, out)`` fine-tunes a LoRA adapter (Hu et al. 2021,
https://arxiv.org/abs/2106.09685) on the attention and MLP projections of ``bed.base``, with the
answer-only loss, batches, steps and schedule of the set's full experts (``explorer.zoo.testbed.fine_tune``)
and LoRA's own learning rate, and saves it as a standard PEFT adapter folder: ``adapter_config.json``
(``base_model_name_or_path`` = the base folder, absolute) and ``adapter_model.safetensors``, plus
``lora_info.json`` (settings, steps, trainable parameters, final loss). Each update of a target weight
W (out, in) is ``W + (lora_alpha / r) B A`` with A (r, in), B (out, r); B starts at zero, so the
untrained adapter is the base.

Caching: an adapter folder whose ``lora_info.json`` records the same settings is reused; a build is
written to a hidden ``.NAME.partial-build`` folder and renamed when complete. Deterministic: A's
initialisation and the batch order are seeded from the set's seed; training runs on the set's thread
count.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from explorer.zoo.testbed import Testbed, fine_tune, load_model

INFO = "lora_info.json"  # written into the adapter folder; marks a finished build
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # Llama names


@dataclass(frozen=True)
class LoraSettings:
    """How the LoRA experts are trained; everything else (data, batches, steps, schedule) is the testbed's.

    Attributes:
        r: rank of every adapted projection (rows of A).
        lora_alpha: the update's scale is ``lora_alpha / r``.
        lr: peak AdamW learning rate (LoRA trains ~10-30x higher than a full fine-tune).
        target_modules: projection names adapted in every layer.
    """

    r: int = 8
    lora_alpha: int = 16
    lr: float = 2e-3
    target_modules: tuple[str, ...] = PROJECTIONS


def lora_info(folder: str | Path) -> dict | None:
    """The ``lora_info.json`` of a finished adapter folder, ``None`` when there is none."""
    path = Path(folder) / INFO
    return json.loads(path.read_text()) if path.is_file() else None


def train_lora_expert(
    bed: Testbed,
    task: str,
    out: str | Path,
    settings: LoraSettings | None = None,
) -> Path:
    """Train (or reuse) a LoRA adapter of ``bed.base`` on ``task``'s training examples; return its folder.

    Args:
        bed: the testbed; its ``finetune`` settings give steps (``steps[task]``), batch size, loss,
            schedule, seed and threads.
        task: one of ``bed.splits``.
        out: the adapter folder to write.
        settings: rank, alpha, learning rate and adapted projections (default ``LoraSettings()``).

    Returns:
        ``out``: a PEFT adapter folder (``PeftModel.from_pretrained(base, out)`` loads it) with
        ``lora_info.json`` holding ``settings``, ``trainable_parameters`` and ``final_train_loss``.

    Raises:
        KeyError: ``task`` is not a task of ``bed``.
    """
    settings = settings or LoraSettings()
    out = Path(out)
    steps = bed.finetune.steps[task]
    recorded = {**asdict(settings), "target_modules": list(settings.target_modules), "task": task, "steps": steps}
    recorded |= {"base": str(bed.base.resolve()), "seed": bed.finetune.seed, "batch_size": bed.finetune.batch_size}
    info = lora_info(out)
    if info is not None and info["settings"] == recorded:
        return out
    model, tokenizer = load_model(bed.base)
    torch.manual_seed(bed.finetune.seed)  # lora_A's Kaiming initialisation
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.lora_alpha,
        target_modules=list(settings.target_modules),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    peft_model.peft_config["default"].base_model_name_or_path = str(bed.base.resolve())  # not as loaded
    trainable, total = peft_model.get_nb_trainable_parameters()
    lora_bed = replace(bed, finetune=replace(bed.finetune, lr=settings.lr))
    loss = fine_tune(lora_bed, peft_model, tokenizer, bed.splits[task].train, steps)
    info = {"settings": recorded, "trainable_parameters": trainable, "total_parameters": total}
    return _save_adapter(peft_model, out, info | {"final_train_loss": round(loss, 6)})


def _save_adapter(peft_model: PeftModel, out: Path, info: dict) -> Path:
    """Write the adapter to ``.NAME.partial-build`` with ``lora_info.json`` last, then rename it to ``out``."""
    tmp = out.with_name(f".{out.name}.partial-build")
    shutil.rmtree(tmp, ignore_errors=True)
    peft_model.save_pretrained(tmp, safe_serialization=True)
    (tmp / INFO).write_text(json.dumps(info, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def load_folded(base: str | Path, adapter: str | Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """``base`` with the PEFT adapter at ``adapter`` loaded by PEFT and folded in (``merge_and_unload``).

    A plain float32 transformers model in eval mode, ``W + scale B A`` in every adapted weight, and
    the base's tokenizer.
    """
    model, tokenizer = load_model(base)
    folded = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    return folded.eval(), tokenizer
