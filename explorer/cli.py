"""Command line: ``python -m explorer merge RECIPE.yaml --out DIR``, ``merge-adapters ADAPTER ... --out DIR``, ``methods``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml
from pydantic import ValidationError
from tqdm import tqdm

from explorer import registry
from explorer.checkpoint import CheckpointError
from explorer.executor import merge_to_folder
from explorer.recipe import MergeRecipe


def main(argv: list[str] | None = None) -> int:
    """Run the command line with ``argv`` (default: sys.argv); returns the exit status (0 ok, 2 refused)."""
    parser = argparse.ArgumentParser(prog="python -m explorer", description="Merge Explorer command line")
    sub = parser.add_subparsers(dest="command", required=True)
    merge = sub.add_parser("merge", help="merge the checkpoints a recipe names into a new folder")
    merge.add_argument("recipe", type=Path, help="mergekit-style YAML recipe")
    merge.add_argument("--out", type=Path, required=True, help="output folder (must not be an input)")
    merge.add_argument("--overwrite", action="store_true", help="replace an existing output folder when done")
    merge.add_argument("--fisher-cache", type=Path, help="folder of cached Fisher estimates (fisher method; default ~/.cache/merge_explorer/fisher)")
    sub.add_parser("methods", help="list the merge methods and their parameters")
    _add_merge_adapters(sub)
    args = parser.parse_args(argv)
    if args.command == "methods":
        return _methods()
    if args.command == "merge-adapters":
        return _merge_adapters(args)
    return _merge(args.recipe, args.out, args.overwrite, args.fisher_cache)


def _merge(recipe_path: Path, out: Path, overwrite: bool, fisher_cache: Path | None = None) -> int:
    try:
        recipe = MergeRecipe.load(recipe_path)
    except FileNotFoundError:
        return _fail(f"{recipe_path}: recipe file not found")
    except OSError as e:
        return _fail(f"{recipe_path}: cannot read the recipe file ({e.strerror}); give the path of a YAML file")
    except (ValidationError, ValueError, KeyError, yaml.YAMLError) as e:
        return _fail(f"{recipe_path}: invalid recipe: {e}")
    bars: list[tqdm] = []  # created on the first progress report, after every input passed its checks

    def progress(fraction: float, _name: str) -> None:
        if not bars:
            bars.append(tqdm(total=100, unit="%", desc=recipe.merge_method))
        bars[0].update(round(100 * fraction) - bars[0].n)

    error = None
    try:
        merge_to_folder(recipe, out, progress=progress, overwrite=overwrite, fisher_cache=fisher_cache)
    except (CheckpointError, ValueError) as e:
        error = str(e)
    finally:
        for bar in bars:  # closed first, so that an error is the last thing printed
            bar.close()
    if error:
        return _fail(error)
    print(f"wrote {out}")
    return 0


def _add_merge_adapters(sub) -> None:
    merge = sub.add_parser("merge-adapters", help="merge PEFT LoRA adapters of one base into a new LoRA adapter")
    merge.add_argument("adapters", type=Path, nargs="+", help="LoRA adapter folders (adapter_config.json + weights)")
    merge.add_argument("--weights", type=float, nargs="+", help="one weight per adapter (default 1 each)")
    merge.add_argument("--method", default="cat", help="cat (exact, rank = sum of ranks) or a task-vector method: task_arithmetic, ties, dare_ties, ...")
    merge.add_argument("--density", type=float, help="fraction of each task vector kept (ties, dare_*, breadcrumbs, della)")
    merge.add_argument("--rank", type=int, help="rank of the result for a task-vector method (default: the largest input rank)")
    merge.add_argument("--seed", type=int, default=0, help="seed of random methods (dare_*)")
    merge.add_argument("--base", help="the shared base model (path or hub id), when the adapters name it differently")
    merge.add_argument("--out", type=Path, required=True, help="output adapter folder (must not be an input)")
    merge.add_argument("--overwrite", action="store_true", help="replace an existing output folder when done")


def _merge_adapters(args: argparse.Namespace) -> int:
    from explorer.adapter_merge import merge_adapters

    params = {} if args.density is None else {"density": args.density}
    try:
        merge_adapters(args.adapters, args.out, args.weights, args.method, params, args.rank, args.seed, args.base, args.overwrite)
    except (CheckpointError, ValueError) as e:
        return _fail(str(e))
    print(f"wrote {args.out}")
    return 0


def _methods() -> int:
    for spec in registry.all_methods():
        params = ", ".join(f"{p.name}{'[per model]' if p.per_model else ''}={p.default}" for p in spec.params)
        print(f"{spec.name:18s} {spec.space:6s} {params}")
    return 0


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2
