"""``python -m evals MODEL_DIR [MODEL_DIR ...] --task-dir OUT/tasks`` and ``python -m evals greedy-soup ...``.

The first loads each checkpoint folder, scores it with lm-eval on local (or lm-eval's built-in) tasks
and prints one table: rows are the models, labelled by the shortest distinguishing end of their paths;
columns are every metric of every task, with its standard error. ``greedy-soup MODEL ... --task-dir DIR
--task TASK --out DIR`` builds a greedy soup of the models (``evals.greedy_soup``): ranks them by
their own score, adds each to the soup when the soup's score does not drop, prints every step and
which models were kept, and writes the final soup. ``scenarios (--tiny ZOO | --smollm2 SET) --work DIR``
runs the method-family scenarios (``evals.scenarios``) and writes their tables to ``DIR/scenarios.md``.
``sweep`` and ``search`` run a grid or a search over a merge method's parameters as a resumable
Optuna study (``evals.study``; ``--backend ray`` runs the trials on Ray) and print its table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

GREEDY_SOUP = "greedy-soup"
SCENARIOS = "scenarios"
SWEEP = "sweep"
SEARCH = "search"
# what a user's mistake raises (a wrong path, task name or value; CheckpointError is a ValueError): one line, no traceback
USER_ERRORS = (ValueError, KeyError, FileNotFoundError)


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, evaluate, print the table (or run ``greedy-soup``); returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == [GREEDY_SOUP]:
        return _greedy_soup(argv[1:])
    if argv[:1] == [SCENARIOS]:
        return _scenarios(argv[1:])
    if argv[:1] in ([SWEEP], [SEARCH]):
        return _study(argv[0], argv[1:])
    parser = argparse.ArgumentParser(
        prog="python -m evals",
        description="Score checkpoint folders with lm-eval on local tasks and print one table.",
        epilog=f"Other commands, each with its own --help: python -m evals {GREEDY_SOUP} (a greedy soup of the models), "
        f"{SWEEP} (a grid over a method's parameters), {SEARCH} (a search over them), {SCENARIOS} (the method-family "
        "scenarios).",
    )
    parser.add_argument("models", nargs="+", type=Path, help="checkpoint folder(s)")
    parser.add_argument("--task-dir", type=Path, required=True, help="folder of lm-eval task YAMLs")
    parser.add_argument("--tasks", help="comma-separated task names (default: all in --task-dir)")
    parser.add_argument("--limit", type=int, help="examples per task (default: all)")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evals.comparison import wide_scores
    from evals.labels import distinct_labels
    from evals.lm_eval_runner import check_tasks, list_tasks, metrics_table, task_metrics

    tasks = args.tasks.split(",") if args.tasks else list_tasks(args.task_dir)
    try:
        labels = distinct_labels(args.models)
        check_tasks(tasks, args.task_dir)  # before any model is loaded
        tables = []
        for label, path in zip(labels, args.models, strict=True):
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
            metrics = task_metrics(
                model, AutoTokenizer.from_pretrained(path), tasks, args.task_dir, args.limit, args.batch_size
            )
            tables.append(metrics_table(label, metrics))
    except USER_ERRORS as e:
        return _error(e)
    print(wide_scores(pd.concat(tables), stderr=True).to_string(index=False))
    return 0


def _error(e: BaseException) -> int:
    """Print ``e`` as the CLI's one ``error:`` line (``explorer.messages.user_message``); the exit status 2."""
    from explorer.messages import user_message

    print(f"error: {user_message(e)}", file=sys.stderr)
    return 2


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
    except USER_ERRORS as e:
        return _error(e)
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


