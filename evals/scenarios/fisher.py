"""Fisher-weighted averaging vs plain averaging of two experts (Matena & Raffel 2022, arXiv:2111.09832).

    fisher:  out = sum_i (F_i + eps) M_i / sum_i (F_i + eps)     per parameter (weight 1 per expert)
    linear:  out = (M_1 + M_2) / 2

F_i is expert i's diagonal Fisher (``explorer.fisher``: per token, labels sampled from the model),
estimated two ways: (a) on generic text, Python's language reference (what the ``fisher`` method of a
recipe does), and (b) on the expert's own task data, as in the paper: the training prompts and answers
of its task (``bed.splits[task].train``), one example after another separated by the end-of-sequence
token, as the expert was trained. Both estimates are cached under ``work/fisher-cache``; the merges
are made in memory. Base, experts, the plain average and both Fisher merges are scored on the two
tasks of the first pair of ``evals.scenarios.task_vectors`` (SmolLM2: say + add, where plain merges
lose most), with ``kept (worse)`` as there.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from evals.scenarios.report import ScenarioTable, session_loader, to_markdown
from evals.scenarios.task_vectors import KEPT, inputs_loaders, pairs_of, score_pair
from explorer.executor import merge_stream
from explorer.fisher import FisherInputs, FisherSettings, fisher_inputs
from explorer.session import MergeSession
from explorer.zoo.tasks import Example
from explorer.zoo.testbed import Testbed

LINEAR, TEXT, TASK = "linear (average)", "fisher (generic text)", "fisher (task data)"
EPSILON = 1e-6  # the fisher method's default floor
# Each Fisher: 32 chunks of 64 tokens (2,048 tokens, ~200 task examples), a quarter of the fisher method's
# default 64 x 128, so the four SmolLM2 estimates take minutes, not most of an hour, on 2 busy CPU cores.
SETTINGS = FisherSettings(n_examples=32, batch_size=4, max_length=64)


def run(
    bed: Testbed,
    work: Path,
    limit: int | None,
    log: Callable[[str], None],
    settings: FisherSettings | None = None,
) -> list[ScenarioTable]:
    """One table on the first pair of ``task_vectors`` (SmolLM2: say + add): base, experts, average, Fisher merges.

    settings: how each Fisher is estimated (default ``SETTINGS``: 32 chunks of 64 tokens, sampled
    labels, seed 0), the same for both data sources.
    """
    settings = settings or SETTINGS
    tables = []
    for pair in pairs_of(bed)[:1]:  # the pair where merges differ most
        tables.append(pair_table(bed, pair, work / "fisher-cache", settings, limit, log))
        log(to_markdown(tables[-1]))  # a long run shows each pair's table as soon as it is done
    return tables


def pair_table(
    bed: Testbed,
    pair: tuple[str, str],
    cache: Path,
    settings: FisherSettings,
    limit: int | None,
    log: Callable[[str], None],
) -> ScenarioTable:
    """Scores of base, the pair's experts, their average and their Fisher merges (text, task data)."""
    session = MergeSession(bed.base, [bed.experts[t] for t in pair])
    log(f"Fisher of expert-{pair[0]} and expert-{pair[1]} on generic text and on their task data")
    text_fisher = fisher_inputs(session.model_ckpts, settings, None, cache)
    task_fisher = fisher_inputs(session.model_ckpts, settings, task_texts(bed, pair, session), cache)
    linear = session.recipe("linear", {}, [{"weight": 1.0}] * len(pair))
    loaders = inputs_loaders(bed, pair)
    loaders[LINEAR] = session_loader(session, lambda: session.merge(linear))
    loaders[TEXT] = session_loader(session, lambda: fisher_average(session, text_fisher, settings))
    loaders[TASK] = session_loader(session, lambda: fisher_average(session, task_fisher, settings))
    scores = score_pair(bed, pair, loaders, limit, log)
    return ScenarioTable(
        title=f"Fisher-weighted vs plain averaging ({' + '.join(pair)})",
        scores=scores,
        note=note(scores),
        settings={
            "Fisher": f"diagonal, {settings.labels.value} labels, {settings.n_examples} chunks of "
            f"{settings.max_length} tokens, seed {settings.seed}",
            "generic text": "pydoc_data.topics",
            "task data": "each expert's training prompts + answers",
            "weights": "1 per expert",
            "epsilon": EPSILON,
        },
    )


def task_texts(bed: Testbed, pair: Sequence[str], session: MergeSession) -> list[str]:
    """Each expert's Fisher text: its task's training examples, ``prompt + answer + eos`` one after another."""
    from transformers import AutoTokenizer

    eos = AutoTokenizer.from_pretrained(session.reference.path).eos_token
    return [examples_text(bed.splits[t].train, eos) for t in pair]


def examples_text(examples: Sequence[Example], separator: str) -> str:
    """``prompt + answer`` of every example, joined by ``separator`` (and ending with it)."""
    return "".join(e.prompt + e.answer + separator for e in examples)


def fisher_average(session: MergeSession, fisher: FisherInputs, settings: FisherSettings) -> dict:
    """``{name: tensor}`` of the Fisher merge (weight 1 per model, ``EPSILON``) of the session's models.

    fisher: each model's Fisher (``explorer.fisher.fisher_inputs``); its estimation settings are written
    into the recipe's setup parameters, which only describe it here (the Fisher is already estimated).
    """
    parameters = {
        "epsilon": EPSILON,
        "fisher_examples": settings.n_examples,
        "fisher_batch_size": settings.batch_size,
        "fisher_max_length": settings.max_length,
        "fisher_labels": settings.labels.value,
    }
    recipe = session.recipe("fisher", parameters, [{"weight": 1.0}] * len(session.models), seed=settings.seed)
    return dict(merge_stream(session, recipe, extras=fisher))


def note(scores) -> str:
    """One sentence from the numbers: each Fisher merge's kept gain against the plain average's."""
    kept = scores.set_index("model")[KEPT]
    verdict = {name: compared(kept[name], kept[LINEAR]) for name in (TEXT, TASK)}
    return (
        f"Of the weaker expert's gain, the plain average keeps {kept[LINEAR]:.2f}, the Fisher merge on generic text "
        f"{kept[TEXT]:.2f} ({verdict[TEXT]} the average) and on the experts' task data {kept[TASK]:.2f} "
        f"({verdict[TASK]} the average)."
    )


def compared(value: float, reference: float) -> str:
    """``"more than"``, ``"as much as"`` or ``"less than"``; ``"not comparable with"`` when either is nan."""
    if value != value or reference != reference:
        return "not comparable with"
    return "more than" if value > reference else "as much as" if value == reference else "less than"
