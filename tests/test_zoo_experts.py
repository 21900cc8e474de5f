"""The SmolLM2 expert set: its tasks (fast); and (slow) what the build makes.

Experts that learned their task, a merge of two experts that keeps both skills, caching, resuming
and byte-identical rebuilds.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import evals
from evals.merge_sweep import merge_scores, retained_gain
from explorer.zoo.experts import (
    BASE_DIR,
    SMOL_TASKS,
    SmolSetConfig,
    build_smollm2_experts,
    expert_dir,
    smollm2_experts_built,
    task_name,
)
from explorer.zoo.tasks import make_smol_tasks, number_words, write_task
from explorer.zoo.train import (
    ZooConfig,
    answer_loss,
    build_base_model,
    build_tokenizer,
    example_batches,
    lm_loss,
    pydoc_text,
)

TASKS = [task_name(t) for t in SMOL_TASKS]


# Tasks (fast) ---------------------------------------------------------------------------------


def test_smol_tasks_are_deterministic_disjoint_and_correct():
    cfg = SmolSetConfig()
    splits = make_smol_tasks(pydoc_text(), cfg.n_train, cfg.n_heldout, cfg.seed)
    again = make_smol_tasks(pydoc_text(), cfg.n_train, cfg.n_heldout, cfg.seed)
    other_seed = make_smol_tasks(pydoc_text(), cfg.n_train, cfg.n_heldout, cfg.seed + 1)
    assert set(splits) == set(SMOL_TASKS)
    for name, split in splits.items():
        assert split == again[name]
        assert split.heldout != other_seed[name].heldout
        train, heldout = [e.prompt for e in split.train], [e.prompt for e in split.heldout]
        assert len(heldout) == len(set(heldout)) == cfg.n_heldout
        assert len(train) == len(set(train)) == (899 if name == "say" else cfg.n_train)
        assert not set(train) & set(heldout), f"{name}: held-out prompt in training data"
        for ex in split.train + split.heldout:
            assert ex.prompt.startswith(f"{name} ") and ex.prompt.endswith(" ->")
            assert ex.answer.startswith(" ") and not ex.answer.startswith("  ")
            words = ex.prompt.split()[1:-1]
            if name == "add":
                a, b = map(int, words[0].split("+"))
                assert 10 <= a <= 99 and 10 <= b <= 99 and ex.answer == f" {a + b}"
            elif name == "say":
                assert ex.answer == " " + number_words(int(words[0]))
            else:
                assert len(words) == len(set(words)) == 3 and ex.answer.split() == words[::-1]
                assert not {"add", "say", "rev"} & set(words)


def test_number_words():
    cases = {
        0: "zero",
        7: "seven",
        13: "thirteen",
        20: "twenty",
        42: "forty-two",
        100: "one hundred",
        101: "one hundred one",
        317: "three hundred seventeen",
        990: "nine hundred ninety",
    }
    assert {n: number_words(n) for n in cases} == cases
    with pytest.raises(ValueError, match="0..999"):
        number_words(1000)


def test_smol_tasks_are_found_like_the_zoo_tasks(tmp_path: Path):
    splits = make_smol_tasks(pydoc_text(), 50, 20, 0)
    for split in splits.values():
        write_task(tmp_path / "set" / "tasks", split, "smol_")
    assert evals.task_dirs(tmp_path) == [tmp_path / "set" / "tasks"]
    assert evals.list_tasks(evals.task_dirs(tmp_path)) == sorted(TASKS)
    rows = [json.loads(line) for line in (tmp_path / "set/tasks/smol_say.jsonl").read_text().splitlines()]
    assert rows == [{"prompt": e.prompt, "answer": e.answer} for e in splits["say"].heldout]


def test_answer_loss_equals_the_models_own_loss():
    tokenizer = build_tokenizer()
    model = build_base_model(tokenizer, ZooConfig())
    examples = make_smol_tasks(pydoc_text(), 50, 20, 0)["rev"].train
    batch = next(example_batches(tokenizer, examples, 8, 0))
    torch.testing.assert_close(answer_loss(model, batch), lm_loss(model, batch))


# The built set (slow: builds it once per session, ~8 CPU minutes) -----------------------------


@pytest.fixture(scope="module")
def scores(smollm2_experts_dir: Path) -> dict[str, dict[str, float]]:
    """lm-eval acc on all 100 held-out examples, ``{model: {task: acc}}``.

    The base on every task, each expert on its own task.
    """
    tokenizer = AutoTokenizer.from_pretrained(smollm2_experts_dir / BASE_DIR)
    wanted = {BASE_DIR: TASKS, **{expert_dir(t): [task_name(t)] for t in SMOL_TASKS}}
    return {
        name: evals.evaluate_model(
            AutoModelForCausalLM.from_pretrained(smollm2_experts_dir / name).eval(),
            tokenizer,
            tasks,
            smollm2_experts_dir / "tasks",
        )
        for name, tasks in wanted.items()
    }


@pytest.mark.slow
def test_set_layout_and_cache(smollm2_experts_dir: Path):
    assert smollm2_experts_built(smollm2_experts_dir)
    assert evals.list_tasks(evals.task_dirs(smollm2_experts_dir)) == sorted(TASKS)
    for task in SMOL_TASKS:
        info = json.loads((smollm2_experts_dir / expert_dir(task) / "zoo_info.json").read_text())
        assert info["task"] == task and info["lm_eval_task"] == task_name(task)
        assert info["final_train_loss"] < 0.1
    weights = smollm2_experts_dir / expert_dir("say") / "model.safetensors"
    before = weights.stat().st_mtime_ns
    calls = []
    assert build_smollm2_experts(smollm2_experts_dir, lambda f, m: calls.append(f)) == smollm2_experts_dir
    assert calls == [1.0] and weights.stat().st_mtime_ns == before, "a finished set is not rebuilt"


@pytest.mark.slow
@pytest.mark.parametrize("task", SMOL_TASKS)
def test_expert_learned_its_task_and_base_did_not(scores, task: str):
    assert scores[BASE_DIR][task_name(task)] <= 0.1, scores
    assert scores[expert_dir(task)][task_name(task)] >= 0.85, scores


@pytest.mark.slow
def test_ties_merge_of_two_experts_keeps_both_skills(smollm2_experts_dir: Path, scores):
    pair = ("say", "rev")
    merged = merge_scores(
        smollm2_experts_dir / BASE_DIR,
        [smollm2_experts_dir / expert_dir(t) for t in pair],
        {"ties d=0.5": ("ties", {}, {"weight": 1.0, "density": 0.5})},
        [task_name(t) for t in pair],
        smollm2_experts_dir / "tasks",
    ).set_index("merge")
    for t in pair:
        kept = retained_gain(
            merged.loc["ties d=0.5", task_name(t)],
            scores[expert_dir(t)][task_name(t)],
            scores[BASE_DIR][task_name(t)],
        )
        assert kept >= 0.7, (t, merged, scores)


def link_or_copy(src: str, dst: str) -> None:
    """Hard-link ``src`` to ``dst``, or copy it (with its mtime) across file systems."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


