"""Merge-kernel speed: ours vs mergekit 0.1.5 ``merge_tensors`` vs the memory-bandwidth floor.

For each method, merges N stacked float32 tensors of one shape (default: 3 models of a 2048 x 8192
MLP matrix, 64 MiB each) and reports the median wall time of ours and of mergekit's on the same
tensors, their ratio, and the floor: the bytes a merge must touch (read N inputs and the base, write
one output) divided by the measured copy bandwidth of this machine (torch ``copy_`` of a 256 MiB buffer).

    python bench/kernel_bench.py [--models 3] [--rows 2048] [--cols 8192] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault(
    "OMP_WAIT_POLICY", "PASSIVE"
)  # before torch loads, as the CLI and app do (both tools run under it)

import torch  # noqa: E402
from mergekit.merge_methods.api import merge_tensors  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as python bench/kernel_bench.py

from explorer import registry  # noqa: E402
from explorer.executor import merge_tensor  # noqa: E402


def median_seconds(fn, repeats: int, setup=lambda: None) -> float:
    """Median wall time of fn(setup()) over ``repeats`` runs after one warm-up; setup is not timed."""
    fn(setup())
    times = []
    for _ in range(repeats):
        arg = setup()
        start = time.perf_counter()
        fn(arg)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def copy_bandwidth(repeats: int) -> float:
    """Bytes per second of a large float32 copy (read + write counted)."""
    src = torch.randn(64 * 1024 * 1024)
    dst = torch.empty_like(src)
    seconds = median_seconds(lambda _: dst.copy_(src), repeats)
    return 2 * src.numel() * 4 / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=3)
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--cols", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    n, shape = args.models, (args.rows, args.cols)
    base = torch.randn(shape)
    models = torch.stack([base + 0.01 * torch.randn(shape) for _ in range(n)])
    bandwidth = copy_bandwidth(args.repeats)
    floor = (n + 2) * base.numel() * 4 / bandwidth
    print(
        f"threads={torch.get_num_threads()} tensor={shape} models={n} copy bandwidth={bandwidth / 1e9:.1f} GB/s floor={floor * 1e3:.0f} ms"
    )
    print(f"{'method':16s} {'ours ms':>9s} {'mergekit ms':>12s} {'ours/mergekit':>14s} {'ours/floor':>11s}")
    cases = {
        "linear": ({"weight": [1.0] * n}, False),
        "task_arithmetic": ({"weight": [0.5] * n}, True),
        "ties": ({"weight": [0.5] * n, "density": [0.5] * n}, True),
        "dare_linear": ({"weight": [0.5] * n, "density": [0.5] * n}, True),
    }
    for method, (per_model, with_base) in cases.items():
        spec = registry.get(method)
        params = {p.name: p.default for p in spec.params if not p.setup}
        params.update({k: torch.tensor(v) for k, v in per_model.items()})
        # merge_tensor consumes its stacked input (the executor's fresh read), so each run gets a copy
        anchor = base if with_base else None
        ours = median_seconds(
            lambda m, spec=spec, params=params, anchor=anchor: merge_tensor(spec, params, "w", anchor, m, 0),
            args.repeats,
            models.clone,
        )
        inputs = [base, *models] if with_base else list(models)
        kwargs = {"base_index": 0} if with_base else {}
        theirs = median_seconds(
            lambda _, inputs=inputs, method=method, per_model=per_model, kwargs=kwargs: merge_tensors(
                inputs, method, parameters=per_model, **kwargs
            ),
            args.repeats,
        )
        print(f"{method:16s} {ours * 1e3:9.0f} {theirs * 1e3:12.0f} {ours / theirs:14.2f} {ours / floor:11.1f}")


if __name__ == "__main__":
    main()
