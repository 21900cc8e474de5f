"""Greedy soup (Wortsman et al., Model soups, arXiv:2203.05482, Algorithm 1).

Candidates are tried in order of their own held-out score, best first; each joins the soup only if the
soup's held-out score does not drop. The algorithm is pure: the caller supplies ``soup`` (candidates ->
anything, e.g. a uniform ``linear`` merge in memory) and ``score`` (that thing -> held-out score,
higher is better), so it runs without models in tests. Over checkpoint folders scored with lm-eval:
``evals.greedy_soup`` (``python -m evals greedy-soup MODEL ... --task-dir DIR --task TASK --out DIR``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Generic, Optional, Sequence, TypeVar

T = TypeVar("T")


@dataclass
class GreedySoup(Generic[T]):
    """The result: chosen ingredients (in the order added), the soup's score, and every step tried."""

    ingredients: list[T]
    score: float
    history: list[tuple[T, float, bool]] = field(default_factory=list)  # (candidate, soup score with it, kept)


def greedy_soup(
    candidates: Sequence[T],
    score: Callable[[object], float],
    soup: Callable[[list[T]], object] = list,
    individual_scores: Optional[Sequence[float]] = None,
) -> GreedySoup[T]:
    """Greedy soup of ``candidates``.

    individual_scores: each candidate's own held-out score; computed as score(soup([c])) when omitted.
    The best candidate starts the soup; the others follow in descending score order (ties keep the
    given order) and are kept when score(soup(ingredients + [c])) >= the current soup's score.
    Calls ``score`` at most 2N - 1 times. Raises ValueError for no candidates or a score list of
    another length, or when a score is NaN.
    """
    if not candidates:
        raise ValueError("greedy soup needs at least one candidate")
    if individual_scores is None:
        individual_scores = [_checked(score(soup([c]))) for c in candidates]
    if len(individual_scores) != len(candidates):
        raise ValueError(f"{len(individual_scores)} individual scores for {len(candidates)} candidates")
    order = sorted(range(len(candidates)), key=lambda i: -individual_scores[i])
    first = candidates[order[0]]
    result = GreedySoup([first], _checked(individual_scores[order[0]]), [(first, individual_scores[order[0]], True)])
    for i in order[1:]:
        trial = _checked(score(soup(result.ingredients + [candidates[i]])))
        kept = trial >= result.score
        result.history.append((candidates[i], trial, kept))
        if kept:
            result.ingredients.append(candidates[i])
            result.score = trial
    return result


def _checked(value: float) -> float:
    if math.isnan(value):
        raise ValueError("greedy soup: a score is NaN; fix the evaluation before souping")
    return float(value)
