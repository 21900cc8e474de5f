"""Sweeps and searches over a merge method's parameters as Optuna studies, each trial merged in memory.

A *grid* (``run_grid``: one or two parameters, Optuna's ``GridSampler``) or a *search* (``run_search``:
TPE or CMA-ES, as mergekit-evolve searches with CMA-ES, over every parameter of a method, with a trial
budget) is an Optuna study stored in ``<storage_dir>/merge_studies.db`` (SQLite): a study survives a
restart and is resumed by running it again under the same name. Every trial builds a recipe
(``trial_recipe``), merges it in memory (``MergeSession.merge``: no checkpoint is written) and scores it
with lm-eval (``task_scores``: each task's primary metric). The objective, maximized, is the mean
held-in score (a metric where lower is better, e.g. a perplexity, enters negated); held-out scores are
recorded beside it. Scores are cached in the same database file (table ``score_cache``, keyed by
recipe hash + task + limit), so a recipe is never scored twice on a task, in any study.
``backend="ray"`` runs the trials on Ray actors (``evals.study_ray``). ``study_table`` reads a study
as a DataFrame, ``export_table`` writes it as CSV or JSON, ``best_recipe`` gives the best trial's recipe.

Parameter names: a global parameter by its name (``lambda``), a per-model one per model as
``density[0]``, ``density[1]`` (model order of the session); in a grid, ``density`` alone sets every
model's value, and ``mix`` sets the weights of two models to ``(mix, 1 - mix)``.
"""

from __future__ import annotations

import hashlib
import json
import math
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import optuna
import pandas as pd

from evals.lm_eval_runner import TaskDirs, task_scores
from explorer import registry
from explorer.progress import Progress
from explorer.recipe import MergeRecipe
from explorer.session import MergeSession

DB_NAME = "merge_studies.db"
SAMPLERS = ("tpe", "cmaes")
Cancel = Callable[[], bool]  # True once the run should stop (e.g. ``threading.Event().is_set``)
TaskScore = tuple[float, float, int, bool]  # value, stderr, examples, higher_is_better

optuna.logging.set_verbosity(optuna.logging.WARNING)


def storage_url(storage_dir: str | Path) -> str:
    """Optuna's storage URL of the studies database in ``storage_dir`` (created if missing)."""
    folder = Path(storage_dir)
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(folder / DB_NAME).resolve()}"


def recipe_hash(recipe: MergeRecipe) -> str:
    """sha256 of the recipe's canonical JSON (keys sorted): equal for equal recipes, whatever made them."""
    data = recipe.model_dump(mode="json", exclude_none=True)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def search_space(method: str, n_models: int, fixed: Optional[dict] = None) -> dict[str, Any]:
    """Optuna distributions over every searchable parameter of ``method`` that ``fixed`` does not set.

    Numbers span the spec's [low, high] with its step (per-model weights from max(low, 0): a negative
    weight negates a task, which a merge search does not look for); flags and choices are categorical.
    Setup parameters (Fisher estimation) and numbers without a range keep their default.
    """
    fixed = {**(fixed or {}), **({"weight": None} if "mix" in (fixed or {}) else {})}  # mix sets the weights
    space: dict[str, Any] = {}
    for p in registry.get(method).params:
        names = [f"{p.name}[{i}]" for i in range(n_models)] if p.per_model else [p.name]
        if p.setup or p.name in fixed:
            continue
        if isinstance(p.default, bool):
            dist = optuna.distributions.CategoricalDistribution([True, False])
        elif p.enum is not None:
            dist = optuna.distributions.CategoricalDistribution(list(p.choices))
        elif p.low is not None and p.high is not None:
            low = max(p.low, 0.0) if p.name == "weight" else p.low
            step = p.step if p.step and (p.high - low) / p.step == round((p.high - low) / p.step) else None
            dist = optuna.distributions.FloatDistribution(low, p.high, step=step)
        else:
            continue
        space.update({n: dist for n in names if n not in fixed})
    return space


