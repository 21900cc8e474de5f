"""Scenarios "checkpoints" (a Trainer run averaged) and "fedavg" (clients of unequal size) on the tiny zoo.

Each scenario runs once per module with shrunk training (16 and 10 steps) and 20 examples per task;
the tests then check what it built: the Trainer run folder as ``explorer.io.formats.trainer`` reads it,
that a last-1 average is the last checkpoint exactly, and that FedAvg weighs the clients by n_k.
About 60 s on a busy 2-core machine.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from evals.scenarios import checkpoints, fedavg, run_scenario
from evals.scenarios.report import score_models
from explorer.io.formats.trainer import is_run_dir, trainer_checkpoints
from explorer.session import MergeSession
from explorer.zoo.clients import client_examples, client_shards
from explorer.zoo.testbed import load_model, tiny_testbed
from explorer.zoo.trainer_run import train_run

LIMIT = 20  # examples per lm-eval task


def _bed(zoo_dir: Path, steps: int):
    bed = tiny_testbed(zoo_dir)
    return replace(bed, finetune=replace(bed.finetune, steps={**bed.finetune.steps, "add": steps}))


@pytest.fixture(scope="module")
def checkpoints_run(zoo_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """(testbed, work folder, tables) of the checkpoints scenario: 16 steps, a checkpoint every 2."""
    bed, work = _bed(zoo_dir, 16), tmp_path_factory.mktemp("scenarios")
    return bed, work, run_scenario("checkpoints", bed, work, LIMIT, lambda _: None)


@pytest.fixture(scope="module")
def fedavg_run(zoo_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """(testbed, work folder, tables) of the fedavg scenario: 10 local steps in all."""
    bed, work = _bed(zoo_dir, 10), tmp_path_factory.mktemp("scenarios")
    return bed, work, run_scenario("fedavg", bed, work, LIMIT, lambda _: None)


def test_trainer_run_is_a_run_folder_the_library_reads(checkpoints_run):
    bed, work, _ = checkpoints_run
    run_dir = work / "checkpoints" / "run"
    assert is_run_dir(run_dir)
    states = trainer_checkpoints(run_dir)
    assert states.step.tolist() == [2, 4, 6, 8, 10, 12, 14, 16]
    assert states.loss.notna().all() and states.eval_loss.notna().all()
    assert states.loss.iloc[-1] < states.loss.iloc[0]  # it trained
    for path in states.path:
        files = {p.name for p in Path(path).iterdir()}
        assert {"model.safetensors", "trainer_state.json", "config.json", "tokenizer.json"} <= files
        assert "optimizer.pt" not in files  # save_only_model
    stamp = (run_dir / "checkpoint-16" / "model.safetensors").stat().st_mtime_ns
    assert train_run(bed, "add", run_dir, save_steps=2) == run_dir  # same settings: reused, not retrained
    assert (run_dir / "checkpoint-16" / "model.safetensors").stat().st_mtime_ns == stamp


def test_last_1_average_is_the_last_checkpoint(checkpoints_run):
    bed, work, _ = checkpoints_run
    run_dir = work / "checkpoints" / "run"
    last = Path(trainer_checkpoints(run_dir).path.iloc[-1])
    out = checkpoints.average_run(run_dir, work / "last-1", ["--last-k", "1"], lambda _: None)
    merged, expected = load_file(out / "model.safetensors"), load_file(last / "model.safetensors")
    assert merged.keys() == expected.keys()
    assert all(torch.equal(merged[k], expected[k]) for k in expected)
    task = bed.lm_eval_tasks["add"]
    scores = score_models(
        {"last": lambda: load_model(last), "avg": lambda: load_model(out)}, [task], bed.task_dir, LIMIT
    )
    assert scores[task].iloc[0] == scores[task].iloc[1]


def test_checkpoints_table_rows(checkpoints_run):
    _, _, tables = checkpoints_run
    (table,) = tables
    assert table.scores.model.tolist() == [
        "last checkpoint (step 16)",
        "last-4 average",
        "every-2 average",
        "EMA (decay 0.5)",
        "MWA (p=1, eval loss)",
        "testbed expert (reference)",
    ]
    assert table.scores["checkpoint steps"].tolist()[:3] == ["16", "10, 12, 14, 16", "4, 8, 12, 16"]
    assert table.scores.n.tolist() == [LIMIT] * 6


def test_fedavg_weights_clients_by_their_examples(fedavg_run):
    bed, work, _ = fedavg_run
    clients = [work / "fedavg" / "clients" / f"client-{k}" for k in (1, 2, 3)]
    n = [client_examples(c) for c in clients]
    assert n == [len(s) for s in client_shards(bed.splits["add"].train, fedavg.SHARES, bed.finetune.seed)]
    assert n[0] > n[1] > n[2] and sum(n) == len(bed.splits["add"].train)
    session = MergeSession(bed.base, clients)
    merged = session.merge(session.recipe("fedavg", {}, [{"examples": float(x)} for x in n]))
    name = "model.layers.0.mlp.down_proj.weight"
    weights = [load_file(c / "model.safetensors")[name] for c in clients]
    expected = sum(x * w for x, w in zip(n, weights, strict=True)) / sum(n)
    torch.testing.assert_close(merged[name], expected, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(merged[name], sum(weights) / 3)  # the clients differ: n_k matters


def test_client_shards_are_disjoint_and_sized():
    examples = list(range(100))
    shards = client_shards(examples, (0.6, 0.3, 0.1), seed=0)
    assert [len(s) for s in shards] == [60, 30, 10]
    assert sorted(x for s in shards for x in s) == examples
    with pytest.raises(ValueError):
        client_shards(examples, (0.6, 0.6), seed=0)


def test_fedavg_table_rows(fedavg_run):
    _, work, tables = fedavg_run
    (table,) = tables
    n = [client_examples(work / "fedavg" / "clients" / f"client-{k}") for k in (1, 2, 3)]
    assert table.scores.model.tolist() == [
        "base",
        *(f"client {k} ({x} examples)" for k, x in enumerate(n, 1)),
        "uniform average",
        "FedAvg (n_k weights)",
        "centralized expert",
    ]
    assert table.scores["client weights"].tolist()[4:6] == ["0.33 / 0.33 / 0.33", "0.60 / 0.30 / 0.10"]
