"""Sparse soup: mask-preserving averages of sparse fine-tunes vs a naive average.

Sparse Model Soups (Zimmer et al., arXiv:2306.16788): prune a model, retrain copies of it with the
mask fixed, average them; because the copies share the mask, the soup is as sparse as each copy.
This scenario builds, under ``work``:

1. ``pruned-S``: the base magnitude-pruned per tensor to sparsity ``SPARSITY`` in its decoder
   matrices (``explorer.zoo.sparse_finetune.prune_base``);
2. ``sparse-TASK``: that pruned base fine-tuned on each of the first two tasks with its zeros held
   at exactly 0 (gradient hooks, AdamW without weight decay; checked after training);
3. ``sparse-TASK-pruned-R``: each of those pruned again, by its own magnitudes, to ``REPRUNE`` (the
   next round of iterative magnitude pruning, here without retraining): now the masks differ.

Two tables score the inputs, the naive linear average and the sparse soup (method ``sparse_soup``,
``remask="intersection"``) on both tasks, with each model's sparsity (share of exact zeros over the
decoder matrices). With the shared mask the two averages are one model; with differing masks the
naive average is zero only where both inputs are (less sparse than either) and the sparse soup keeps
only the entries nonzero in both (at least as sparse as either).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import torch
from transformers import AutoTokenizer

from evals.scenarios.report import Loader, ScenarioTable, folder_loader, score_models
from explorer.prune import PRUNE_REPORT, prune_to_folder
from explorer.session import MergeSession
from explorer.zoo.sparse_finetune import build_sparse_expert, decoder_matrix, matrix_sparsity, prune_base
from explorer.zoo.testbed import Testbed

SPARSITY = 0.3  # share of each decoder matrix pruned from the base (at 0.5, rev reached only 0.05 in 60 steps)
REPRUNE = 0.35  # share pruned from each sparse fine-tune in the second round (masks then differ)
SPARSE = "sparsity %"  # the table column: percent of exact zeros over the decoder matrices
MERGES = {  # label -> (method, parameters); every input has weight 1
    "linear average": ("linear", {"normalize": True}),
    "sparse soup (intersection)": ("sparse_soup", {"remask": "intersection"}),
}


def run(bed: Testbed, work: Path, limit: int | None, log: Callable[[str], None]) -> list[ScenarioTable]:
    """Build the pruned base, two sparse fine-tunes and their re-pruned copies; return the two tables."""
    tasks = list(bed.experts)[:2]
    lm_tasks = [bed.lm_eval_tasks[t] for t in tasks]
    pruned = prune_base(bed, work / f"pruned-{SPARSITY}", SPARSITY)
    log(f"pruned base: {pruned}")
    sparse = []
    for task in tasks:
        sparse.append(build_sparse_expert(bed, pruned, task, work / f"sparse-{SPARSITY}-{task}"))
        log(f"sparse fine-tune: {sparse[-1]}")
    repruned = [reprune(folder, folder.with_name(f"{folder.name}-pruned-{REPRUNE}"), REPRUNE) for folder in sparse]

    shared = {"base (dense)": folder_loader(bed.base), f"pruned base ({SPARSITY:.0%})": folder_loader(pruned)}
    shared_scores, shared_jaccard, same = soup_scores(shared, sparse, tasks, lm_tasks, bed, limit, log)
    differing_scores, differing_jaccard, _ = soup_scores({}, repruned, tasks, lm_tasks, bed, limit, log)
    settings = {
        "pruning": f"magnitude, per tensor, decoder matrices (attention and MLP projections) of the base to {SPARSITY:.0%}",
        "fine-tunes": ", ".join(f"{t}: {bed.finetune.steps[t]} steps" for t in tasks) + " (the experts' settings)",
        "merges": "linear (normalize, weight 1 each); sparse_soup (remask intersection, weight 1 each)",
    }
    return [
        ScenarioTable(
            title=f"Sparse soup, shared mask: fine-tunes of one base pruned to {SPARSITY:.0%}",
            scores=shared_scores,
            note=shared_note(shared_scores, shared_jaccard, same, tasks, lm_tasks),
            settings=settings | {"mask agreement (Jaccard)": f"{shared_jaccard:.3f}"},
        ),
        ScenarioTable(
            title=f"Sparse soup, differing masks: the same fine-tunes each pruned again to {REPRUNE:.0%}",
            scores=differing_scores,
            note=differing_note(differing_scores, differing_jaccard, lm_tasks),
            settings=settings
            | {
                "second pruning": f"each fine-tune by its own magnitudes to {REPRUNE:.0%}, no retraining",
                "mask agreement (Jaccard)": f"{differing_jaccard:.3f}",
            },
        ),
    ]


def reprune(model: Path, out: Path, sparsity: float) -> Path:
    """``model`` magnitude-pruned per tensor to ``sparsity`` in its decoder matrices, saved to ``out``.

    Reused when ``out``'s prune report names the same source and sparsity and is newer than the
    source's weights (a rebuilt source is pruned again).
    """
    report = out / PRUNE_REPORT
    if report.exists():
        done = json.loads(report.read_text())
        newest = max(p.stat().st_mtime for p in model.glob("*.safetensors"))
        if done["sparsity"] == sparsity and Path(done["source"]).name == model.name and report.stat().st_mtime > newest:
            return out
    prune_to_folder(model, out, sparsity, overwrite=out.exists(), select=decoder_matrix)
    return out


def soup_scores(
    extra: dict[str, Loader],
    ingredients: list[Path],
    tasks: list[str],
    lm_tasks: list[str],
    bed: Testbed,
    limit: int | None,
    log: Callable[[str], None],
) -> tuple[pd.DataFrame, float, bool]:
    """Scores and sparsity of ``extra`` models, the ingredients and their ``MERGES``.

    Returns:
        The frame (``score_models``' columns plus ``sparsity``), the ingredients' mask agreement
        (Jaccard over the decoder matrices) and whether the two merges gave identical tensors.
    """
    session = MergeSession(None, ingredients)
    tokenizer = AutoTokenizer.from_pretrained(ingredients[0])
    merged = {
        label: session.merge(session.recipe(method, parameters, [{"weight": 1.0}] * len(ingredients)))
        for label, (method, parameters) in MERGES.items()
    }
    loaders = dict(extra)
    for task, state in zip(tasks, session.models, strict=True):
        loaders[f"sparse FT {task} ({matrix_sparsity(state):.0%})"] = lambda s=state: (
            session.build_model(s),
            tokenizer,
        )
    for label, state in merged.items():
        loaders[label] = lambda s=state: (session.build_model(s), tokenizer)
    rows = []
    for label, load in loaders.items():
        model, tok = load()
        row = score_models({label: lambda m=model, t=tok: (m, t)}, lm_tasks, bed.task_dir, limit)
        row[SPARSE] = 100 * matrix_sparsity(model.state_dict())
        log(
            f"{label}: "
            + ", ".join(f"{t} {row[t].iloc[0]:.2f}" for t in lm_tasks)
            + f", {SPARSE} {row[SPARSE].iloc[0]:.2f}"
        )
        rows.append(row)
        del model
    first, second = merged.values()
    same = all(torch.equal(first[n], second[n]) for n in first)
    return pd.concat(rows, ignore_index=True), mask_jaccard(session.models), same


def mask_jaccard(states: list[dict[str, torch.Tensor]]) -> float:
    """Jaccard index of the models' nonzero masks over all decoder matrices together: |AND| / |OR|."""
    both = either = 0
    for name, t in states[0].items():
        if decoder_matrix(name, t):
            nonzero = torch.stack([s[name] != 0 for s in states])
            both, either = both + int(nonzero.all(0).sum()), either + int(nonzero.any(0).sum())
    return both / either if either else 1.0


def _row(scores: pd.DataFrame, prefix: str) -> pd.Series:
    return scores.loc[scores["model"].str.startswith(prefix)].iloc[0]


def shared_note(scores: pd.DataFrame, jaccard: float, same: bool, tasks: list[str], lm_tasks: list[str]) -> str:
    """What the shared-mask table shows, from its numbers."""
    soup = _row(scores, "sparse soup")
    accs = ", ".join(f"{t} {soup[t]:.2f}" for t in lm_tasks)
    fts = ", ".join(f"{t} {_row(scores, 'sparse FT ' + task)[t]:.2f}" for task, t in zip(tasks, lm_tasks, strict=True))
    which = "the same model" if same else "different models"
    return (
        f"The fine-tunes share the pruned base's mask (Jaccard {jaccard:.3f}), so the linear average and the sparse "
        f"soup are {which}, {soup[SPARSE]:.2f}% sparse like their inputs; it scores {accs} (each fine-tune on its "
        f"own task: {fts})."
    )


def differing_note(scores: pd.DataFrame, jaccard: float, lm_tasks: list[str]) -> str:
    """What the differing-mask table shows, from its numbers."""
    soup, naive = _row(scores, "sparse soup"), _row(scores, "linear average")
    inputs = scores.loc[scores["model"].str.startswith("sparse FT"), SPARSE]
    return (
        f"With masks that agree on {jaccard:.1%} (Jaccard) of their nonzeros, the linear average is "
        f"{naive[SPARSE]:.2f}% sparse (inputs {inputs.min():.2f}-{inputs.max():.2f}%) while the sparse soup is "
        f"{soup[SPARSE]:.2f}%; they score "
        + ", ".join(f"{t} {naive[t]:.2f} vs {soup[t]:.2f}" for t in lm_tasks)
        + " (linear vs sparse soup)."
    )