def trial_recipe(session: MergeSession, method: str, values: dict, seed: int = 0) -> MergeRecipe:
    """The recipe of ``method`` over the session's inputs with ``values`` (names as in the module doc).

    Every non-setup parameter is written (its default when not in ``values``), so equal merges give
    equal recipes and hashes. Raises KeyError for an unknown parameter, ValueError for a bad value.
    """
    spec = registry.get(method)
    n = len(session.model_ckpts)
    values = dict(values)
    if "mix" in values:
        if n != 2:
            raise ValueError(f"mix weighs two models; the session has {n}")
        mix = float(values.pop("mix"))
        values.update({"weight[0]": mix, "weight[1]": 1.0 - mix})
    known = {p.name for p in spec.params}
    for key in values:
        if key.split("[")[0] not in known:
            raise KeyError(f"{method} has no parameter {key!r}; it has {sorted(known)}")
    parameters, per_model = {}, [{} for _ in range(n)]
    for p in spec.params:
        if p.per_model:
            for i in range(n):
                value = values.get(f"{p.name}[{i}]", values.get(p.name, p.default))
                if not p.setup or f"{p.name}[{i}]" in values or p.name in values:
                    per_model[i][p.name] = _plain(value)
        elif not p.setup or p.name in values:
            parameters[p.name] = _plain(values.get(p.name, p.default))
    return session.recipe(method, parameters, per_model, seed=seed)


def _plain(value: Any) -> Any:
    """A YAML-friendly parameter value: enum members as their string, numbers as floats rounded to 10 decimals."""
    if hasattr(value, "value") and not isinstance(value, (bool, int, float)):
        return value.value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return round(float(value), 10)  # 1 and 1.0 are one recipe
    return value


class ScoreCache:
    """Per-task scores in the studies database, keyed by (recipe hash, task, limit); limit -1 = all examples."""

    def __init__(self, storage_dir: str | Path):
        storage_url(storage_dir)
        self.path = Path(storage_dir) / DB_NAME
        with self._connect() as db:
            db.execute(
                "CREATE TABLE IF NOT EXISTS score_cache (recipe_hash TEXT, task TEXT, lim INTEGER, value REAL, "
                "stderr REAL, n INTEGER, higher_is_better INTEGER, PRIMARY KEY (recipe_hash, task, lim))"
            )

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=60)

    def get(self, key: str, tasks: Sequence[str], limit: Optional[int]) -> dict[str, TaskScore]:
        """The cached scores of ``tasks`` (those found) for recipe hash ``key``."""
        with self._connect() as db:
            rows = db.execute(
                "SELECT task, value, stderr, n, higher_is_better FROM score_cache WHERE recipe_hash = ? AND lim = ?",
                (key, -1 if limit is None else limit),
            ).fetchall()
        found = {r[0]: (r[1], math.nan if r[2] is None else r[2], r[3], bool(r[4])) for r in rows}
        return {t: found[t] for t in tasks if t in found}

    def put(self, key: str, scores: dict[str, TaskScore], limit: Optional[int]) -> None:
        """Store ``{task: score}`` for recipe hash ``key``."""
        lim = -1 if limit is None else limit
        with self._connect() as db:
            db.executemany(
                "INSERT OR REPLACE INTO score_cache VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(key, t, lim, v, None if math.isnan(e) else e, n, int(h)) for t, (v, e, n, h) in scores.items()],
            )


class RecipeScorer:
    """Merges recipes over one session's resident inputs and scores them with lm-eval (``task_scores``)."""

    def __init__(self, session: MergeSession, task_dir: TaskDirs, batch_size: int = 32):
        self.session, self.task_dir, self.batch_size = session, task_dir, batch_size
        self.tokenizer = session.reference.tokenizer()
        if self.tokenizer is None:
            raise ValueError(f"{session.reference.path}: no tokenizer files; merges cannot be scored without one")

    def score(self, recipe_yaml: str, tasks: Sequence[str], limit: Optional[int]) -> dict[str, TaskScore]:
        """``{task: (value, stderr, n, higher_is_better)}`` of the merge ``recipe_yaml`` (YAML: it crosses processes)."""
        recipe = MergeRecipe.from_yaml(recipe_yaml)
        model = self.session.build_model(self.session.merge(recipe))
        scores = task_scores(model, self.tokenizer, list(tasks), self.task_dir, limit, self.batch_size)
        return {t: (s.value, s.stderr, s.n, s.higher_is_better) for t, s in scores.items()}


def _suggest(trial: optuna.Trial, name: str, dist: Any) -> Any:
    """``trial``'s value of parameter ``name`` drawn from ``dist`` (a Float or Categorical distribution)."""
    if isinstance(dist, optuna.distributions.CategoricalDistribution):
        return trial.suggest_categorical(name, dist.choices)
    return trial.suggest_float(name, dist.low, dist.high, step=dist.step, log=dist.log)


