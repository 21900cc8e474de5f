"""lm-eval scores of the SmolLM2 expert set and of merges of every pair of its experts (README's table).

Builds the set first when ``SET_DIR`` holds no finished one (default settings, ~8 minutes on 2 cores), then
scores base and experts on every task, merges each pair of experts in memory (the app's path) with
several methods and scores each merge on the pair's two tasks. Accuracy is lm-eval's ``acc`` for the
sets' loglikelihood tasks: exact match of the greedy continuation on 100 held-out examples.
"kept" is the share of each expert's gain over the base that the merge keeps, (merge - base) /
(expert - base), on the worse of the two tasks.

    python bench/smollm2_eval.py SET_DIR [--limit N] [--pairs say+rev rev+add] [--methods ties_0.5 ...]
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

import evals  # noqa: E402
from evals.merge_sweep import merge_scores, retained_gain  # noqa: E402
from explorer.zoo.experts import (  # noqa: E402
    BASE_DIR,
    SMOL_TASKS,
    build_smollm2_experts,
    expert_dir,
    set_info,
    task_name,
)

MERGES = {
    "task_arithmetic w=1": ("task_arithmetic", {}, {"weight": 1.0}),
    "ties d=0.5": ("ties", {}, {"weight": 1.0, "density": 0.5}),
    "ties d=0.2": ("ties", {}, {"weight": 1.0, "density": 0.2}),
    "linear": ("linear", {}, {"weight": 1.0}),
    "dare_ties d=0.5": ("dare_ties", {}, {"weight": 1.0, "density": 0.5}),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("set_dir", type=Path, help="SmolLM2 expert set (built there if missing)")
    parser.add_argument("--limit", type=int, default=None, help="examples per task (default all)")
    pairs = ["+".join(p) for p in itertools.combinations(SMOL_TASKS, 2)]
    parser.add_argument("--pairs", nargs="+", default=pairs, help="default: %(default)s")
    parser.add_argument("--methods", nargs="+", default=list(MERGES), choices=list(MERGES))
    args = parser.parse_args()
    start = time.perf_counter()
    if set_info(args.set_dir) is None:  # a finished set built with other settings is scored as is
        build_smollm2_experts(args.set_dir, lambda f, m: print(f"[{f:4.0%}] {m}", file=sys.stderr))
    print(f"settings: {set_info(args.set_dir)['config']}", end="\n\n")
    task_dir = args.set_dir / "tasks"
    tasks = [task_name(t) for t in SMOL_TASKS]
    tokenizer = AutoTokenizer.from_pretrained(args.set_dir / BASE_DIR)
    names = [BASE_DIR, *(expert_dir(t) for t in SMOL_TASKS)]
    inputs = {
        n: (AutoModelForCausalLM.from_pretrained(args.set_dir / n, dtype=torch.float32).eval(), tokenizer)
        for n in names
    }
    table = evals.compare(inputs, tasks, task_dir, args.limit).set_index("model")
    del inputs
    print(table.to_markdown(floatfmt=".2f"), end="\n\n")
    rows = []
    for pair in args.pairs:
        a, b = pair.split("+")
        models = [args.set_dir / expert_dir(a), args.set_dir / expert_dir(b)]
        merges = {m: MERGES[m] for m in args.methods}
        scores = merge_scores(
            args.set_dir / BASE_DIR,
            models,
            merges,
            [task_name(a), task_name(b)],
            task_dir,
            args.limit,
            on_merge=lambda label, pair=pair: print(f"scored {pair} {label}", file=sys.stderr),
        )
        for _, row in scores.iterrows():
            kept = [
                retained_gain(
                    row[task_name(t)], table.loc[expert_dir(t), task_name(t)], table.loc[BASE_DIR, task_name(t)]
                )
                for t in (a, b)
            ]
            rows.append(
                f"| {pair} | {row['merge']} | {row[task_name(a)]:.2f} / {row[task_name(b)]:.2f} "
                f"| {kept[0]:.2f} / {kept[1]:.2f} | {'yes' if min(kept) >= 0.7 else 'no'} |"
            )
    print("| experts | merge | acc (first / second task) | kept gain | both >= 0.7 |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))
    print(f"\n{time.perf_counter() - start:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
