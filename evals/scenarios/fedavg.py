"""Scenario "fedavg": one task split over clients of unequal size, FedAvg vs the uniform average.

The task's training split (``add``) is shared by ``SHARES`` clients (60% / 30% / 10%); each client
fine-tunes the base on its own shard only (``explorer.zoo.clients``: the experts' settings, local
steps proportional to the shard size, i.e. the same local epochs on every client, as in FedAvg).
One round of FedAvg (McMahan et al. 2017, arXiv:1602.05629) averages the clients weighted by
n_k / sum n, with n_k the ``n_train_examples`` of each client's ``zoo_info.json`` (the ``fedavg``
method's per-model ``examples``); the uniform average gives every client 1/K. Both merges run in
memory through ``explorer.session.MergeSession`` and are scored on the task's held-out lm-eval
task beside each client, the base and the testbed's centralized expert (all the data, one model).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pandas as pd

from evals.scenarios.report import ScenarioTable, folder_loader, score_models, session_loader
from explorer.session import MergeSession
from explorer.zoo.clients import client_examples, train_clients
from explorer.zoo.testbed import Testbed

TASK = "add"
SHARES = (0.6, 0.3, 0.1)  # the clients' shares of the task's training examples


def run(bed: Testbed, work: Path, limit: int | None, log: Callable[[str], None]) -> list[ScenarioTable]:
    """Train the clients (or reuse them), merge them uniformly and by FedAvg, score all; one table."""
    clients = train_clients(bed, TASK, work / "clients", SHARES, log)
    examples = [client_examples(c) for c in clients]
    session = MergeSession(bed.base, clients)
    merges = {
        "uniform average": session.recipe("linear", {"normalize": True}, [{"weight": 1.0}] * len(clients)),
        "FedAvg (n_k weights)": session.recipe("fedavg", {}, [{"examples": float(n)} for n in examples]),
    }
    models = {"base": folder_loader(bed.base)}
    models |= {
        f"client {k} ({n} examples)": folder_loader(c)
        for k, (c, n) in enumerate(zip(clients, examples, strict=True), 1)
    }
    models |= {label: session_loader(session, lambda r=recipe: session.merge(r)) for label, recipe in merges.items()}
    models["centralized expert"] = folder_loader(bed.experts[TASK])
    task = bed.lm_eval_tasks[TASK]
    log(f"fedavg: scoring {len(models)} models on {task}")
    scores = score_models(models, [task], bed.task_dir, limit)
    weights = {"uniform average": [1 / len(clients)] * len(clients)}
    weights["FedAvg (n_k weights)"] = [n / sum(examples) for n in examples]
    scores.insert(1, "client weights", [_fmt(weights[m]) if m in weights else "" for m in scores.model])
    settings = {
        "task": task,
        "clients": ", ".join(f"{s:.0%} ({n} examples)" for s, n in zip(SHARES, examples, strict=True)),
        "local steps": "proportional to the shard (same local epochs), "
        f"{bed.finetune.steps[TASK]} in all; lr {bed.finetune.lr:g}, batch {bed.finetune.batch_size}",
        "rounds": "one (each client starts from the base)",
    }
    return [
        ScenarioTable(
            f"FedAvg over {len(clients)} clients of unequal size ({TASK})", scores, note(scores, task), settings
        )
    ]


def note(scores: pd.DataFrame, task: str) -> str:
    """What the table shows: FedAvg vs the uniform average, the best client and the centralized expert."""
    acc = dict(zip(scores.model, scores[task], strict=True))
    err = dict(zip(scores.model, scores[f"{task} stderr"], strict=True))
    fed, uni = acc["FedAvg (n_k weights)"], acc["uniform average"]
    clients = [m for m in acc if m.startswith("client ")]
    best = max(clients, key=acc.get)
    gap = fed - uni
    if abs(gap) <= max(err["FedAvg (n_k weights)"], err["uniform average"]):
        verdict = f"FedAvg ({fed:.2f}) and the uniform average ({uni:.2f}) are within one stderr"
    else:
        verdict = f"FedAvg scores {fed:.2f}, {'above' if gap > 0 else 'below'} the uniform average's {uni:.2f}"
    return (
        f"On {task} {verdict}; the best client, {best}, scores {acc[best]:.2f} and the centralized expert "
        f"{acc['centralized expert']:.2f}."
    )


def _fmt(weights: list[float]) -> str:
    return " / ".join(f"{w:.2f}" for w in weights)