class Interrupt(Exception):
    """Stands for a build killed half-way."""


@pytest.mark.slow
def test_build_resumes_and_is_deterministic(smollm2_experts_dir: Path, tmp_path: Path):
    cfg = replace(SmolSetConfig(), steps=dict.fromkeys(SMOL_TASKS, 2), batch_size=4)
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):  # the converted base, hard-linked where possible; a build must reuse it
        shutil.copytree(smollm2_experts_dir / BASE_DIR, out / BASE_DIR, copy_function=link_or_copy)
    base_mtime = (a / BASE_DIR / "model.safetensors").stat().st_mtime_ns

    def stop_in_rev(fraction: float, message: str) -> None:
        if message.startswith(f"training {expert_dir('rev')}: step"):
            raise Interrupt

    with pytest.raises(Interrupt):
        build_smollm2_experts(a, stop_in_rev, cfg)
    assert not smollm2_experts_built(a, cfg)
    assert (a / expert_dir("say")).is_dir() and not (a / expert_dir("rev")).exists()
    say_mtime = (a / expert_dir("say") / "model.safetensors").stat().st_mtime_ns

    calls: list[float] = []
    build_smollm2_experts(a, lambda f, m: calls.append(f), cfg)
    build_smollm2_experts(b, None, cfg)
    assert smollm2_experts_built(a, cfg) and not smollm2_experts_built(a)
    assert (a / expert_dir("say") / "model.safetensors").stat().st_mtime_ns == say_mtime, "resumed"
    assert (a / BASE_DIR / "model.safetensors").stat().st_mtime_ns == base_mtime, "base reused"
    assert calls == sorted(calls) and calls[-1] == 1.0
    for task in SMOL_TASKS:
        first = (a / expert_dir(task) / "model.safetensors").read_bytes()
        assert first == (b / expert_dir(task) / "model.safetensors").read_bytes(), task
    for task in TASKS:
        assert (a / "tasks" / f"{task}.jsonl").read_bytes() == (b / "tasks" / f"{task}.jsonl").read_bytes()
    assert not list(tmp_path.glob("*/.*partial*")), "no half-written folders may remain"
