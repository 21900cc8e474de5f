"""Comparison of base, experts, a merge and the experts' output ensemble (evals.comparison, evals.ensemble)."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
import torch

import evals
from evals.ensemble import OutputEnsemble
from evals.lm_eval_runner import metrics_table, task_metrics
from explorer.session import MergeSession
from explorer.zoo.testbed import load_model

TASKS = ["zoo_add", "zoo_upper"]
LIMIT = 16


@pytest.fixture(scope="module")
def members(zoo_dir: Path):
    return [load_model(zoo_dir / f"expert-{t}") for t in ("add", "upper")]


def test_ensemble_logits_are_the_log_of_the_mean_distribution(members):
    (a, tok), (b, _) = members
    ids = tok(["add 12+34=", "up hello="], return_tensors="pt", padding=True)
    with torch.no_grad():
        mean = (a(**ids).logits.softmax(-1) + 3 * b(**ids).logits.softmax(-1)) / 4
        got = OutputEnsemble([a, b], weights=[1, 3]).eval()(**ids).logits
        alone = OutputEnsemble([a]).eval()(**ids).logits
        own = a(**ids).logits.log_softmax(-1)
    torch.testing.assert_close(got, mean.log(), atol=1e-5, rtol=1e-5)
    assert torch.equal(alone, own)  # one member: that member's distribution, exactly


def test_ensemble_of_one_generates_what_its_member_generates(members):
    model, tok = members[0]
    ids = tok(["add 12+34="], return_tensors="pt")
    ours = OutputEnsemble([model]).eval().generate(**ids, max_new_tokens=5, do_sample=False)
    theirs = model.generate(**ids, max_new_tokens=5, do_sample=False)
    assert torch.equal(ours, theirs)


def test_ensemble_refuses_what_cannot_be_averaged(members, zoo_dir: Path):
    (a, _), (b, _) = members
    with pytest.raises(ValueError, match="at least one model"):
        OutputEnsemble([])
    with pytest.raises(ValueError, match="one non-negative weight per model"):
        OutputEnsemble([a, b], weights=[1.0])
    small = load_model(zoo_dir / "base")[0]
    small.resize_token_embeddings(small.get_output_embeddings().weight.shape[0] + 3)
    with pytest.raises(ValueError, match="share one vocabulary"):
        OutputEnsemble([a, small])


def test_stream_scores_base_experts_merge_and_ensemble_as_lm_eval_does(zoo_dir: Path):
    session = MergeSession(zoo_dir / "base", [zoo_dir / "expert-add", zoo_dir / "expert-upper"])
    tok = session.reference.tokenizer()
    merged = session.build_model(session.merge(session.recipe("ties", {}, [{"weight": 1.0, "density": 0.5}] * 2)))
    experts = [session.build_model(t) for t in session.models]
    models = {
        "base": (session.build_model(session.base), tok),
        "add": (experts[0], tok),
        "upper": (experts[1], tok),
        "ties": (merged, tok),
        "ensemble": (OutputEnsemble(experts).eval(), tok),
    }
    first = next(evals.score_stream({k: lambda m=m: m for k, m in models.items()}, TASKS, zoo_dir / "tasks", LIMIT))
    assert list(first["model"]) == ["base"] and list(first["task"]) == ["zoo_add"]  # one (model, task) at a time
    rows = list(evals.score_stream({k: lambda m=m: m for k, m in models.items()}, TASKS, zoo_dir / "tasks", LIMIT))
    table = pd.concat(rows, ignore_index=True)
    assert len(rows) == len(models) * len(TASKS)
    for label in ("ties", "ensemble"):  # the same numbers lm-eval gives for that model and task
        direct = metrics_table(label, task_metrics(*models[label], TASKS, zoo_dir / "tasks", LIMIT))
        assert table[table["model"] == label].reset_index(drop=True).equals(direct)
    wide = evals.wide_scores(table).set_index("model")
    assert wide.loc["add", "zoo_add acc"] > wide.loc["base", "zoo_add acc"] + 0.5
    shown = evals.wide_scores(table, stderr=True).set_index("model")  # the app's and the CLI's table
    add = table[(table["model"] == "add") & (table["task"] == "zoo_add") & (table["metric"] == "acc")].iloc[0]
    assert shown.loc["add", "zoo_add acc"] == f"{add['value']:.4f} ± {add['stderr']:.4f}"
    normalized = evals.normalized_scores(table, "base", ["add", "upper"]).set_index(["model", "task"])
    assert list(normalized.index) == [
        ("ties", "zoo_add"),
        ("ties", "zoo_upper"),
        ("ensemble", "zoo_add"),
        ("ensemble", "zoo_upper"),
    ]
    row = normalized.loc[("ties", "zoo_add")]
    value = wide.loc["ties", "zoo_add acc"]
    assert row["expert"] == "add"
    assert row["vs best expert"] == pytest.approx(value / wide.loc["add", "zoo_add acc"])
    gain = (value - wide.loc["base", "zoo_add acc"]) / (
        wide.loc["add", "zoo_add acc"] - wide.loc["base", "zoo_add acc"]
    )
    assert row["gain kept"] == pytest.approx(gain)
    chart = evals.comparison_chart(table)
    assert len(chart.data) == len(models) * len(TASKS) and all(t.error_y.array is not None for t in chart.data)


def test_normalized_scores_by_hand_incl_lower_is_better():
    def row(model, task, metric, value, higher):
        return {
            "model": model,
            "task": task,
            "metric": metric,
            "value": value,
            "stderr": 0.0,
            "n": 10,
            "higher_is_better": higher,
        }

    table = pd.DataFrame(
        [
            row("base", "t1", "acc", 0.2, True),
            row("e1", "t1", "acc", 0.8, True),
            row("e2", "t1", "acc", 0.4, True),
            row("m", "t1", "acc", 0.6, True),
            row("base", "ppl", "word_perplexity", 20.0, False),
            row("e1", "ppl", "word_perplexity", 30.0, False),
            row("e2", "ppl", "word_perplexity", 25.0, False),
            row("m", "ppl", "word_perplexity", 22.0, False),
        ]
    )
    got = evals.normalized_scores(table, "base", ["e1", "e2"]).set_index("task")
    assert got.loc["t1", "vs best expert"] == pytest.approx(0.75)
    assert got.loc["t1", "expert"] == "e1" and got.loc["t1", "gain kept"] == pytest.approx(4 / 6)
    assert got.loc["ppl", "vs best expert"] == pytest.approx(25 / 22)  # better than the best expert: > 1
    assert pd.isna(got.loc["ppl", "gain kept"]) and pd.isna(got.loc["ppl", "expert"])  # no expert beats the base
    without_base = evals.normalized_scores(table, None, ["e1", "e2"]).set_index(["model", "task"])
    assert math.isclose(without_base.loc[("m", "t1"), "vs best expert"], 0.75)
    assert ("base", "t1") in without_base.index and without_base["gain kept"].isna().all()  # no base: no gain
