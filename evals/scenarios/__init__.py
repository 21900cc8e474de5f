"""One scenario per method family of the seed papers, each run on a testbed and scored with lm-eval.

A scenario module ``evals.scenarios.NAME`` has ``run(bed, work, limit, log) -> list[ScenarioTable]``:
it builds what it needs under ``work`` (fine-tunes, training runs, adapters; reused when already
there), merges in memory or through the CLI's code, scores base, inputs and merges on the testbed's
tasks and returns its README tables (``evals.scenarios.report``). ``python -m evals scenarios``
runs them: on the tiny zoo in seconds (the tests), on the SmolLM2 experts for README.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path

from evals.scenarios.report import ScenarioTable
from explorer.zoo.testbed import Testbed

# name -> what it shows (python -m evals scenarios --only NAME)
SCENARIOS = {
    "task_vectors": "task arithmetic, TIES, DARE, breadcrumbs, DELLA on two experts",
    "fisher": "Fisher-weighted vs plain averaging (Fisher from task data and from generic text)",
    "checkpoints": "checkpoint averaging, EMA and metric-weighted averaging of one Trainer run vs its last checkpoint",
    "fedavg": "FedAvg over clients of unequal size vs a uniform average",
    "wise_ft": "WiSE-FT: the base-expert interpolation curve (held-in gain vs held-out loss)",
    "sparse_soup": "sparse soup: mask-preserving average of sparse fine-tunes of a pruned base vs a naive one",
    "lora": "LoRA experts merged as adapters and as folded checkpoints",
}


def run_scenario(
    name: str, bed: Testbed, work: str | Path, limit: int | None = None, log: Callable[[str], None] = print
) -> list[ScenarioTable]:
    """Run scenario ``name`` on ``bed``, building under ``work/name``; return its tables.

    Raises:
        KeyError: ``name`` is not in ``SCENARIOS``.
    """
    if name not in SCENARIOS:
        raise KeyError(f"unknown scenario {name!r}; one of {', '.join(SCENARIOS)}")
    module = importlib.import_module(f"evals.scenarios.{name}")
    folder = Path(work) / name
    folder.mkdir(parents=True, exist_ok=True)
    return module.run(bed, folder, limit, log)