def _study(kind: str, argv: list[str]) -> int:
    """``sweep`` (a grid) or ``search`` (TPE / CMA-ES) of a merge method's parameters (``evals.study``)."""
    grid = kind == SWEEP
    parser = argparse.ArgumentParser(
        prog=f"python -m evals {kind}",
        description=(
            "Grid over one or two parameters of a merge method"
            if grid
            else "Search every parameter of a merge method (TPE or CMA-ES) with a trial budget"
        )
        + ": each point merged in memory and scored with lm-eval; an Optuna study in STORAGE/merge_studies.db "
        "(the same command resumes it), scores cached by recipe hash + task + limit.",
    )
    parser.add_argument("models", nargs="+", type=Path, help="expert checkpoint folders, in order (weight[0], ...)")
    parser.add_argument("--base", type=Path, help="base checkpoint (methods over task vectors need one)")
    parser.add_argument("--method", required=True, help="merge method (python -m explorer methods)")
    if grid:
        parser.add_argument(
            "--grid",
            action="append",
            required=True,
            metavar="NAME=V1,V2,...",
            help="a parameter and its values (once or twice): lambda=0.5,1,1.5; density[0]=...; mix=0,0.5,1",
        )
    else:
        parser.add_argument("--trials", type=int, required=True, help="the study's trial budget")
        parser.add_argument("--sampler", choices=["tpe", "cmaes"], default="tpe")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="fix a parameter")
    parser.add_argument("--held-in", required=True, help="comma-separated tasks; their mean score is maximized")
    parser.add_argument("--held-out", default="", help="comma-separated tasks scored and recorded, not optimized")
    parser.add_argument("--task-dir", type=Path, required=True, help="folder of lm-eval task YAMLs")
    parser.add_argument("--storage", type=Path, required=True, help="folder of merge_studies.db (e.g. the models')")
    parser.add_argument("--study", help="study name (default: derived from the settings)")
    parser.add_argument("--limit", type=int, help="examples per task (default: all)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0, help="the recipes' and the sampler's seed")
    parser.add_argument("--backend", choices=["local", "ray"], default="local")
    parser.add_argument("--ray-address", help="Ray cluster address (default: a local Ray instance of --workers CPUs)")
    parser.add_argument("--workers", type=int, default=2, help="Ray actors, each holding the inputs")
    parser.add_argument("--out", type=Path, help="write the table to this .csv or .json file")
    args = parser.parse_args(argv)

    import yaml

    from evals import study
    from explorer.session import MergeSession

    def pairs(items: list[str]) -> dict:
        found = {}
        for item in items:
            name, sep, value = item.partition("=")
            if not sep or not name:
                parser.error(f"{item!r}: write NAME=VALUE")
            found[name.strip()] = value
        return found

    fixed = {k: yaml.safe_load(v) for k, v in pairs(args.set).items()}
    common = dict(
        held_in=[t for t in args.held_in.split(",") if t],
        task_dir=args.task_dir,
        storage_dir=args.storage,
        study_name=args.study,
        held_out=[t for t in args.held_out.split(",") if t],
        fixed=fixed,
        limit=args.limit,
        batch_size=args.batch_size,
        seed=args.seed,
        backend=args.backend,
        ray_address=args.ray_address,
        workers=args.workers,
        progress=lambda f, m: print(f"  [{f:4.0%}] {m}", flush=True),
    )
    try:
        session = MergeSession(args.base, args.models)
        if grid:
            values = {k: [yaml.safe_load(x) for x in v.split(",")] for k, v in pairs(args.grid).items()}
            result = study.run_grid(session, args.method, values, **common)
        else:
            result = study.run_search(session, args.method, args.trials, sampler=args.sampler, **common)
    except USER_ERRORS as e:
        return _error(e)
    table = study.study_table(args.storage, result.study_name)
    print(f"study {result.study_name!r} in {args.storage / study.DB_NAME}:")
    print(table.drop(columns=["recipe", "recipe_hash"]).to_string(index=False))
    if (table["state"] == "COMPLETE").any():
        print("best recipe:\n" + study.best_recipe(args.storage, result.study_name).to_yaml())
    if args.out:
        print(f"wrote {study.export_table(table, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
