"""Evaluation with lm-eval: the only package that imports ``lm_eval``.

``evaluate_model`` and ``compare`` score models already in memory on local, offline task folders;
``list_tasks`` and ``task_dirs`` find those tasks.
"""

from __future__ import annotations

from evals.lm_eval_runner import compare, evaluate_model, list_tasks, task_dirs

__all__ = ["compare", "evaluate_model", "list_tasks", "task_dirs"]
