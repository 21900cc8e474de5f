"""Sweeps and searches (``evals.study``) on the tiny zoo, offline.

A 3-point grid whose table equals lm-eval's own results for the same merged models, the score cache,
resuming from the SQLite file, cancel, export, a 3-trial TPE search over every parameter of ties, and
the same search on a local Ray instance of 2 CPUs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import optuna
import pandas as pd
import pytest

import evals.study as study_mod
from evals.lm_eval_runner import task_scores
from evals.study import (
    best_recipe,
    export_table,
    read_table,
    recipe_hash,
    run_grid,
    run_search,
    search_space,
    study_names,
    study_table,
    trial_recipe,
)
from explorer.session import MergeSession
from explorer.zoo.testbed import tiny_testbed

LIMIT = 20
HELD_IN = ["zoo_add", "zoo_reverse"]
HELD_OUT = ["zoo_upper"]
TASKS = HELD_IN + HELD_OUT
GRID = {"mix": [0.5, 0.8, 1.0]}  # linear weights (mix, 1 - mix) of expert-add and expert-reverse


@pytest.fixture(scope="module")
def bed(zoo_dir: Path):
    return tiny_testbed(zoo_dir)


@pytest.fixture(scope="module")
def session(bed) -> MergeSession:
    return MergeSession(bed.base, [bed.experts["add"], bed.experts["reverse"]])


@pytest.fixture(scope="module")
def storage(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("studies")


@pytest.fixture()
def calls(monkeypatch: pytest.MonkeyPatch) -> list:
    """Every lm-eval run the study makes (tasks asked), still running the real ``task_scores``."""
    seen = []

    def counting(model, tokenizer, tasks, *args, **kwargs):
        seen.append(list(tasks))
        return task_scores(model, tokenizer, tasks, *args, **kwargs)

    monkeypatch.setattr(study_mod, "task_scores", counting)
    return seen


def grid(session, bed, storage, name, **kwargs):
    return run_grid(
        session, "linear", GRID, HELD_IN, bed.task_dir, storage, name, held_out=HELD_OUT, limit=LIMIT, **kwargs
    )


@pytest.fixture(scope="module")
def grid_table(session, bed, storage) -> pd.DataFrame:
    grid(session, bed, storage, "mix")
    return study_table(storage, "mix")


def test_grid_table_is_lm_evals_own_result(grid_table: pd.DataFrame, session, bed, storage):
    assert list(grid_table["state"]) == ["COMPLETE"] * 3
    assert sorted(grid_table["params_mix"]) == GRID["mix"]
    assert grid_table.attrs["held_in"] == HELD_IN and grid_table.attrs["method"] == "linear"
    tokenizer = session.reference.tokenizer()
    for _, row in grid_table.iterrows():
        recipe = trial_recipe(session, "linear", {"mix": row["params_mix"]})
        assert recipe_hash(recipe) == row["recipe_hash"] and recipe.to_yaml() == row["recipe"]
        model = session.build_model(session.merge(recipe))
        direct = task_scores(model, tokenizer, TASKS, bed.task_dir, LIMIT)
        for task, score in direct.items():
            assert (row[task], row[f"{task}_stderr"], row[f"{task}_n"]) == tuple(score)[:3]  # value, stderr, n
        assert row["held_in_mean"] == pytest.approx(sum(direct[t][0] for t in HELD_IN) / 2)
        assert row["held_out_mean"] == direct["zoo_upper"][0]
    by_mix = grid_table.set_index("params_mix")
    assert by_mix.loc[1.0, "zoo_add"] > 0.5 > by_mix.loc[0.5, "zoo_add"], "the curve: expert-add alone vs the even mix"
    assert best_recipe(storage, "mix").models[0].parameters["weight"] == 1.0


def test_rerun_resumes_and_cache_scores_nothing_twice(grid_table, session, bed, storage, calls):
    assert len(grid(session, bed, storage, "mix").trials) == 3 and calls == [], "a finished grid runs no trial"
    again = study_table(storage, grid(session, bed, storage, "mix-again").study_name)
    assert calls == [] and list(again["cached"]) == [True] * 3, "another study of the same recipes reads the cache"
    columns = ["params_mix", "held_in_mean", *TASKS]
    expected = grid_table[columns].sort_values("params_mix").reset_index(drop=True)
    pd.testing.assert_frame_equal(again[columns].sort_values("params_mix").reset_index(drop=True), expected)
    assert {"mix", "mix-again"} <= set(study_names(storage))


def test_cancel_stops_after_the_current_trial_and_the_study_resumes(grid_table, session, bed, storage, calls):
    seen = []
    grid(session, bed, storage, "mix-cancel", cancel=lambda: bool(seen), progress=lambda f, m: seen.append(f))
    assert len(study_table(storage, "mix-cancel")) == 1 and seen == [pytest.approx(1 / 3)]
    grid(session, bed, storage, "mix-cancel")  # re-opened from the SQLite file: only the two missing points run
    table = study_table(storage, "mix-cancel")
    assert sorted(table["params_mix"]) == GRID["mix"] and calls == []


def test_export_round_trips(grid_table: pd.DataFrame, tmp_path: Path):
    csv = read_table(export_table(grid_table, tmp_path / "mix.csv"))
    pd.testing.assert_frame_equal(csv, grid_table, check_dtype=False)
    back = read_table(export_table(grid_table, tmp_path / "mix.json"))
    pd.testing.assert_frame_equal(back, grid_table, check_dtype=False)
    assert back.attrs == json.loads(json.dumps(grid_table.attrs))
    with pytest.raises(ValueError, match="csv or a .json"):
        export_table(grid_table, tmp_path / "mix.txt")


def test_search_space_is_every_parameter_of_ties():
    space = search_space("ties", 2)
    expected = {"weight[0]", "weight[1]", "density[0]", "density[1]", "lambda", "normalize"}
    assert set(space) == expected | {"rescale", "trim_scope", "election", "divisor"}
    assert space["weight[0]"].low == 0.0 and space["density[1]"].high == 1.0
    assert "lambda" not in search_space("ties", 2, fixed={"lambda": 1.0})
    assert "weight[0]" not in search_space("linear", 2, fixed={"mix": 0.5})


def test_equal_recipes_hash_equal(session):
    a = trial_recipe(session, "ties", {"density": 0.5, "lambda": 1.0})
    b = trial_recipe(session, "ties", {"density[1]": 0.5, "density[0]": 0.5, "lambda": 1})
    assert recipe_hash(a) == recipe_hash(b)
    assert recipe_hash(a) != recipe_hash(trial_recipe(session, "ties", {"density": 0.4}))
    with pytest.raises(KeyError, match="no parameter"):
        trial_recipe(session, "ties", {"t": 0.5})


def search(session, bed, storage, **kwargs):
    return run_search(
        session, "ties", 3, HELD_IN, bed.task_dir, storage, "ties-tpe", held_out=HELD_OUT, limit=LIMIT, **kwargs
    )


@pytest.fixture(scope="module")
def search_table(session, bed, storage) -> pd.DataFrame:
    search(session, bed, storage)
    return study_table(storage, "ties-tpe")


def test_tpe_search_over_every_parameter(search_table: pd.DataFrame, session, bed, storage):
    assert list(search_table["state"]) == ["COMPLETE"] * 3
    params = {c.removeprefix("params_") for c in search_table if c.startswith("params_")}
    assert params == set(search_space("ties", 2))
    best = search_table.loc[search_table["held_in_mean"].idxmax()]
    recipe = best_recipe(storage, "ties-tpe")
    assert recipe.to_yaml() == best["recipe"]
    direct = task_scores(
        session.build_model(session.merge(recipe)), session.reference.tokenizer(), TASKS, bed.task_dir, LIMIT
    )
    assert [best[t] for t in TASKS] == [direct[t][0] for t in TASKS]
    assert len(search(session, bed, storage).trials) == 3, "the budget is the study's: a re-run adds nothing"


def test_cma_es_search(session, bed, tmp_path: Path):
    study = run_search(session, "linear", 2, HELD_IN, bed.task_dir, tmp_path, "cma", sampler="cmaes", limit=5)
    assert isinstance(study.sampler, optuna.samplers.CmaEsSampler)
    table = study_table(tmp_path, "cma")
    assert list(table["state"]) == ["COMPLETE"] * 2 and list(table["zoo_add_n"]) == [5, 5]
    assert {"params_weight[0]", "params_weight[1]", "params_normalize"} <= set(table)


@pytest.mark.slow
def test_search_on_local_ray_matches_the_local_search(search_table, session, bed, tmp_path: Path):
    import ray

    try:
        study = search(session, bed, tmp_path, backend="ray", workers=2)  # a fresh database: nothing cached
        assert ray.cluster_resources().get("CPU") == 2
    finally:
        ray.shutdown()
    table = study_table(tmp_path, study.study_name)
    assert list(table["state"]) == ["COMPLETE"] * 3 and not table["cached"].any()
    columns = [c for c in search_table if c.startswith("params_")] + ["held_in_mean", *TASKS]
    key = [c for c in columns if c.startswith("params_")]
    ours = table[columns].sort_values(key).reset_index(drop=True)
    pd.testing.assert_frame_equal(ours, search_table[columns].sort_values(key).reset_index(drop=True))
    assert all(not math.isnan(v) for v in table["held_out_mean"])


def test_cli_sweep_resumes_the_study_and_writes_json(grid_table, bed, storage, tmp_path: Path, calls, capsys):
    from evals.__main__ import main

    models = [str(bed.experts["add"]), str(bed.experts["reverse"])]
    common = ["--base", str(bed.base), "--held-in", ",".join(HELD_IN), "--task-dir", str(bed.task_dir)]
    common += ["--storage", str(storage), "--limit", str(LIMIT)]
    out = tmp_path / "mix.json"
    argv = ["sweep", *models, "--method", "linear", "--grid", "mix=0.5,0.8,1.0", "--held-out", "zoo_upper"]
    assert main([*argv, *common, "--study", "mix", "--out", str(out)]) == 0
    assert calls == [], "the CLI re-opened the test's study: every point was done"
    assert "best recipe:" in capsys.readouterr().out
    pd.testing.assert_frame_equal(read_table(out), grid_table, check_dtype=False)
    assert main(["search", *models, "--method", "tiess", "--trials", "3", *common]) == 2
    assert "did you mean" in capsys.readouterr().err.lower()


def test_a_grid_value_out_of_range_is_refused_before_any_trial(session, bed, tmp_path: Path, calls):
    """Any value of the grid, not only the first, is checked first: no trial runs, no study row says FAIL."""
    with pytest.raises(ValueError, match=r"density=1.5 is outside \[0.0, 1.0\]"):
        run_grid(session, "ties", {"density": [0.5, 1.0, 1.5]}, HELD_IN, bed.task_dir, tmp_path, "bad", limit=LIMIT)
    assert calls == [] and not (tmp_path / study_mod.DB_NAME).exists()
