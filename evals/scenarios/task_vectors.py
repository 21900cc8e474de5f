"""Task-vector merges of two experts: task arithmetic, TIES, DARE, breadcrumbs, DELLA vs a plain average.

For each pair of experts (SmolLM2: say + add, where the methods differ most, and say + rev) the base,
the two experts and every merge are scored on the pair's two tasks. Merges are built in memory from
one ``explorer.session.MergeSession`` (the app's path: nothing is written), all with weight 1 per
expert and seed 0 for the random drops (DARE, DELLA). ``kept (worse)`` is the smaller of the two
shares of an expert's gain over the base that a row keeps (``evals.merge_sweep.retained_gain``):
1 keeps both experts' gains, 0 keeps none of one of them.

Methods (mergekit's names and parameters):
    task_arithmetic   B + sum_i w_i d_i                                  (Ilharco et al. 2023)
    ties              trim to density by |d|, elect signs, disjoint mean (Yadav et al. 2023)
    dare_linear/ties  drop with probability 1 - density, rescale         (Yu et al. 2024)
    breadcrumbs       keep the density share of |d| just below its top gamma (Davari & Belilovsky 2024)
    della             magnitude-ranked drop probabilities density +/- epsilon, rescale, TIES
                                                                         (Deep et al. 2024)
    linear            sum_i w_i M_i / sum_i w_i                          (Wortsman et al. 2022)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import pandas as pd

from evals.merge_sweep import MergeSpec, retained_gain
from evals.scenarios.report import Loader, ScenarioTable, folder_loader, score_models, session_loader, to_markdown
from explorer.session import MergeSession
from explorer.zoo.testbed import Testbed

# testbed name -> pairs of expert tasks; other testbeds: their first two experts
PAIRS = {"smollm2": (("say", "add"), ("say", "rev")), "tiny": (("add", "reverse"),)}
SEED = 0  # recipe seed: the random drops of DARE and DELLA, drawn per tensor name
KEPT = "kept (worse)"
GOOD = 0.7  # a merge "keeps both" when it keeps at least this share of each expert's gain

# label -> (method, global parameters, parameters of each expert)
MERGES: dict[str, MergeSpec] = {
    "task_arithmetic w=1": ("task_arithmetic", {}, {"weight": 1.0}),
    "ties d=0.5": ("ties", {}, {"weight": 1.0, "density": 0.5}),
    "ties d=0.2": ("ties", {}, {"weight": 1.0, "density": 0.2}),
    "dare_linear d=0.5": ("dare_linear", {}, {"weight": 1.0, "density": 0.5}),
    "dare_ties d=0.5": ("dare_ties", {}, {"weight": 1.0, "density": 0.5}),
    "breadcrumbs d=0.9 gamma=0.01": ("breadcrumbs", {}, {"weight": 1.0, "density": 0.9, "gamma": 0.01}),
    "della d=0.5 eps=0.15": ("della", {}, {"weight": 1.0, "density": 0.5, "epsilon": 0.15}),
    "linear (average)": ("linear", {}, {"weight": 1.0}),
}


def run(bed: Testbed, work: Path, limit: int | None, log: Callable[[str], None]) -> list[ScenarioTable]:
    """One table per pair of experts: base, experts and every merge of ``MERGES`` on the pair's tasks.

    Nothing is built on disk (``work`` stays empty): every merge is made in memory when scored.
    """
    tables = []
    for pair in pairs_of(bed):
        tables.append(pair_table(bed, pair, MERGES, limit, log))
        log(to_markdown(tables[-1]))  # a long run shows each pair's table as soon as it is done
    return tables


def pairs_of(bed: Testbed) -> Sequence[tuple[str, str]]:
    """The expert pairs this scenario merges on ``bed`` (``PAIRS``, else its first two experts)."""
    return PAIRS.get(bed.name, (tuple(list(bed.experts)[:2]),))


def pair_table(
    bed: Testbed,
    pair: tuple[str, str],
    merges: dict[str, MergeSpec],
    limit: int | None,
    log: Callable[[str], None],
) -> ScenarioTable:
    """Scores of base, the pair's experts and each merge of ``merges`` on the pair's tasks.

    merges: ``{label: (method, parameters, per_model)}``; ``per_model`` is one dict for both experts
    or a list of one dict per expert.
    """
    session = MergeSession(bed.base, [bed.experts[t] for t in pair])
    loaders = inputs_loaders(bed, pair)
    for label, (method, parameters, per_model) in merges.items():
        per_model = per_model if isinstance(per_model, list) else [per_model] * len(pair)
        recipe = session.recipe(method, parameters, per_model, seed=SEED)
        loaders[label] = session_loader(session, lambda recipe=recipe: session.merge(recipe))
    scores = score_pair(bed, pair, loaders, limit, log)
    return ScenarioTable(
        title=f"Task-vector merges of two experts ({' + '.join(pair)})",
        scores=scores,
        note=note(scores, pair, merges),
        settings={
            "merged in memory": "MergeSession over base + " + " + ".join(f"expert-{t}" for t in pair),
            "weights": "1 per expert",
            "seed": SEED,
            KEPT: "min over the two tasks of (merge - base) / (expert - base)",
        },
    )


def inputs_loaders(bed: Testbed, pair: Sequence[str]) -> dict[str, Loader]:
    """``{"base": loader, "expert-TASK": loader, ...}``: the merge's inputs, loaded from their folders."""
    return {"base": folder_loader(bed.base), **{f"expert-{t}": folder_loader(bed.experts[t]) for t in pair}}


