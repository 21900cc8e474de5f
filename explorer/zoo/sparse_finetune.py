"""Sparse fine-tunes of a magnitude-pruned base that keep its pruning mask (Sparse Model Soups' ingredients).

Sparse Model Soups (Zimmer et al., arXiv:2306.16788) prune a model once, retrain several copies of it
with the mask fixed, and average them: every copy is zero in the same places, so the average is as
sparse as each copy. Here:

- ``prune_base`` magnitude-prunes a testbed's base (``explorer.prune.prune_to_folder``) in the
  decoder blocks' weight matrices only (``decoder_matrix``: attention and MLP projections; the
  embeddings, the output layer and the norms are kept dense, as sparse-LLM work usually does);
- ``sparse_fine_tune`` fine-tunes like the testbed's experts (``explorer.zoo.testbed.fine_tune``)
  with a gradient hook on every pruned matrix that zeroes the gradient of its pruned entries. AdamW
  with weight decay 0 then never moves them: their first and second moments stay 0, so every update
  is ``lr * 0 / (0 + eps) = 0``. The function checks that every pruned zero is still exactly 0 and
  raises otherwise;
- ``build_sparse_expert`` does that on one task and saves the result (cached, written atomically).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from explorer.prune import PRUNE_REPORT, is_weight_matrix, prune_to_folder
from explorer.zoo.tasks import Example
from explorer.zoo.testbed import Testbed, fine_tune, load_model
from explorer.zoo.train import save_checkpoint

INFO = "zoo_info.json"  # save_checkpoint's record of how a fine-tune was made


def decoder_matrix(name: str, t: torch.Tensor) -> bool:
    """The tensors pruned here: weight matrices inside the decoder blocks (``...layers.<i>...``).

    Llama names: ``model.layers.<i>.self_attn.{q,k,v,o}_proj.weight`` and
    ``model.layers.<i>.mlp.{gate,up,down}_proj.weight``; embeddings, ``lm_head`` and norms are not.
    """
    return is_weight_matrix(name, t) and ".layers." in name


def matrix_sparsity(state: Mapping[str, torch.Tensor], select: Callable = decoder_matrix) -> float:
    """Share of exact zeros over all selected tensors of ``state`` together, in [0, 1]."""
    chosen = [t for name, t in state.items() if select(name, t)]
    total = sum(t.numel() for t in chosen)
    return sum(int((t == 0).sum()) for t in chosen) / total if total else 0.0


def prune_base(bed: Testbed, out: Path, sparsity: float) -> Path:
    """``bed.base`` magnitude-pruned per tensor to ``sparsity`` in its decoder matrices, saved to ``out``.

    Reused when ``out`` already holds a pruned copy with the same sparsity (its ``prune_report.json``);
    ``prune_to_folder`` writes a hidden folder and renames it when complete.
    """
    report = out / PRUNE_REPORT
    if report.exists() and json.loads(report.read_text())["sparsity"] == sparsity:
        return out
    prune_to_folder(bed.base, out, sparsity, overwrite=out.exists(), select=decoder_matrix)
    return out


def keep_masks(model: PreTrainedModel, select: Callable = decoder_matrix) -> dict[str, torch.Tensor]:
    """``{parameter name: bool mask of its nonzero entries}`` for the selected parameters of ``model``."""
    return {name: p.detach() != 0 for name, p in model.named_parameters() if select(name, p)}


@contextmanager
def frozen_zeros(model: PreTrainedModel, masks: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Within the block, the gradient of every parameter named in ``masks`` is multiplied by its mask."""
    params = dict(model.named_parameters())
    handles = [params[name].register_hook(lambda g, m=mask: g * m) for name, mask in masks.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def sparse_fine_tune(
    bed: Testbed,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    steps: int,
    seed: int | None = None,
) -> float:
    """``fine_tune`` with the zeros of ``model``'s decoder matrices held at exactly 0; returns the final loss.

    Raises:
        RuntimeError: a pruned entry is no longer exactly 0 after training (the optimizer moved it:
            e.g. weight decay, which this project's fine-tunes do not use).
    """
    masks = keep_masks(model)
    with frozen_zeros(model, masks):
        loss = fine_tune(bed, model, tokenizer, examples, steps, seed)
    params = dict(model.named_parameters())
    moved = [name for name, mask in masks.items() if params[name].detach()[~mask].any()]
    if moved:
        raise RuntimeError(f"sparse fine-tune moved pruned weights of {len(moved)} tensors, e.g. {moved[0]}")
    return loss


def build_sparse_expert(bed: Testbed, pruned: Path, task: str, out: Path) -> Path:
    """Fine-tune the pruned base in ``pruned`` on ``task`` keeping its mask; save to ``out``.

    ``bed.finetune.steps[task]`` steps with the set's settings. Reused when ``out`` holds a finished
    fine-tune of the same pruned base, task and steps (its ``zoo_info.json``).
    """
    steps = bed.finetune.steps[task]
    info = {"pruned_base": str(pruned), "task": task, "steps": steps, "mask": "kept (gradient hooks)"}
    done = out / INFO
    if done.exists() and {k: v for k, v in json.loads(done.read_text()).items() if k in info} == info:
        return out
    model, tokenizer = load_model(pruned)
    loss = sparse_fine_tune(bed, model, tokenizer, bed.splits[task].train, steps)
    state = model.state_dict()
    info |= {"final_loss": loss, "sparsity": matrix_sparsity(state)}
    return save_checkpoint(model, tokenizer, out, info)
