"""lm-eval scores of the demo zoo's base, experts and merges of two experts (README's table).

Merges expert-add and expert-reverse in memory (the app's path) with several methods and scores every
model on every zoo task with lm-eval (exact-match accuracy of the greedy continuation).

    python bench/zoo_eval.py ZOO_DIR [--limit N] [--experts expert-add expert-reverse]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import evals  # noqa: E402
from explorer.session import MergeSession  # noqa: E402
from explorer.workbench import Workbench  # noqa: E402

MERGES = {
    "linear (uniform soup)": ("linear", {}, {"weight": 1.0}),
    "task_arithmetic (w=1)": ("task_arithmetic", {}, {"weight": 1.0}),
    "task_arithmetic (w=0.5)": ("task_arithmetic", {}, {"weight": 0.5}),
    "ties (density 1)": ("ties", {}, {"weight": 1.0, "density": 1.0}),
    "ties (density 0.5)": ("ties", {}, {"weight": 1.0, "density": 0.5}),
    "ties (density 0.2)": ("ties", {}, {"weight": 1.0, "density": 0.2}),
    "dare_ties (density 0.5)": ("dare_ties", {}, {"weight": 1.0, "density": 0.5}),
    "fisher (empirical, 64 chunks)": ("fisher", {"fisher_labels": "empirical"}, {"weight": 1.0}),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("zoo", type=Path)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--experts", nargs="+", default=["expert-add", "expert-reverse"])
    args = parser.parse_args()
    bench = Workbench(args.zoo)
    bench.load(str(args.zoo / "base"), [str(args.zoo / e) for e in args.experts])
    task_dirs = evals.task_dirs(args.zoo)
    tasks = evals.list_tasks(task_dirs)
    session: MergeSession = bench.session
    models = {}
    for label, (method, params, per_model) in MERGES.items():
        start = time.perf_counter()
        bench.merge(method, params, [per_model] * len(args.experts))
        models[label] = (session.build_model(bench.merged), bench.eval_models(False)[f"merge ({method})"][1])
        print(f"merged {label} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    table = evals.compare({**bench.eval_models(True), **models}, tasks, task_dirs, limit=args.limit)
    table = table[~table["model"].str.startswith("merge (")]
    print(table.to_markdown(index=False, floatfmt=".3f"))


if __name__ == "__main__":
    main()
