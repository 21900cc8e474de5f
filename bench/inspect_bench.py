"""Time ``inspect_panels`` (all Inspect figures) on three models of SmolLM2-135M size.

    python bench/inspect_bench.py                      # synthetic: base + 2 experts, SmolLM2-135M shapes
    python bench/inspect_bench.py --experts 3          # synthetic: base + 3 experts
    python bench/inspect_bench.py BASE EXPERT EXPERT   # real checkpoint folders, through MergeSession
    python bench/inspect_bench.py --disk BASE EXPERT EXPERT   # ... streamed from disk (DiskTaskVectors)

Synthetic weights have SmolLM2-135M's tensor names and shapes (hidden 576, 30 layers, intermediate
1536, vocab 49152, 9 heads / 3 kv heads of dim 64, tied embeddings: 134.5M parameters); each expert
is the base plus Gaussian noise (std 1e-3), held in memory like a MergeSession. The merge passed
to the panels is the mean of the experts (task arithmetic, lambda 1 / N). Prints seconds
(inspect_panels wall and CPU, and its scan alone) and RSS (before, peak during the call).

On a loaded machine run it with OMP_WAIT_POLICY=PASSIVE (or --threads 1): OpenMP threads that spin
while waiting for a descheduled partner made it 20x slower here at load average 5 on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import threading
import time
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from explorer.inspect import plots, stats

HIDDEN, LAYERS, INTERMEDIATE, VOCAB, HEADS, KV_HEADS, HEAD_DIM = 576, 30, 1536, 49152, 9, 3, 64


def smollm2_shapes() -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of SmolLM2-135M (LlamaForCausalLM, tied embeddings, so no lm_head)."""
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.k_proj.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.v_proj.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.o_proj.weight": (HIDDEN, HEADS * HEAD_DIM),
            p + "mlp.gate_proj.weight": (INTERMEDIATE, HIDDEN),
            p + "mlp.up_proj.weight": (INTERMEDIATE, HIDDEN),
            p + "mlp.down_proj.weight": (HIDDEN, INTERMEDIATE),
            p + "input_layernorm.weight": (HIDDEN,),
            p + "post_attention_layernorm.weight": (HIDDEN,),
        }
    shapes["model.norm.weight"] = (HIDDEN,)
    return shapes


class SyntheticSession:
    """In-memory base + experts with MergeSession's attributes (names, base, models, task_vectors)."""

    def __init__(self, n_experts: int, noise: float = 1e-3, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        shapes = smollm2_shapes()
        self.names = list(shapes)
        self.labels = [f"expert{i}" for i in range(n_experts)]
        self.base = {n: torch.ones(s) if len(s) == 1 else torch.randn(s, generator=g) * 0.02 for n, s in shapes.items()}
        self.models = [
            {n: b + noise * torch.randn(b.shape, generator=g) for n, b in self.base.items()} for _ in range(n_experts)
        ]

    def task_vectors(self, name: str) -> torch.Tensor:
        return torch.stack([m[name] for m in self.models]) - self.base[name]


def mean_merge(source) -> dict[str, torch.Tensor]:
    """B + mean_i (M_i - B) for every tensor of ``source`` (task arithmetic with lambda 1 / N)."""
    return {n: source.base[n] + source.task_vectors(n).mean(dim=0) for n in source.names}


def peak_rss_during(fn):
    """(result, peak RSS in bytes while ``fn`` ran), RSS polled every 5 ms."""
    proc, peak, done = psutil.Process(os.getpid()), [0], threading.Event()

    def poll():
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.005)

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    try:
        return fn(), peak[0]
    finally:
        done.set()
        watcher.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="*", help="BASE EXPERT [EXPERT ...] checkpoint folders (default: synthetic)")
    parser.add_argument(
        "--experts", type=int, default=2, help="synthetic experts (default 2, i.e. 3 models with the base)"
    )
    parser.add_argument(
        "--disk", action="store_true", help="stream the folders from disk instead of loading a MergeSession"
    )
    parser.add_argument("--density", type=float, default=0.2)
    parser.add_argument("--sample", type=int, default=stats.DEFAULT_SAMPLE)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    start = time.perf_counter()
    if args.folders and args.disk:
        source = stats.DiskTaskVectors(args.folders[0], args.folders[1:])
    elif args.folders:
        from explorer.session import MergeSession

        source = MergeSession(args.folders[0], args.folders[1:])
    else:
        source = SyntheticSession(args.experts)
    merged = mean_merge(source)
    params = sum(source.base[n].numel() for n in source.names)
    print(
        f"{type(source).__name__}: {len(source.models)} experts + base, {params / 1e6:.1f}M parameters each, ready in {time.perf_counter() - start:.1f} s; "
        f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.2f}"
    )
    rss_before = psutil.Process().memory_info().rss
    for run in range(args.repeat):
        t0 = time.perf_counter()
        stats.scan(source, args.density, merged, (0.005,), args.sample)
        t1, cpu = time.perf_counter(), time.process_time()
        panels, peak = peak_rss_during(lambda: plots.inspect_panels(source, args.density, merged, sample=args.sample))
        t2, cpu = time.perf_counter(), time.process_time() - cpu
        print(
            f"run {run + 1}: inspect_panels {t2 - t1:.2f} s wall, {cpu:.2f} s CPU ({len(panels)} panels; its scan alone {t1 - t0:.2f} s); "
            f"RSS before {rss_before / 2**30:.2f} GiB, peak during {peak / 2**30:.2f} GiB (+{(peak - rss_before) / 2**20:.0f} MiB)"
        )
    print(f"max RSS of the process (ru_maxrss): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")


if __name__ == "__main__":
    main()
