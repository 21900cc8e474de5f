"""``python -m evals MODEL_DIR [MODEL_DIR ...] --tasks zoo_add,zoo_reverse --task-dir OUT/tasks``.

Loads each checkpoint folder, scores it with lm-eval on local tasks and prints one table (rows:
models, labelled by folder name; columns: tasks, acc).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from evals.lm_eval_runner import compare, list_tasks


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, evaluate, print the table."""
    parser = argparse.ArgumentParser(prog="python -m evals", description=__doc__.split("\n")[0])
    parser.add_argument("models", nargs="+", type=Path, help="checkpoint folder(s)")
    parser.add_argument("--task-dir", type=Path, required=True, help="folder of lm-eval task YAMLs")
    parser.add_argument("--tasks", help="comma-separated task names (default: all in --task-dir)")
    parser.add_argument("--limit", type=int, help="examples per task (default: all)")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args(argv)
    tasks = args.tasks.split(",") if args.tasks else list_tasks(args.task_dir)
    models = {
        path.name: (
            AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(),
            AutoTokenizer.from_pretrained(path),
        )
        for path in args.models
    }
    table = compare(models, tasks, args.task_dir, args.limit, args.batch_size)
    print(table.to_string(index=False, float_format=lambda x: f"{x:.3f}"))


if __name__ == "__main__":
    main()
