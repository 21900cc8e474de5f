"""Evaluation with lm-eval: the only package that imports ``lm_eval``.

``evaluate_model`` and ``compare`` score models already in memory on local, offline task folders (or
lm-eval's built-in tasks whose data is on this machine); ``list_tasks`` and ``task_dirs`` find those
tasks. ``score_stream``, ``normalized_scores`` and ``comparison_chart`` (``evals.comparison``) put base,
experts, merges and the output ensemble (``evals.ensemble``) side by side.
"""

from __future__ import annotations

from evals.comparison import comparison_chart, normalized_scores, primary, score_stream, wide_scores
from evals.lm_eval_runner import check_tasks, compare, evaluate_model, list_tasks, task_dirs

__all__ = [
    "check_tasks",
    "compare",
    "comparison_chart",
    "evaluate_model",
    "list_tasks",
    "normalized_scores",
    "primary",
    "score_stream",
    "task_dirs",
    "wide_scores",
]