def score_pair(
    bed: Testbed, pair: Sequence[str], loaders: dict[str, Loader], limit: int | None, log: Callable[[str], None]
) -> pd.DataFrame:
    """``score_models`` on the pair's lm-eval tasks plus the ``kept (worse)`` column.

    ``loaders`` must hold ``"base"`` and ``"expert-TASK"`` for each task of the pair: their scores
    are the reference of the kept gain. Logs each label before it is scored.
    """

    def logged(label: str, load: Loader) -> Loader:
        def run_load():
            log(f"scoring {label}")
            return load()

        return run_load

    tasks = [bed.lm_eval_tasks[t] for t in pair]
    scores = score_models({k: logged(k, v) for k, v in loaders.items()}, tasks, bed.task_dir, limit)
    return with_kept(scores, pair, bed.lm_eval_tasks)


def with_kept(scores: pd.DataFrame, pair: Sequence[str], lm_eval_tasks: dict[str, str]) -> pd.DataFrame:
    """``scores`` plus ``kept (worse)``: per row, the smaller of its retained gains over the pair's tasks.

    Reads the rows ``base`` and ``expert-TASK``; a task whose expert gained nothing gives ``nan``.
    """
    by_model = scores.set_index("model")
    kept = []
    for _, row in scores.iterrows():
        gains = [
            retained_gain(row[name], by_model.loc[f"expert-{t}", name], by_model.loc["base", name])
            for t, name in ((t, lm_eval_tasks[t]) for t in pair)
        ]
        kept.append(min(gains))
    return scores.assign(**{KEPT: kept})


def note(scores: pd.DataFrame, pair: Sequence[str], merges: dict[str, MergeSpec]) -> str:
    """One honest sentence from the numbers: best and worst merge by kept gain, and which keep both."""
    merged = scores[scores["model"].isin(list(merges))].sort_values(KEPT, ascending=False)
    if merged.empty or merged[KEPT].isna().all():
        return "An expert gained nothing over the base on its task, so no kept gain is defined."
    best, worst = merged.iloc[0], merged.iloc[-1]
    if best[KEPT] <= 0:
        return f"On {' + '.join(pair)}, no merge keeps any of the weaker expert's gain (best: {best[KEPT]:.2f})."
    good = merged.loc[merged[KEPT] >= GOOD, "model"].tolist()
    keeps = f"{', '.join(good)} keep at least {GOOD} of both gains" if good else f"none keeps {GOOD} of both gains"
    return (
        f"On {' + '.join(pair)}, {best['model']} keeps the most of the weaker expert's gain ({best[KEPT]:.2f}) "
        f"and {worst['model']} the least ({worst[KEPT]:.2f}); {keeps}."
    )
