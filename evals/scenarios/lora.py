"""Scenario "lora": two LoRA experts merged as adapters (one adapter out) and as folded checkpoints.

Builds, under ``work``: a PEFT LoRA adapter of the base for each of the testbed's first two tasks
(``explorer.zoo.lora_experts``; ``lora-TASK``), then merges them two ways, both through the product:

- as adapters, ``explorer.adapter_merge.merge_adapters`` (``merged-NAME``): ``cat`` stacks the factors,
  so B A = B_1 A_1 + B_2 A_2 exactly (rank 2r); ``task_arithmetic`` and ``ties`` merge the task vectors
  s B_i A_i per module and re-factor the result by a truncated SVD to rank r (Eckart-Young);
- as folded checkpoints, ``explorer.session.MergeSession`` over the references ``BASE+ADAPTER``
  (``explorer.io.formats.lora``): task arithmetic and TIES on the full-rank folded weights, in memory.

Scores base, each LoRA expert (folded by PEFT) and every merge (merged adapters loaded on the base with
PEFT) on both tasks. Identity shown by the table: the ``cat`` adapter and the folded task-arithmetic
merge (weights 1) hold the same weights, base + B_1 A_1 + B_2 A_2, so they score the same.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from evals.scenarios.report import Loader, ScenarioTable, folder_loader, score_models, session_loader
from explorer.adapter_merge import merge_adapters
from explorer.session import MergeSession
from explorer.zoo.lora_experts import LoraSettings, load_folded, lora_info, train_lora_expert
from explorer.zoo.testbed import Testbed

SETTINGS = LoraSettings()
DENSITY = 0.5  # TIES: share of each task vector's entries kept (per tensor)
MERGE_INFO = "scenario_merge.json"  # written into a merged adapter folder last: what it was merged from

# label -> (merge_adapters method, parameters, output rank: "r" = the experts' rank, None = cat's 2r)
ADAPTER_MERGES = {
    "adapters: cat (exact sum)": ("cat", {}, None),
    "adapters: task_arithmetic, SVD to r": ("task_arithmetic", {}, "r"),
    f"adapters: ties d={DENSITY}, SVD to r": ("ties", {"density": DENSITY}, "r"),
}
# label -> (MergeSession method, global parameters, parameters of each folded expert)
FOLDED_MERGES = {
    "folded: task_arithmetic": ("task_arithmetic", {}, {"weight": 1.0}),
    f"folded: ties d={DENSITY}": ("ties", {}, {"weight": 1.0, "density": DENSITY}),
}


def adapter_dir(work: Path, task: str) -> Path:
    """Folder of the LoRA expert on ``task``: ``work/lora-TASK``."""
    return work / f"lora-{task}"


def merged_adapter_dir(work: Path, method: str) -> Path:
    """Folder of the adapters merged into one adapter with ``method``: ``work/merged-METHOD``."""
    return work / f"merged-{method}"


def run(bed: Testbed, work: Path, limit: int | None, log: Callable[[str], None]) -> list[ScenarioTable]:
    """Train two LoRA experts, merge them as adapters and as folded checkpoints, score everything.

    Returns:
        One table: rows base, the two LoRA experts, ``ADAPTER_MERGES`` then ``FOLDED_MERGES``; a
        ``rank`` column gives the rank of each row's update per adapted weight (``full``: a merge
        of folded weights is not low-rank in general).
    """
    tasks = list(bed.experts)[:2]
    adapters = [_trained(bed, task, adapter_dir(work, task), log) for task in tasks]
    models: dict[str, Loader] = {"base": folder_loader(bed.base)}
    ranks = {"base": "-"}
    for task, adapter in zip(tasks, adapters, strict=True):
        models[f"LoRA expert {task} (folded)"] = lambda a=adapter: load_folded(bed.base, a)
        ranks[f"LoRA expert {task} (folded)"] = str(SETTINGS.r)
    for label, (method, parameters, rank) in ADAPTER_MERGES.items():
        merged = merge_as_adapter(adapters, merged_adapter_dir(work, method), method, parameters, rank, log)
        models[label] = lambda m=merged: load_folded(bed.base, m)
        ranks[label] = str(2 * SETTINGS.r if rank is None else SETTINGS.r)
    session = folded_session(bed, adapters)
    for label, (method, parameters, per_model) in FOLDED_MERGES.items():
        recipe = session.recipe(method, parameters, [per_model] * len(session.model_ckpts))
        models[label] = session_loader(session, lambda r=recipe: session.merge(r))
        ranks[label] = "full"
    log(f"lora: scoring {len(models)} models on {', '.join(tasks)}")
    lm_tasks = [bed.lm_eval_tasks[t] for t in tasks]
    scores = score_models(models, lm_tasks, bed.task_dir, limit)
    scores.insert(1, "rank", [ranks[label] for label in scores["model"]])
    return [ScenarioTable(_title(tasks), scores, _note(scores, lm_tasks), _settings(bed, tasks, adapters))]


def _trained(bed: Testbed, task: str, out: Path, log: Callable[[str], None]) -> Path:
    if lora_info(out) is None:
        log(f"lora: training the LoRA expert on {task} ({bed.finetune.steps[task]} steps)")
    return train_lora_expert(bed, task, out, SETTINGS)


def merge_as_adapter(
    adapters: list[Path], out: Path, method: str, parameters: dict, rank: str | None, log: Callable[[str], None]
) -> Path:
    """``merge_adapters`` of ``adapters`` (weights 1) into ``out``, reused when it was made from the same inputs.

    ``rank`` "r" truncates to the experts' rank; ``None`` is cat's own rank (the sum of the ranks).
    """
    made_from = {
        "adapters": [lora_info(a) for a in adapters],
        "method": method,
        "parameters": parameters,
        "rank": rank,
    }
    if (out / MERGE_INFO).is_file() and json.loads((out / MERGE_INFO).read_text()) == made_from:
        return out
    log(f"lora: merging the adapters with {method}")
    merge_adapters(
        adapters, out, method=method, parameters=parameters or None, rank=SETTINGS.r if rank else None, overwrite=True
    )
    (out / MERGE_INFO).write_text(json.dumps(made_from, indent=2) + "\n")
    return out


def folded_session(bed: Testbed, adapters: list[Path]) -> MergeSession:
    """A merge session over the base and the adapters folded into it, named ``BASE+ADAPTER``."""
    base = bed.base.resolve()
    return MergeSession(base, [f"{base}+{adapter.resolve()}" for adapter in adapters])


def _title(tasks: list[str]) -> str:
    return f"LoRA experts ({' + '.join(tasks)}) merged as adapters and as folded checkpoints"


def _settings(bed: Testbed, tasks: list[str], adapters: list[Path]) -> dict:
    info = lora_info(adapters[0])
    return {
        "LoRA": f"r {SETTINGS.r}, alpha {SETTINGS.lora_alpha} on {', '.join(SETTINGS.target_modules)}",
        "trainable parameters": f"{info['trainable_parameters']:,} of {info['total_parameters']:,} per expert",
        "training": f"lr {SETTINGS.lr}, steps {', '.join(f'{t} {bed.finetune.steps[t]}' for t in tasks)}, "
        f"batch {bed.finetune.batch_size}, the full experts' data and schedule",
        "merges": f"weights 1, lambda 1; TIES density {DENSITY}, trimmed per tensor; SVD back to rank {SETTINGS.r}",
    }


def _note(scores, lm_tasks: list[str]) -> str:
    """What the numbers show: the experts, the cat = folded task arithmetic identity, the rank-r truncation."""
    acc = scores.set_index("model")[lm_tasks]
    mean = acc.mean(axis=1)
    experts = [label for label in acc.index if label.startswith("LoRA expert")]
    own = ", ".join(f"{acc.loc[e, t]:.2f} on {t}" for e, t in zip(experts, lm_tasks, strict=True))
    merges = [label for label in acc.index if label.startswith(("adapters:", "folded:"))]
    best = max(merges, key=lambda label: mean[label])
    cat, folded, svd = list(ADAPTER_MERGES)[0], list(FOLDED_MERGES)[0], list(ADAPTER_MERGES)[1]
    gap = (acc.loc[cat] - acc.loc[folded]).abs().max()
    same = "score the same" if gap == 0 else f"their scores differ by at most {gap:.2f} (float32 rounding of B A)"
    return (
        f"The LoRA experts score {own} (base {mean['base']:.2f} mean). "
        f"The best merge is {best} with {mean[best]:.2f} mean accuracy over the two tasks. "
        f"The cat adapter and the folded task-arithmetic merge hold the same weights (B1 A1 + B2 A2) and {same}; "
        f"truncating that sum to rank {SETTINGS.r} by SVD changes the mean by {mean[svd] - mean[cat]:+.2f}."
    )
