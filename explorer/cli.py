"""Command line: ``python -m explorer merge | average-run | prune | merge-adapters | methods | info``.

``merge RECIPE.yaml --out DIR`` runs a recipe; ``average-run RUN_DIR --last-k K | --every-k K | --ema D``
averages a Trainer run's checkpoints (``explorer.run_average``); ``prune MODEL --sparsity S`` writes a
magnitude-pruned copy (``explorer.prune``); ``merge-adapters ADAPTER ... --out DIR`` merges LoRA
adapters; ``methods`` lists the methods; ``info [CHECKPOINT ...]`` says where a session of those checkpoints
keeps its tensors (a CUDA GPU or RAM, and why) and the stage cache's budget. Every output goes through ``explorer.io.writer`` (checked output
folder, written to a hidden temporary folder, renamed when complete; inputs only read).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import yaml
from pydantic import ValidationError
from tqdm import tqdm

from explorer import registry
from explorer.device import SPARE_MODELS, GiB, choose_device, float32_bytes, free_bytes
from explorer.executor import merge_to_folder
from explorer.io.checkpoint import CheckpointError, open_checkpoint
from explorer.messages import user_message
from explorer.recipe import MergeRecipe
from explorer.stage_cache import default_budget


def main(argv: list[str] | None = None) -> int:
    """Run the command line with ``argv`` (default: sys.argv); returns the exit status (0 ok, 2 refused)."""
    parser = argparse.ArgumentParser(
        prog="python -m explorer",
        description="Merge Explorer command line",
        epilog="Greedy soup (needs lm-eval): python -m evals greedy-soup MODEL ... --task-dir DIR --task TASK --out DIR",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    merge = sub.add_parser("merge", help="merge the checkpoints a recipe names into a new folder")
    merge.add_argument("recipe", type=Path, help="mergekit-style YAML recipe")
    merge.add_argument("--out", type=Path, required=True, help="output folder (must not be an input)")
    merge.add_argument("--overwrite", action="store_true", help="replace an existing output folder when done")
    merge.add_argument(
        "--fisher-cache",
        type=Path,
        help="folder of cached Fisher estimates (fisher method; default ~/.cache/merge_explorer/fisher)",
    )
    merge.add_argument(
        "--device",
        help="where tensors are merged: cpu (the default, or MERGE_EXPLORER_DEVICE), cuda, cuda:N, auto (a GPU with room)",
    )
    _add_average_run(sub)
    _add_prune(sub)
    _add_merge_adapters(sub)
    sub.add_parser("methods", help="list the merge methods and their parameters")
    info = sub.add_parser("info", help="where a session keeps its tensors (GPU or RAM, and why), and its cache budget")
    info.add_argument("checkpoints", nargs="*", type=Path, help="base and experts a session would load (their size)")
    args = parser.parse_args(argv)
    if args.command == "methods":
        return _methods()
    if args.command == "info":
        return _info(args.checkpoints)
    if args.command == "merge-adapters":
        return _merge_adapters(args)
    if args.command == "average-run":
        return _average_run(args)
    if args.command == "prune":
        return _prune(args)
    return _merge(args.recipe, args.out, args.overwrite, args.fisher_cache, args.device)


def _merge(
    recipe_path: Path, out: Path, overwrite: bool, fisher_cache: Path | None = None, device: str | None = None
) -> int:
    try:
        recipe = MergeRecipe.load(recipe_path)
    except FileNotFoundError:
        return _fail(f"{recipe_path}: recipe file not found")
    except OSError as e:
        return _fail(f"{recipe_path}: cannot read the recipe file ({e.strerror}); give the path of a YAML file")
    except (ValidationError, ValueError, KeyError, yaml.YAMLError) as e:
        return _fail(f"{recipe_path}: invalid recipe: {user_message(e)}")
    return _run_recipe(recipe, out, overwrite, fisher_cache, device)


def _run_recipe(
    recipe: MergeRecipe, out: Path, overwrite: bool, fisher_cache: Path | None = None, device: str | None = None
) -> int:
    bars: list[tqdm] = []  # created on the first progress report, after every input passed its checks

    def progress(fraction: float, _name: str) -> None:
        if not bars:
            bars.append(tqdm(total=100, desc=recipe.merge_method, bar_format="{l_bar}{bar}| {elapsed}<{remaining}"))
        bars[0].update(round(100 * fraction) - bars[0].n)

    error, started = None, time.perf_counter()
    try:
        merge_to_folder(recipe, out, progress=progress, overwrite=overwrite, fisher_cache=fisher_cache, device=device)
    except (CheckpointError, ValueError) as e:
        error = user_message(e)
    finally:
        for bar in bars:  # closed first, so that an error is the last thing printed
            bar.close()
    if error:
        return _fail(error)
    print(f"wrote {out} in {time.perf_counter() - started:.2f} s")
    return 0


def _add_average_run(sub) -> None:
    run = sub.add_parser(
        "average-run",
        help="average the checkpoint-STEP folders of one Trainer run (last k, every k-th, EMA)",
        description="Average the checkpoints of a Trainer run with the streaming merge: linear (equal weights) over the "
        "chosen checkpoints, or --ema over them oldest first. --print-recipe prints the recipe "
        "(replay it with: python -m explorer merge RECIPE.yaml --out DIR).",
    )
    run.add_argument("run_dir", type=Path, help="Trainer output_dir holding checkpoint-STEP folders")
    pick = run.add_mutually_exclusive_group()
    pick.add_argument("--last-k", type=int, metavar="K", help="the K newest checkpoints")
    pick.add_argument("--every-k", type=int, metavar="K", help="every K-th checkpoint counted back from the newest")
    run.add_argument(
        "--ema",
        type=float,
        metavar="DECAY",
        help="exponential moving average with this decay in [0, 1] over the chosen checkpoints (all by default), instead of a plain average",
    )
    run.add_argument("--dtype", default="float32", help="output dtype: float32, float16 or bfloat16")
    run.add_argument(
        "--print-recipe", action="store_true", help="print the recipe YAML (without --out: print only, merge nothing)"
    )
    run.add_argument("--out", type=Path, help="output folder (must not be an input)")
    run.add_argument(
        "--overwrite", action="store_true", help="replace an earlier output of this tool at --out when done"
    )


def _average_run(args: argparse.Namespace) -> int:
    from explorer.run_average import run_recipe

    if args.out is None and not args.print_recipe:
        return _fail("give --out DIR to write the average, or --print-recipe to see the recipe")
    try:
        recipe = run_recipe(args.run_dir, args.last_k, args.every_k, args.ema, args.dtype)
    except (ValidationError, ValueError) as e:  # CheckpointError is a ValueError
        return _fail(f"{args.run_dir}: {user_message(e)}")
    if args.print_recipe:
        print(recipe.to_yaml(), end="")
    return 0 if args.out is None else _run_recipe(recipe, args.out, args.overwrite)


def _add_prune(sub) -> None:
    prune = sub.add_parser(
        "prune",
        help="write a magnitude-pruned copy of a checkpoint",
        description="Zero the smallest-magnitude entries of every weight matrix (norms and biases are copied); "
        "each tensor keeps its dtype. The sparsity reached is printed and saved as prune_report.json.",
    )
    prune.add_argument("model", help="checkpoint folder (or any input the merge reads: .gguf, LoRA adapter, ...)")
    prune.add_argument("--sparsity", type=float, required=True, help="fraction of entries set to zero, in [0, 1]")
    prune.add_argument(
        "--scope",
        default="tensor",
        help="tensor: each matrix to the sparsity (default); model: one magnitude cutoff over all matrices together",
    )
    prune.add_argument("--out", type=Path, required=True, help="output folder (must not be the input or inside it)")
    prune.add_argument(
        "--overwrite", action="store_true", help="replace an earlier output of this tool at --out when done"
    )


def _prune(args: argparse.Namespace) -> int:
    from explorer.prune import prune_to_folder

    try:
        report = prune_to_folder(args.model, args.out, args.sparsity, args.scope, args.overwrite)
    except (CheckpointError, ValueError) as e:
        return _fail(str(e))
    print(
        f"pruned {len(report.pruned_tensors)} tensors (kept {len(report.kept_tensors)} as they are) per {report.scope}: "
        f"sparsity {report.sparsity_before:.4f} -> {report.sparsity_after:.4f}"
    )
    print(f"wrote {args.out}")
    return 0


def _add_merge_adapters(sub) -> None:
    merge = sub.add_parser("merge-adapters", help="merge PEFT LoRA adapters of one base into a new LoRA adapter")
    merge.add_argument("adapters", type=Path, nargs="+", help="LoRA adapter folders (adapter_config.json + weights)")
    merge.add_argument("--weights", type=float, nargs="+", help="one weight per adapter (default 1 each)")
    merge.add_argument(
        "--method",
        default="cat",
        help="cat (exact, rank = sum of ranks) or a task-vector method: task_arithmetic, ties, dare_ties, ...",
    )
    merge.add_argument(
        "--density", type=float, help="fraction of each task vector kept (ties, dare_*, breadcrumbs, della)"
    )
    merge.add_argument(
        "--rank", type=int, help="rank of the result for a task-vector method (default: the largest input rank)"
    )
    merge.add_argument("--seed", type=int, default=0, help="seed of random methods (dare_*)")
    merge.add_argument("--base", help="the shared base model (path or hub id), when the adapters name it differently")
    merge.add_argument("--out", type=Path, required=True, help="output adapter folder (must not be an input)")
    merge.add_argument("--overwrite", action="store_true", help="replace an existing output folder when done")


def _merge_adapters(args: argparse.Namespace) -> int:
    from explorer.adapter_merge import merge_adapters

    params = {} if args.density is None else {"density": args.density}
    try:
        merge_adapters(
            args.adapters, args.out, args.weights, args.method, params, args.rank, args.seed, args.base, args.overwrite
        )
    except (CheckpointError, ValueError) as e:
        return _fail(str(e))
    print(f"wrote {args.out}")
    return 0


def _methods() -> int:
    for spec in registry.all_methods():
        params = ", ".join(f"{p.name}{'[per model]' if p.per_model else ''}={p.default}" for p in spec.params)
        print(f"{spec.name:18s} {spec.space:6s} {params}")
    return 0


def _info(checkpoints: list[Path]) -> int:
    """Print the machine's devices and where a session of ``checkpoints`` would keep its tensors, and why."""
    try:
        opened = [open_checkpoint(c) for c in checkpoints]
    except CheckpointError as e:
        return _fail(str(e))
    model_bytes = max((float32_bytes(c.shape(n) for n in c.names()) for c in opened), default=0)
    needed = model_bytes * (len(opened) + SPARE_MODELS) if opened else 0
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads; RAM {free_bytes(torch.device('cpu')) / GiB:.1f} GiB available"
    )
    for i in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(i)
        print(f"cuda:{i} {torch.cuda.get_device_name(i)}: {free / GiB:.1f} of {total / GiB:.1f} GiB free")
    try:
        choice = choose_device(needed)
    except ValueError as e:
        return _fail(str(e))
    what = (
        f"{len(opened)} checkpoint(s), {needed / GiB:.2f} GiB with room to merge" if opened else "no checkpoints given"
    )
    print(f"a session ({what}): {choice.describe()}")
    print(f"stage cache budget: {default_budget(choice.device) / GiB:.1f} GiB (MERGE_EXPLORER_CACHE_GB sets it)")
    return 0


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2
