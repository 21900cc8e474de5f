"""Incremental re-merge (``explorer.stage_cache``): every slider move equals a merge from scratch, bit for bit."""

from __future__ import annotations

import pytest
import torch

from explorer import registry
from explorer.session import MergeSession
from explorer.stage_cache import StageCache
from tests.tiny import tiny_family

STAGED = [m.name for m in registry.all_methods() if m.staged]


@pytest.fixture(scope="module")
def session(tmp_path_factory) -> MergeSession:
    base, experts = tiny_family(tmp_path_factory.mktemp("stages"), n_experts=3)
    return MergeSession(base, experts)


def _start(method: str) -> tuple[dict, list[dict]]:
    """Global and per-model params of a first merge: every per-model param set, DELLA's band valid."""
    spec = registry.get(method)
    per_model = [{"weight": w} for w in (0.6, 0.3, -0.2)]
    for p in spec.per_model_params:
        if p.name == "density":
            for pm, d in zip(per_model, (0.3, 0.5, 0.7), strict=True):
                pm["density"] = d
    return ({"lambda": 1.0} if any(p.name == "lambda" for p in spec.params) else {}), per_model


def _moves(method: str) -> list[tuple[str, dict, list[dict]]]:
    """One move of every parameter of ``method`` (each from the start), as (what moved, global, per-model)."""
    spec = registry.get(method)
    moves = []
    for p in spec.params:
        glob, per_model = _start(method)
        if p.per_model:
            value = {"weight": 0.9, "density": 0.4, "gamma": 0.05, "epsilon": 0.1}[p.name]
            per_model[1][p.name] = value
        elif p.enum is not None:
            value = next(c for c in p.choices if c != p.default)
            glob[p.name] = value
        elif isinstance(p.default, bool):
            glob[p.name] = not p.default
        else:
            glob[p.name] = 0.7
        moves.append((p.name, glob, per_model))
    glob, per_model = _start(method)
    moves.append(("seed", glob, per_model))
    if any(p.name == "density" for p in spec.params):  # the first model stops drawing from the generator
        glob, per_model = _start(method)
        per_model[0]["density"] = 1.0
        moves.append(("density of the first model to 1", glob, per_model))
    return moves


@pytest.mark.parametrize("method", STAGED)
def test_every_move_equals_a_merge_from_scratch(session, method):
    start = session.recipe(method, *_start(method))
    for moved, glob, per_model in _moves(method):
        session.clear_cache()
        session.merge(start)  # the stages of the start, held for every tensor
        # linear and task arithmetic keep nothing: weights read in place, task vectors formed on the fly
        assert session.stage_cache.nbytes > 0 or method in ("linear", "task_arithmetic")
        recipe = session.recipe(method, glob, per_model, seed=7 if moved == "seed" else 0)
        remerged = session.merge(recipe)
        session.clear_cache()
        scratch = session.merge(recipe)
        for name in session.names:  # bit for bit: the int32 views compare -0.0 and 0.0 as different
            assert torch.equal(remerged[name].view(torch.int32), scratch[name].view(torch.int32)), (moved, name)


@pytest.mark.parametrize("method", STAGED)
def test_kept_task_vectors_give_the_bits_of_task_vectors_formed_on_the_fly(session, method):
    """After a TIES merge keeps the task vectors, every method reads them: same result as forming them again."""
    recipe = session.recipe(method, *_start(method))
    session.clear_cache()
    session.merge(session.recipe("ties", *_start("ties")))
    assert session.stage_cache.nbytes > 0
    kept = session.merge(recipe)
    session.clear_cache()
    formed = session.merge(recipe)
    for name in session.names:
        assert torch.equal(kept[name].view(torch.int32), formed[name].view(torch.int32)), name


def test_moves_back_and_forth_reuse_the_stages(session):
    """lambda 1 -> 0.5 -> 1 and one density there and back: equal to scratch each time."""
    steps = [({"lambda": lam}, d) for lam, d in ((1.0, 0.3), (0.5, 0.3), (0.5, 0.6), (1.0, 0.3))]
    session.clear_cache()
    for glob, d in steps:
        per_model = [{"weight": 0.5, "density": d}, {"weight": 0.5, "density": 0.5}, {"weight": 0.2, "density": 0.9}]
        for method in ("ties", "dare_ties"):
            recipe = session.recipe(method, glob, per_model)
            remerged = session.merge(recipe)
            cache, session.stage_cache = session.stage_cache, StageCache(budget=0)
            scratch = session.merge(recipe)
            session.stage_cache = cache
            assert all(torch.equal(remerged[n], scratch[n]) for n in session.names), (method, glob, d)


def test_linear_reads_the_weights_in_place(session):
    """linear is staged for its weights only: nothing is cached and nothing stacked."""
    session.clear_cache()
    merged = session.merge(session.recipe("linear", {}, [{"weight": 0.2}, {"weight": 0.3}, {"weight": 0.5}]))
    assert session.stage_cache.nbytes == 0
    name = session.names[0]
    expected = sum(w * m[name] for w, m in zip((0.2, 0.3, 0.5), session.models, strict=True))
    torch.testing.assert_close(merged[name], expected)


def test_a_session_without_a_base_merges_linear(tmp_path):
    """linear needs no base: the staged path reads the experts' weights (a float check on the base once failed)."""
    _, experts = tiny_family(tmp_path, n_experts=2)
    alone = MergeSession(None, experts)
    merged = alone.merge(alone.recipe("linear", {}, [{"weight": 1.0}, {"weight": 1.0}]))
    name = alone.names[0]
    torch.testing.assert_close(merged[name], (alone.models[0][name] + alone.models[1][name]) / 2)


def test_budget_is_respected_and_zero_budget_still_merges(session):
    recipe = session.recipe("ties", {}, [{"weight": 1.0, "density": 0.5}] * 3)
    session.clear_cache()
    full = session.merge(recipe)
    everything = session.stage_cache.nbytes
    session.stage_cache = StageCache(budget=everything // 3)
    again = session.merge(recipe)
    assert 0 < session.stage_cache.nbytes <= everything // 3
    assert "GiB" in session.stage_cache.describe()
    session.stage_cache = StageCache(budget=0)
    none = session.merge(recipe)
    assert session.stage_cache.nbytes == 0
    assert all(torch.equal(full[n], again[n]) and torch.equal(full[n], none[n]) for n in session.names)
    session.stage_cache = StageCache()


def test_the_allocator_keeps_freed_merge_memory_for_the_next_merge():
    """Importing explorer sets torch's huge pages and glibc's thresholds (explorer.allocator), unless MALLOC_* is set."""
    import os
    import subprocess
    import sys

    probe = "import explorer.allocator as a, os; print(a.tune(), os.environ['THP_MEM_ALLOC_ENABLE'])"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "THP_"))}
    tuned = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert tuned.stdout.split() == ["True", "1"]
    mine = subprocess.run(
        [sys.executable, "-c", probe],
        env=env | {"MALLOC_ARENA_MAX": "2", "THP_MEM_ALLOC_ENABLE": "0"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert mine.stdout.split() == ["False", "0"]  # the user's own settings are left alone
