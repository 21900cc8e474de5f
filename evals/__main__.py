"""``python -m evals MODEL_DIR [MODEL_DIR ...] --task-dir OUT/tasks`` and ``python -m evals greedy-soup ...``.

The first loads each checkpoint folder, scores it with lm-eval on local tasks and prints one table
(rows: models, labelled by folder name; columns: tasks, acc). ``greedy-soup MODEL ... --task-dir DIR
--task TASK --out DIR`` builds a greedy soup of the models (``evals.greedy_soup``): ranks them by
their own score, adds each to the soup when the soup's score does not drop, prints every step and
which models were kept, and writes the final soup. ``scenarios (--tiny ZOO | --smollm2 SET) --work DIR``
runs the method-family scenarios (``evals.scenarios``) and writes their tables to ``DIR/scenarios.md``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

GREEDY_SOUP = "greedy-soup"
SCENARIOS = "scenarios"


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, evaluate, print the table (or run ``greedy-soup``); returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == [GREEDY_SOUP]:
        return _greedy_soup(argv[1:])
    if argv[:1] == [SCENARIOS]:
        return _scenarios(argv[1:])
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


def _scenarios(argv: list[str]) -> int:
    from evals.scenarios import SCENARIOS as NAMES

    parser = argparse.ArgumentParser(
        prog=f"python -m evals {SCENARIOS}",
        description="Run the method-family scenarios on a testbed and write their README tables (markdown).",
        epilog="Scenarios: " + "; ".join(f"{k}: {v}" for k, v in NAMES.items()),
    )
    bed = parser.add_mutually_exclusive_group(required=True)
    bed.add_argument("--tiny", type=Path, help="tiny zoo folder (built there if missing: ~2.5 CPU minutes)")
    bed.add_argument("--smollm2", type=Path, help="SmolLM2 expert set (built there if missing: ~9 CPU minutes)")
    parser.add_argument("--work", type=Path, required=True, help="folder for what the scenarios build (reused)")
    parser.add_argument("--only", nargs="+", choices=list(NAMES), default=list(NAMES), help="default: all")
    parser.add_argument("--limit", type=int, help="examples per task (default: all held-out examples)")
    parser.add_argument("--out", type=Path, help="markdown file to write (default: WORK/scenarios.md)")
    args = parser.parse_args(argv)

    import time

    from evals.scenarios import run_scenario
    from evals.scenarios.report import to_markdown
    from explorer.zoo import experts, tiny
    from explorer.zoo.testbed import smollm2_testbed, tiny_testbed

    def log(line: str) -> None:
        print(f"  {line}", flush=True)

    if args.tiny:
        if not tiny.zoo_is_built(args.tiny):
            tiny.build_zoo(args.tiny)
        testbed = tiny_testbed(args.tiny)
    else:
        experts.build_smollm2_experts(args.smollm2, lambda f, m: log(f"[{f:4.0%}] {m}"))
        testbed = smollm2_testbed(args.smollm2)
    out = args.out or args.work / "scenarios.md"
    sections = []
    for name in args.only:
        print(f"{name}: {NAMES[name]}", flush=True)
        start = time.perf_counter()
        tables = run_scenario(name, testbed, args.work, args.limit, log)
        seconds = time.perf_counter() - start
        sections.append("\n".join(to_markdown(t) for t in tables) + f"\n({name}: {seconds:.0f} s on this machine)\n")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("\n".join(sections))  # after every scenario: a long run shows what is done
        print(sections[-1], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