def _objective(scores: dict[str, TaskScore], tasks: Sequence[str]) -> float:
    """Mean of ``tasks``' scores, lower-is-better metrics negated; NaN without tasks."""
    values = [scores[t][0] if scores[t][3] else -scores[t][0] for t in tasks]
    return sum(values) / len(values) if values else math.nan


def _open(storage_dir, name: str, sampler: optuna.samplers.BaseSampler, config: dict) -> optuna.Study:
    """Create or re-open study ``name``; ValueError when it exists with another configuration."""
    study = optuna.create_study(
        storage=storage_url(storage_dir), study_name=name, sampler=sampler, direction="maximize", load_if_exists=True
    )
    old = study.user_attrs.get("config")
    if old is None:
        study.set_user_attr("config", config)
    elif old != json.loads(json.dumps(config)):
        raise ValueError(f"study {name!r} in {storage_dir} was run with other settings; give another study name")
    return study


@dataclass(frozen=True)
class _How:
    """How the trials run: ``run_grid``'s arguments of the same names."""

    task_dir: TaskDirs
    batch_size: int
    backend: str
    ray_address: Optional[str]
    workers: int
    progress: Optional[Progress]
    cancel: Optional[Cancel]


def _run(
    session: MergeSession, study: optuna.Study, storage_dir, space: dict, n_trials: int, config: dict, how: _How
) -> optuna.Study:
    """Ask ``n_trials`` more trials of ``study`` (fewer when cancelled), score them, tell the results."""
    cache = ScoreCache(storage_dir)
    tasks = [*config["held_in"], *config["held_out"]]
    limit = config["limit"]

    def prepare(trial: optuna.Trial) -> tuple[MergeRecipe, str, dict]:
        values = {name: _suggest(trial, name, dist) for name, dist in space.items()}
        recipe = trial_recipe(session, config["method"], {**config["fixed"], **values}, config["seed"])
        key = recipe_hash(recipe)
        trial.set_user_attr("recipe", recipe.to_yaml())
        trial.set_user_attr("recipe_hash", key)
        return recipe, key, cache.get(key, tasks, limit)

    def finish(trial: optuna.Trial, key: str, cached: dict, new: dict, seconds: float) -> float:
        cache.put(key, new, limit)
        scores = {t: {**cached, **new}[t] for t in tasks}
        trial.set_user_attr("scores", {t: list(s) for t, s in scores.items()})
        trial.set_user_attr("cached", not new)
        trial.set_user_attr("seconds", round(seconds, 3))
        trial.set_user_attr("held_out_mean", _objective(scores, config["held_out"]))
        return _objective(scores, config["held_in"])

    if how.backend == "ray":
        from evals.study_ray import run_trials_on_ray

        return run_trials_on_ray(session, study, n_trials, tasks, limit, prepare, finish, how)
    if how.backend != "local":
        raise ValueError(f"backend {how.backend!r}: give 'local' or 'ray'")
    scorer = RecipeScorer(session, how.task_dir, how.batch_size)
    done = [0]

    def objective(trial: optuna.Trial) -> float:
        start = time.perf_counter()
        recipe, key, cached = prepare(trial)
        missing = [t for t in tasks if t not in cached]
        new = scorer.score(recipe.to_yaml(), missing, limit) if missing else {}
        return finish(trial, key, cached, new, time.perf_counter() - start)

    def after(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        done[0] += 1
        if how.progress:
            how.progress(done[0] / n_trials, f"trial {trial.number}: {trial.state.name.lower()} {trial.value}")
        if how.cancel and how.cancel():
            study.stop()

    if n_trials > 0 and not (how.cancel and how.cancel()):
        study.optimize(objective, n_trials=n_trials, callbacks=[after], catch=(ValueError, RuntimeError))
    return study


def run_grid(
    session: MergeSession,
    method: str,
    grid: dict[str, Sequence],
    held_in: Sequence[str],
    task_dir: TaskDirs,
    storage_dir: str | Path,
    study_name: Optional[str] = None,
    held_out: Sequence[str] = (),
    fixed: Optional[dict] = None,
    limit: Optional[int] = None,
    batch_size: int = 32,
    seed: int = 0,
    backend: str = "local",
    ray_address: Optional[str] = None,
    workers: int = 2,
    progress: Optional[Progress] = None,
    cancel: Optional[Cancel] = None,
) -> optuna.Study:
    """Score every point of ``grid`` (e.g. ``{"lambda": [0.5, 1.0, 1.5]}``, one or two keys) not yet in the study.

    Args:
        session: the loaded inputs (``MergeSession``); with ``backend="ray"`` each worker loads the same paths.
        method: registered merge method.
        grid: parameter name -> values (names as in the module doc; ``mix`` for a weight between two models).
        held_in: lm-eval tasks whose mean score is the objective.
        task_dir: folder (or folders) of task YAML files.
        storage_dir: folder of ``merge_studies.db`` (created).
        study_name: default: ``grid-<method>-<hash of the settings>`` (the same call resumes the same study).
        held_out: tasks scored and recorded, not optimized.
        fixed: other parameters' values (default: the method's defaults).
        limit: examples per task; ``None`` for all.
        batch_size: sequences per forward pass.
        seed: the recipes' seed (random methods: DARE, DELLA).
        backend: ``"local"`` (this process) or ``"ray"``.
        ray_address: Ray cluster to join (``ray.init(address=...)``); ``None``: a local Ray instance of ``workers`` CPUs.
        workers: Ray actors (each holds the inputs in memory).
        progress: called ``(fraction, message)`` after each trial.
        cancel: checked between trials; return True to stop after the current one (e.g. ``event.is_set``).

    Returns:
        The Optuna study (``study_table(storage_dir, study.study_name)`` reads it as a table).

    Raises:
        ValueError: an empty grid or more than two parameters, a bad value, or a study of that name with
        other settings. KeyError: an unknown method, parameter or task.
    """
    if not 1 <= len(grid) <= 2 or not all(len(v) for v in grid.values()):
        raise ValueError(f"a grid spans one or two parameters, each with at least one value; got {grid}")
    grid = {k: [_plain(v) for v in vs] for k, vs in grid.items()}
    first = {k: v[0] for k, v in grid.items()}
    for name, values in grid.items():  # fail early, on any value out of range
        for value in values:
            trial_recipe(session, method, {**(fixed or {}), **first, name: value}, seed)
    config = _config(session, "grid", method, held_in, held_out, fixed, limit, seed, grid=grid)
    name = study_name or f"grid-{method}-{_short_hash(config)}"
    study = _open(storage_dir, name, optuna.samplers.GridSampler(grid, seed=seed), config)
    space = {k: optuna.distributions.CategoricalDistribution(v) for k, v in grid.items()}
    total = math.prod(len(v) for v in grid.values())
    finished = {tuple(t.params[k] for k in grid) for t in study.trials if t.state.is_finished()}
    todo = total - len(finished & set(_points(grid)))
    how = _How(task_dir, batch_size, backend, ray_address, workers, progress, cancel)
    return _run(session, study, storage_dir, space, todo, config, how)


def run_search(
    session: MergeSession,
    method: str,
    n_trials: int,
    held_in: Sequence[str],
    task_dir: TaskDirs,
    storage_dir: str | Path,
    study_name: Optional[str] = None,
    held_out: Sequence[str] = (),
    sampler: str = "tpe",
    fixed: Optional[dict] = None,
    limit: Optional[int] = None,
    batch_size: int = 32,
    seed: int = 0,
    backend: str = "local",
    ray_address: Optional[str] = None,
    workers: int = 2,
    progress: Optional[Progress] = None,
    cancel: Optional[Cancel] = None,
) -> optuna.Study:
    """Search every parameter of ``method`` (``search_space``) with TPE or CMA-ES up to ``n_trials`` finished trials.

    ``n_trials`` is the study's whole budget: re-running a study of that name runs only the trials it lacks.
    ``sampler``: ``"tpe"`` (``TPESampler``) or ``"cmaes"`` (``CmaEsSampler``; choices and flags are sampled
    independently), both seeded with ``seed``. Other arguments, return value and errors as in ``run_grid``.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler {sampler!r}: give one of {', '.join(SAMPLERS)}")
    space = search_space(method, len(session.model_ckpts), fixed)
    trial_recipe(session, method, fixed or {}, seed)  # fail early on a bad fixed value
    config = _config(session, "search", method, held_in, held_out, fixed, limit, seed, sampler=sampler)
    name = study_name or f"search-{method}-{_short_hash(config)}"
    if sampler == "tpe":
        chosen = optuna.samplers.TPESampler(seed=seed)
    else:
        chosen = optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    study = _open(storage_dir, name, chosen, config)
    todo = max(0, n_trials - sum(t.state.is_finished() for t in study.trials))
    how = _How(task_dir, batch_size, backend, ray_address, workers, progress, cancel)
    return _run(session, study, storage_dir, space, todo, config, how)


def _points(grid: dict[str, list]) -> list[tuple]:
    """Every combination of the grid's values, first key slowest."""
    points = [()]
    for values in grid.values():
        points = [(*p, v) for p in points for v in values]
    return points


def _config(session, kind, method, held_in, held_out, fixed, limit, seed, **extra) -> dict:
    """What a study was made with (stored on it; a re-run under the same name must match)."""
    if not held_in:
        raise ValueError("give at least one held-in task: their mean score is what the study maximizes")
    return {
        "kind": kind,
        "method": method,
        "base": session.base_ckpt.ref if session.base_ckpt else None,
        "models": [c.ref for c in session.model_ckpts],
        "held_in": list(held_in),
        "held_out": list(held_out),
        "fixed": {k: _plain(v) for k, v in (fixed or {}).items()},
        "limit": limit,
        "seed": seed,
        **extra,
    }


def _short_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:8]


