"""The task-vector and Fisher scenarios on the tiny zoo: table structure, scores, and identities.

Shrunk for speed: 16 held-out examples per task, a few merges, a Fisher on 8 chunks of 32 tokens.
Identities that would catch a broken path: an in-memory merge equal to an expert (weights 1, 0)
scores exactly as the expert loaded from its folder; a Fisher merge with the same Fisher for both
models is the plain average; the task-data Fisher is not the generic-text one.
"""

from __future__ import annotations

import pytest
import torch

from evals.scenarios import fisher as fisher_scenario
from evals.scenarios import task_vectors
from explorer.fisher import FisherInputs, FisherSettings, fisher_inputs
from explorer.session import MergeSession
from explorer.zoo.tasks import Example
from explorer.zoo.testbed import tiny_testbed
from tests.helpers import assert_expected

LIMIT = 16
PAIR = ("add", "reverse")
SETTINGS = FisherSettings(n_examples=8, batch_size=4, max_length=32)
WEIGHT = "model.layers.0.mlp.down_proj.weight"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bed(zoo_dir):
    return tiny_testbed(zoo_dir)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One Fisher cache for the module: each estimate is made once."""
    return tmp_path_factory.mktemp("fisher-cache")


@pytest.fixture(scope="module")
def session(bed):
    return MergeSession(bed.base, [bed.experts[t] for t in PAIR])


def check_scores(table, labels, tasks):
    """Rows in ``labels`` order, columns acc/stderr per task, n, kept; accuracies in [0, 1]; n = LIMIT."""
    frame = table.scores
    assert frame["model"].tolist() == labels
    columns = ["model", *(c for t in tasks for c in (t, f"{t} stderr")), "n", task_vectors.KEPT]
    assert frame.columns.tolist() == columns
    for task in tasks:
        assert frame[task].between(0, 1).all()
        assert (frame[f"{task} stderr"] >= 0).all()
    assert (frame["n"] == LIMIT).all()
    assert table.note


def test_task_vectors_table(bed):
    """Structure; kept is the worse retained gain; an in-memory merge equal to expert-add scores as it.

    "add only" (task arithmetic, weights 1, 0) is expert-add built in memory: it must score exactly as
    expert-add loaded from its folder.
    """
    merges = {
        "ties d=0.2": task_vectors.MERGES["ties d=0.2"],
        "add only": ("task_arithmetic", {}, [{"weight": 1.0}, {"weight": 0.0}]),
    }
    table = task_vectors.pair_table(bed, PAIR, merges, LIMIT, lambda _: None)
    tasks = [bed.lm_eval_tasks[t] for t in PAIR]
    check_scores(table, ["base", "expert-add", "expert-reverse", *merges], tasks)
    frame = table.scores.set_index("model")
    base = frame.loc["base"]
    for _, row in frame.iterrows():  # kept = the worse of the two retained gains, from the table itself
        gains = [(row[t] - base[t]) / (frame.loc[f"expert-{p}", t] - base[t]) for p, t in zip(PAIR, tasks, strict=True)]
        assert row[task_vectors.KEPT] == pytest.approx(min(gains), abs=1e-12)
    assert frame.loc["base", task_vectors.KEPT] == 0
    assert frame.loc["add only"].equals(frame.loc["expert-add"].rename("add only"))
    assert frame.loc["expert-add", tasks[0]] > base[tasks[0]]


def test_dare_merge_is_reproducible(session):
    recipe = session.recipe("dare_ties", {}, [{"weight": 1.0, "density": 0.5}] * 2, seed=task_vectors.SEED)
    first, second = session.merge(recipe), session.merge(recipe)
    assert all(torch.equal(first[n], second[n]) for n in first)
    other = session.merge(session.recipe("dare_ties", {}, [{"weight": 1.0, "density": 0.5}] * 2, seed=1))
    assert not torch.equal(first[WEIGHT], other[WEIGHT])


def test_fisher_with_equal_fishers_is_the_average(session, cache):
    files = fisher_inputs(session.model_ckpts, SETTINGS, None, cache).paths
    same = FisherInputs(session.model_ckpts, [files[0], files[0]])
    merged = fisher_scenario.fisher_average(session, same, SETTINGS)
    average = session.merge(session.recipe("linear", {}, [{"weight": 1.0}] * 2))
    for name in average:
        assert_expected(merged[name], average[name], atol=1e-6, rtol=1e-6)
    own = fisher_scenario.fisher_average(session, FisherInputs(session.model_ckpts, files), SETTINGS)
    assert not torch.allclose(own[WEIGHT], average[WEIGHT], atol=1e-6, rtol=1e-4)


def test_task_data_fisher_differs_from_text_fisher(bed, session, cache):
    texts = fisher_scenario.task_texts(bed, PAIR, session)
    assert texts[0].startswith(bed.splits["add"].train[0].prompt)
    text = fisher_inputs(session.model_ckpts, SETTINGS, None, cache)(WEIGHT)["fisher"]
    task = fisher_inputs(session.model_ckpts, SETTINGS, texts, cache)(WEIGHT)["fisher"]
    assert text.shape == task.shape == (2, *session.models[0][WEIGHT].shape)
    assert (text >= 0).all() and (task >= 0).all() and task.sum() > 0
    assert not torch.allclose(text, task, rtol=0.1, atol=0)
    with pytest.raises(ValueError, match="one per model"):
        fisher_inputs(session.model_ckpts, SETTINGS, texts[:1], cache)


def test_examples_text():
    examples = [Example("add 1+2=", "3"), Example("add 2+2=", "4")]
    assert fisher_scenario.examples_text(examples, "</s>") == "add 1+2=3</s>add 2+2=4</s>"


def test_fisher_table(bed, cache):
    table = fisher_scenario.pair_table(bed, PAIR, cache, SETTINGS, LIMIT, lambda _: None)
    tasks = [bed.lm_eval_tasks[t] for t in PAIR]
    labels = [
        "base",
        "expert-add",
        "expert-reverse",
        fisher_scenario.LINEAR,
        fisher_scenario.TEXT,
        fisher_scenario.TASK,
    ]
    check_scores(table, labels, tasks)
    assert len(list(cache.glob("*.safetensors"))) == 4  # 2 experts x (text, task data)
    assert "8 chunks of 32 tokens" in table.settings["Fisher"]
