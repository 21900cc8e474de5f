"""Ray backend of ``evals.study``: the trials of a grid or search scored by Ray actors.

The driver keeps the Optuna study and asks it for trials (ask-and-tell interface); each actor holds
a ``MergeSession`` of the same inputs (the resident task vectors, loaded once per actor) and merges and
scores the recipes it is sent. Cache lookups, recording and the study database stay on the driver, so
the workers need only the checkpoints and task folders at the same paths. ``ray.init(address=...)``
joins a running cluster; without an address a local Ray instance of ``workers`` CPUs is started (and
left running for the next run in this process; ``ray.shutdown()`` ends it). Workers import this
package: run from the repository root (Ray puts the driver's working directory on their path).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import optuna

from evals.lm_eval_runner import TaskDirs
from explorer.session import MergeSession

if TYPE_CHECKING:
    from evals.study import _How


class ScoringWorker:
    """A Ray actor's state: the inputs loaded once, and a ``RecipeScorer`` over them."""

    def __init__(
        self, base: Optional[str], models: list[str], tokenizer_source: str, task_dir: TaskDirs, batch_size: int
    ):
        from evals.study import RecipeScorer

        self.scorer = RecipeScorer(MergeSession(base, models, tokenizer_source=tokenizer_source), task_dir, batch_size)

    def score(self, recipe_yaml: str, tasks: Sequence[str], limit: Optional[int]) -> dict:
        """``RecipeScorer.score`` in the actor."""
        return self.scorer.score(recipe_yaml, tasks, limit)


def connect(address: Optional[str], workers: int) -> None:
    """Join the Ray cluster at ``address``, or start a local instance of ``workers`` CPUs (once per process)."""
    import ray

    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)


def run_trials_on_ray(
    session: MergeSession,
    study: optuna.Study,
    n_trials: int,
    tasks: Sequence[str],
    limit: Optional[int],
    prepare: Callable,
    finish: Callable,
    how: _How,
) -> optuna.Study:
    """Run ``n_trials`` trials of ``study`` with at most ``workers`` scored at once on Ray actors.

    ``prepare(trial) -> (recipe, hash, cached scores)`` and ``finish(trial, hash, cached, new, seconds)
    -> objective`` are ``evals.study``'s (the same records as the local backend); ``how`` holds the
    run's task folders, batch size, Ray address, workers, progress and cancel (``evals.study._How``).
    A trial whose merge or scoring raises is told FAIL. ``cancel`` is checked as each trial ends: no new trial starts after it
    returns True; the running ones are finished and recorded.
    """
    progress, cancel, workers, task_dir = how.progress, how.cancel, how.workers, how.task_dir
    if n_trials <= 0 or (cancel and cancel()):
        return study
    import ray

    connect(how.ray_address, workers)
    actor = ray.remote(num_cpus=1)(ScoringWorker)
    base = session.base_ckpt.ref if session.base_ckpt else None
    dirs = str(task_dir) if isinstance(task_dir, (str, Path)) else [str(d) for d in task_dir]
    models = [c.ref for c in session.model_ckpts]
    pool = [
        actor.remote(base, models, session.tokenizer_source, dirs, how.batch_size)
        for _ in range(min(workers, n_trials))
    ]
    idle, running = list(pool), {}
    asked = done = 0

    def ended(trial: optuna.Trial, value: Optional[float]) -> None:
        nonlocal done
        done += 1
        if value is None:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
        else:
            study.tell(trial, value)
        if progress:
            progress(done / n_trials, f"trial {trial.number}: {'failed' if value is None else value}")

    try:
        while done < n_trials:
            while idle and asked < n_trials and not (cancel and cancel()):
                trial, asked, start = study.ask(), asked + 1, time.perf_counter()
                try:
                    recipe, key, cached = prepare(trial)
                except (ValueError, KeyError):
                    ended(trial, None)
                    continue
                missing = [t for t in tasks if t not in cached]
                if not missing:
                    ended(trial, finish(trial, key, cached, {}, time.perf_counter() - start))
                    continue
                worker = idle.pop()
                running[worker.score.remote(recipe.to_yaml(), missing, limit)] = (trial, key, cached, worker, start)
            if not running:
                break
            [ref], _ = ray.wait(list(running), num_returns=1)
            trial, key, cached, worker, start = running.pop(ref)
            idle.append(worker)
            try:
                new = ray.get(ref)
            except ray.exceptions.RayTaskError:  # the merge or the scoring raised: this recipe fails
                ended(trial, None)
                continue
            except ray.exceptions.RayError as e:  # a worker died (or never started): stop the run
                for other in [trial, *(r[0] for r in running.values())]:
                    study.tell(other, state=optuna.trial.TrialState.FAIL)
                raise RuntimeError(f"a Ray worker failed: {e}") from e
            ended(trial, finish(trial, key, cached, new, time.perf_counter() - start))
    finally:
        for worker in pool:
            ray.kill(worker)
    return study