def study_table(storage_dir: str | Path, study_name: str) -> pd.DataFrame:
    """One row per trial of the study, in trial order.

    Columns: ``trial``, ``state`` (COMPLETE, FAIL, RUNNING), ``params_<name>`` per searched parameter,
    ``held_in_mean`` (the objective), ``held_out_mean``, then per task ``<task>`` (score),
    ``<task>_stderr``, ``<task>_n``, then ``cached`` (every score from the cache), ``seconds``,
    ``recipe_hash``, ``recipe`` (YAML). ``table.attrs`` holds the study's settings (``study``, ``kind``,
    ``method``, ``held_in``, ``held_out``, ``limit``, ``models``, ...).
    """
    study = optuna.load_study(study_name=study_name, storage=storage_url(storage_dir))
    config = study.user_attrs.get("config", {})
    tasks = [*config.get("held_in", []), *config.get("held_out", [])]
    params = list(dict.fromkeys(k for t in study.trials for k in t.params))
    rows = []
    for t in study.trials:
        attrs = t.user_attrs
        row = {"trial": t.number, "state": t.state.name}
        row.update({f"params_{k}": t.params.get(k) for k in params})
        row.update(held_in_mean=t.value, held_out_mean=attrs.get("held_out_mean"))
        for task in tasks:
            value, stderr, n, _ = attrs.get("scores", {}).get(task, (None, None, None, None))
            row.update({task: value, f"{task}_stderr": stderr, f"{task}_n": n})
        row.update({k: attrs.get(k) for k in ("cached", "seconds", "recipe_hash", "recipe")})
        rows.append(row)
    table = pd.DataFrame(rows)
    table.attrs = {"study": study_name, **config}
    return table


