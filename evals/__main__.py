"""``python -m evals MODEL_DIR [MODEL_DIR ...] --task-dir OUT/tasks`` and ``python -m evals greedy-soup ...``.

The first loads each checkpoint folder, scores it with lm-eval on local tasks and prints one table
(rows: models, labelled by folder name; columns: tasks, acc). ``greedy-soup MODEL ... --task-dir DIR
--task TASK --out DIR`` builds a greedy soup of the models (``evals.greedy_soup``): ranks them by
their own score, adds each to the soup when the soup's score does not drop, prints every step and
which models were kept, and writes the final soup.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

GREEDY_SOUP = "greedy-soup"


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, evaluate, print the table (or run ``greedy-soup``); returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == [GREEDY_SOUP]:
        return _greedy_soup(argv[1:])
    parser = argparse.ArgumentParser(
        prog="python -m evals",
        description="Score checkpoint folders with lm-eval on local tasks and print one table.",
        epilog=f"Greedy soup: python -m evals {GREEDY_SOUP} MODEL ... --task-dir DIR --task TASK [--limit N] --out DIR "
        f"(python -m evals {GREEDY_SOUP} --help)",
    )
    parser.add_argument("models", nargs="+", type=Path, help="checkpoint folder(s)")
    parser.add_argument("--task-dir", type=Path, required=True, help="folder of lm-eval task YAMLs")
    parser.add_argument("--tasks", help="comma-separated task names (default: all in --task-dir)")
    parser.add_argument("--limit", type=int, help="examples per task (default: all)")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evals.lm_eval_runner import compare, list_tasks

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
    return 0


def _greedy_soup(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog=f"python -m evals {GREEDY_SOUP}",
        description="Greedy soup (Wortsman et al. 2022): rank the models by their held-out score, start the soup with the "
        "best, add each next one when the soup's score (uniform average, scored in memory) does not drop; write the soup.",
    )
    parser.add_argument(
        "models", nargs="+", type=Path, help="candidate checkpoint folders (one architecture, fine-tuned from one base)"
    )
    parser.add_argument("--task-dir", type=Path, required=True, help="folder of lm-eval task YAMLs")
    parser.add_argument(
        "--task",
        action="append",
        required=True,
        help="held-out task to score on (repeat, or comma-separate, for the mean of several)",
    )
    parser.add_argument("--limit", type=int, help="examples per task (default: all)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", type=Path, help="output folder of the final soup (checked before any evaluation)")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an earlier output of this tool at --out when done"
    )
    args = parser.parse_args(argv)

    from evals.greedy_soup import greedy_soup_models
    from explorer.io.checkpoint import CheckpointError

    tasks = [t for arg in args.task for t in arg.split(",") if t]
    try:
        result = greedy_soup_models(
            args.models,
            tasks,
            args.task_dir,
            args.out,
            args.limit,
            args.batch_size,
            args.overwrite,
            log=lambda line: print(f"  {line}", flush=True),
        )
    except (CheckpointError, ValueError, KeyError, FileNotFoundError) as e:
        print(f"error: {e.args[0] if isinstance(e, KeyError) and e.args else e}", file=sys.stderr)
        return 2
    print(f"individual scores (mean acc over {', '.join(tasks)}):")
    for model, value in sorted(result.individual.items(), key=lambda kv: -kv[1]):
        print(f"  {value:.4f}  {model}")
    print("greedy steps:")
    for model, value, kept in result.soup.history:
        print(f"  {'kept' if kept else 'left out':8s} {model}  soup score {value:.4f}")
    print(
        f"soup of {len(result.soup.ingredients)}: {', '.join(result.soup.ingredients)}; score {result.soup.score:.4f}"
    )
    if result.out is not None:
        print(f"wrote {result.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
