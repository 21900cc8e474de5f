"""``python -m explorer.zoo [--smollm2] [--smollm2-expert] [--smollm2-experts] OUT``: build demo models.

Without a flag it builds the tiny zoo (``explorer.zoo.tiny``); ``--smollm2`` converts the packaged
SmolLM2-135M-Instruct (``explorer.zoo.smollm2``); ``--smollm2-experts`` builds the SmolLM2 expert set
(``explorer.zoo.experts``).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
from pathlib import Path

from explorer.zoo.experts import build_smollm2_experts
from explorer.zoo.smollm2 import SmolExpertConfig, build_smollm2_expert, convert_smollm2
from explorer.zoo.tiny import EXPERT_TASKS, build_zoo
from explorer.zoo.train import timed


def print_progress(fraction: float, message: str) -> None:
    """A ``Progress`` callback for the command line: ``[ 42%] message``."""
    print(f"[{fraction:4.0%}] {message}", flush=True)


def main(argv: list[str] | None = None) -> None:
    """``python -m explorer.zoo [--smollm2] [--smollm2-expert] [--smollm2-experts] OUT``."""
    parser = argparse.ArgumentParser(prog="python -m explorer.zoo", description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path, help="zoo folder to write")
    parser.add_argument(
        "--smollm2",
        action="store_true",
        help="only convert SmolLM2-135M-Instruct (no tiny zoo)",
    )
    parser.add_argument(
        "--smollm2-expert",
        action="store_true",
        help="only make the SmolLM2 expert (converting SmolLM2 first if needed)",
    )
    parser.add_argument(
        "--smollm2-experts",
        action="store_true",
        help="only build the SmolLM2 expert set (base, expert-say, expert-rev, expert-add, tasks)",
    )
    parser.add_argument(
        "--task",
        default=SmolExpertConfig.task,
        choices=EXPERT_TASKS,
        help="task of the SmolLM2 expert (default %(default)s)",
    )
    args = parser.parse_args(argv)
    timings: dict[str, float] = {}
    if args.smollm2:
        with timed("smollm2 conversion", timings):
            print(convert_smollm2(args.out))
    if args.smollm2_expert:
        with timed("smollm2 expert", timings):
            print(build_smollm2_expert(args.out, SmolExpertConfig(task=args.task)))
    if args.smollm2_experts:
        with timed("smollm2 expert set", timings):
            print(build_smollm2_experts(args.out, print_progress))
    if not (args.smollm2 or args.smollm2_expert or args.smollm2_experts):
        build_zoo(args.out)


main()