def export_table(table: pd.DataFrame, path: str | Path) -> Path:
    """Write ``table`` as CSV (``.csv``) or JSON (``.json``: ``{"study": attrs, "trials": [rows]}``)."""
    path = Path(path)
    if path.suffix == ".csv":
        table.to_csv(path, index=False)
    elif path.suffix == ".json":
        rows = json.loads(table.to_json(orient="records"))
        path.write_text(json.dumps({"study": table.attrs, "trials": rows}, indent=1))
    else:
        raise ValueError(f"{path}: export to a .csv or a .json file")
    return path


def read_table(path: str | Path) -> pd.DataFrame:
    """A table written by ``export_table`` (JSON brings back ``attrs`` too)."""
    path = Path(path)
    if path.suffix == ".csv":
        return pd.read_csv(path)
    data = json.loads(path.read_text())
    table = pd.DataFrame(data["trials"])
    table.attrs = data["study"]
    return table


def best_recipe(storage_dir: str | Path, study_name: str) -> MergeRecipe:
    """The recipe of the study's best finished trial (highest held-in mean); ValueError when none finished."""
    study = optuna.load_study(study_name=study_name, storage=storage_url(storage_dir))
    if not any(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials):
        raise ValueError(f"study {study_name!r} has no finished trial yet")
    return MergeRecipe.from_yaml(study.best_trial.user_attrs["recipe"])


def study_names(storage_dir: str | Path) -> list[str]:
    """Names of the studies in ``storage_dir``'s database, oldest first (none when there is no database)."""
    if not (Path(storage_dir) / DB_NAME).exists():
        return []
    return [s.study_name for s in optuna.get_all_study_summaries(storage_url(storage_dir), include_best_trial=False)]
