"""Greedy soup of checkpoints scored by lm-eval (``python -m evals greedy-soup``).

Wortsman et al., Model soups (arXiv:2203.05482), Algorithm 1, with ``explorer.greedy_soup`` as the
algorithm: the candidates are ranked by their own held-out score; the best starts the soup and each
next one joins when the soup's score (a uniform ``linear`` average of the ingredients) does not drop.
Every soup is merged in memory (``explorer.session.MergeSession``: all candidates are loaded once, so
they must fit in RAM together) and scored with ``task_scores`` without being saved; the score is
the mean primary metric over the given tasks. Use tasks (or a ``limit``) held out from what you report later:
the selection fits the examples it is scored on. The final soup is written with the streaming merge
(``explorer.executor.merge_to_folder``: checked output folder, atomic write) from a recipe that names
only the kept ingredients, so ``python -m explorer merge`` replays it from its ``merge_recipe.yaml``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from evals.lm_eval_runner import TaskDirs, task_scores
from explorer.executor import merge_to_folder
from explorer.greedy_soup import GreedySoup, greedy_soup
from explorer.io.writer import check_output_dir
from explorer.recipe import MergeRecipe
from explorer.session import MergeSession


@dataclass
class SoupResult:
    """The greedy soup over checkpoint folders: each candidate's own score, the soup, its recipe, where it was written."""

    individual: dict[str, float]  # candidate (as given) -> its own mean acc
    soup: GreedySoup[str]  # ingredients in the order added, the soup's score, every step tried
    recipe: MergeRecipe  # uniform linear over the ingredients, in the order the candidates were given
    out: Optional[Path] = None


def greedy_soup_models(
    models: Sequence[str | Path],
    tasks: Sequence[str],
    task_dir: TaskDirs,
    out: Optional[str | Path] = None,
    limit: Optional[int] = None,
    batch_size: int = 32,
    overwrite: bool = False,
    log: Callable[[str], None] = lambda _message: None,
) -> SoupResult:
    """Greedy soup of the checkpoints ``models`` scored on ``tasks``; written to ``out`` when given.

    Args:
        models: checkpoint folders (any input ``open_checkpoint`` reads) of one architecture.
        tasks: lm-eval task names in ``task_dir``; the score is their mean acc.
        task_dir: folder (or folders) of task YAML files.
        out: output folder of the final soup; checked before any evaluation (never an input, never a
            folder holding other data unless this tool wrote it and ``overwrite``).
        limit: examples per task; ``None`` for all.
        batch_size: sequences per forward pass.
        overwrite: replace an earlier output of this tool at ``out``.
        log: called with one line per evaluation (candidate or trial soup and its score).

    Returns:
        The individual scores, the soup and its recipe, and ``out``.

    Raises:
        CheckpointError: an unreadable or incompatible model, or a refused output folder.
        ValueError: no models, no tasks, a model without a tokenizer, or a NaN score.
        KeyError / FileNotFoundError: unknown task or missing task folder (``task_scores``).
    """
    names = [str(m) for m in models]
    if len(set(names)) != len(names):
        raise ValueError(f"a model is given twice: {names}; give each candidate once")
    session = MergeSession(None, names)
    out_path = check_output_dir(out, session.model_paths, overwrite) if out is not None else None
    individual, soup = session_greedy_soup(session, tasks, task_dir, limit, batch_size, log)
    individual, soup.ingredients = {names[i]: v for i, v in individual.items()}, [names[i] for i in soup.ingredients]
    soup.history = [(names[i], value, kept) for i, value, kept in soup.history]
    recipe = MergeRecipe(
        merge_method="linear",
        models=[{"model": m, "parameters": {"weight": 1.0}} for m in names if m in soup.ingredients],
        parameters={"normalize": True},
    )
    result = SoupResult(individual, soup, recipe)
    if out_path is not None:
        result.out = merge_to_folder(result.recipe, out_path, overwrite=overwrite)
    return result


def session_greedy_soup(
    session: MergeSession,
    tasks: Sequence[str],
    task_dir: TaskDirs,
    limit: Optional[int] = None,
    batch_size: int = 32,
    log: Callable[[str], None] = lambda _message: None,
) -> tuple[dict[int, float], GreedySoup[int]]:
    """Greedy soup of the session's models (its base is not a candidate), each soup merged and scored in memory.

    Args:
        session: loaded inputs; the candidates are ``session.model_ckpts``, named by index.
        tasks: lm-eval tasks (higher-is-better primary metrics); the score is their mean.
        task_dir: folder (or folders) of task YAML files.
        limit: examples per task; ``None`` for all.
        batch_size: sequences per forward pass.
        log: called with one line per evaluation.

    Returns:
        ({candidate index: its own score}, the soup over candidate indices).

    Raises:
        ValueError: no tasks, a lower-is-better task (e.g. a perplexity), no tokenizer, or a NaN score.
    """
    if not tasks:
        raise ValueError("greedy soup needs at least one task to score the soups on")
    tokenizer = session.reference.tokenizer()
    if tokenizer is None:
        raise ValueError(f"{session.reference.path}: no tokenizer files; the soups cannot be scored without one")
    n = len(session.model_ckpts)

    def score(ingredients: list[int]) -> float:
        weights = [{"weight": 1.0 if i in ingredients else 0.0} for i in range(n)]
        model = session.build_model(session.merge(session.recipe("linear", {"normalize": True}, weights)))
        scores = task_scores(model, tokenizer, tasks, task_dir, limit, batch_size)
        lower = [t for t, s in scores.items() if not s.higher_is_better]
        if lower:
            raise ValueError(f"greedy soup maximizes its score; {', '.join(lower)} is lower-is-better: leave it out")
        mean = sum(s.value for s in scores.values()) / len(scores)
        names = " + ".join(session.model_ckpts[i].name for i in ingredients)
        log(f"{names}: {mean:.4f} " + " ".join(f"{t}={s.value:.3f}" for t, s in scores.items()))
        return mean

    individual = {i: score([i]) for i in range(n)}
    return individual, greedy_soup(list(range(n)), score=score, soup=list, individual_scores=list(individual.values()))
