"""Peak memory and wall time of a streaming merge: Merge Explorer's CLI vs mergekit-yaml, same recipe.

Makes three synthetic Llama-shaped checkpoints (default: hidden 2048, 16 layers, vocab 32000, untied,
float16, about 0.95 B parameters and 1.9 GB each, sharded safetensors) unless they already exist,
writes one mergekit-style recipe (linear, or ties with the first model as base), then runs, each in
its own process under ``/usr/bin/time`` (peak RSS = max resident set size, which counts memory-mapped
file pages a process has touched):

  ours                 python -m explorer merge recipe.yaml --out DIR
  mergekit (default)   mergekit-yaml recipe.yaml DIR --no-cuda
  mergekit (low mem)   mergekit-yaml recipe.yaml DIR --no-cuda --lazy-unpickle --out-shard-size 100M

and prints a table with the predicted bound of our streaming executor,
(2N + 4) x largest tensor in float32 (inputs of one tensor read ahead while one merges and one is written)
+ the peak of the same CLI merging three tiny models.

Usage: python bench/memory_bench.py [--dir /tmp/merge-bench] [--layers 16] [--method linear|ties] [--keep]
Needs about 6 x 1.9 GB free in --dir (3 models, 3 outputs; checked first). Not a test: minutes of CPU time.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig

ROOT = Path(__file__).resolve().parent.parent
TIME = "/usr/bin/time"
MERGEKIT_YAML = str(Path(sys.executable).parent / "mergekit-yaml")  # the environment running this script


def llama_config(hidden: int, layers: int, vocab: int) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=hidden,
        intermediate_size=int(hidden * 2.75),
        num_hidden_layers=layers,
        num_attention_heads=hidden // 128,
        num_key_value_heads=hidden // 128,
        vocab_size=vocab,
        tie_word_embeddings=False,
        dtype="float16",
        architectures=["LlamaForCausalLM"],
    )


def tensor_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Llama state-dict names and shapes for ``config`` (as LlamaForCausalLM saves them)."""
    h, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    shapes = {"model.embed_tokens.weight": (v, h)}
    for n in range(config.num_hidden_layers):
        p = f"model.layers.{n}."
        shapes |= {p + f"self_attn.{k}_proj.weight": (h, h) for k in "qkvo"}
        shapes |= {
            p + "mlp.gate_proj.weight": (i, h),
            p + "mlp.up_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i),
        }
        shapes |= {p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,)}
    return shapes | {"model.norm.weight": (h,), "lm_head.weight": (v, h)}


def make_model(folder: Path, config: LlamaConfig, seed: int, shard_bytes: int = 1 << 30) -> None:
    """A float16 checkpoint of random weights (std 0.02) in ``folder``, sharded at ``shard_bytes``."""
    if (folder / "model.safetensors.index.json").is_file():
        return
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    shard, size, weight_map, files = {}, 0, {}, []
    shapes = tensor_shapes(config)
    for k, (name, shape) in enumerate(shapes.items()):
        shard[name] = (0.02 * torch.randn(shape, generator=generator)).to(torch.float16)
        size += shard[name].numel() * 2
        if size >= shard_bytes or k == len(shapes) - 1:
            files.append(f"model-{len(files) + 1:05d}.safetensors")
            save_file(shard, str(folder / files[-1]), metadata={"format": "pt"})
            weight_map |= {n: files[-1] for n in shard}
            shard, size = {}, 0
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config.save_pretrained(folder)


def recipe_yaml(models: list[Path], method: str) -> str:
    """A recipe both tools read (mergekit keys only)."""
    if method == "ties":
        lines = ["merge_method: ties", f"base_model: {models[0]}", "models:"]
        lines += [f"  - model: {m}\n    parameters:\n      weight: 1.0\n      density: 0.5" for m in models[1:]]
    else:
        lines = ["merge_method: linear", "models:"] + [
            f"  - model: {m}\n    parameters:\n      weight: 1.0" for m in models
        ]
    return "\n".join(lines + ["dtype: float16", ""])


def measure(command: list[str], log: Path) -> tuple[float, float]:
    """(wall seconds, peak RSS GiB) of ``command`` run to completion; exits on failure."""
    start = time.perf_counter()
    run = subprocess.run([TIME, "-f", "PEAK_KB=%M", *command], capture_output=True, text=True, cwd=ROOT, check=False)
    wall = time.perf_counter() - start
    log.write_text(run.stdout + run.stderr)
    if run.returncode != 0:
        sys.exit(f"failed ({run.returncode}): {' '.join(command)}; see {log}")
    peak_kb = int(run.stderr.rsplit("PEAK_KB=", 1)[1].split()[0])
    return wall, peak_kb / 1024**2


def difference(a: Path, b: Path, name: str) -> tuple[float, float]:
    """(max |a - b|, share of entries differing by more than 1e-3) of tensor ``name`` in two output folders."""

    def read(folder: Path) -> torch.Tensor:
        index = folder / "model.safetensors.index.json"
        file = json.loads(index.read_text())["weight_map"][name] if index.is_file() else "model.safetensors"
        return load_file(str(folder / file))[name].float()

    gap = (read(a) - read(b)).abs()
    return gap.max().item(), (gap > 1e-3).float().mean().item()


def fixed_overhead(folder: Path, method: str) -> float:
    """Peak RSS (GiB) of our CLI merging three tiny models: the interpreter, imports and bookkeeping."""
    models = [folder / f"model{i}" for i in range(3)]
    for i, model in enumerate(models):
        make_model(model, llama_config(128, 1, 256), seed=i)
    (folder / "recipe.yaml").write_text(recipe_yaml(models, method))
    shutil.rmtree(folder / "out", ignore_errors=True)
    peak = measure(
        [sys.executable, "-m", "explorer", "merge", str(folder / "recipe.yaml"), "--out", str(folder / "out")],
        folder / "log.txt",
    )[1]
    shutil.rmtree(folder)
    return peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/merge-bench"), help="where the models and outputs go")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--method", choices=["linear", "ties"], default="linear")
    parser.add_argument("--keep", action="store_true", help="keep the synthetic models for another run")
    args = parser.parse_args()

    config = llama_config(args.hidden, args.layers, args.vocab)
    shapes = tensor_shapes(config)
    model_bytes = 2 * sum(torch.Size(s).numel() for s in shapes.values())
    args.dir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(args.dir).free
    if free < 6 * model_bytes:
        sys.exit(f"{args.dir}: {free / 1e9:.1f} GB free, need {6 * model_bytes / 1e9:.1f} GB (3 models + 3 outputs)")
    models = [args.dir / f"model{i}" for i in range(3)]
    print(
        f"models: 3 x {sum(torch.Size(s).numel() for s in shapes.values()) / 1e9:.2f} B params, {model_bytes / 1e9:.2f} GB float16 each",
        flush=True,
    )
    for i, folder in enumerate(models):
        make_model(folder, config, seed=i)
    recipe = args.dir / "recipe.yaml"
    recipe.write_text(recipe_yaml(models, args.method))

    outs = {"ours": "out-ours", "mergekit (default)": "out-mk-default", "mergekit (low mem)": "out-mk-low"}
    outs = {label: args.dir / name for label, name in outs.items()}
    runs = {
        "ours": [sys.executable, "-m", "explorer", "merge", str(recipe), "--out", str(outs["ours"])],
        "mergekit (default)": [MERGEKIT_YAML, str(recipe), str(outs["mergekit (default)"]), "--no-cuda", "--quiet"],
        "mergekit (low mem)": [
            MERGEKIT_YAML,
            str(recipe),
            str(outs["mergekit (low mem)"]),
            "--no-cuda",
            "--quiet",
            "--lazy-unpickle",
            "--out-shard-size",
            "100M",
        ],
    }
    overhead = fixed_overhead(args.dir / "tiny", args.method)
    largest = max(torch.Size(s).numel() for s in shapes.values()) * 4 / 1024**3
    n = len(models)
    bound = (2 * n + 4) * largest + overhead
    results = {}
    for i, (label, command) in enumerate(runs.items()):
        shutil.rmtree(outs[label], ignore_errors=True)
        print(f"running {label} ...", flush=True)
        results[label] = measure(command, args.dir / f"log-{i}.txt")

    print(
        f"\nrecipe: {args.method}, N = {n} models, largest tensor {largest * 1024:.0f} MiB in float32, fixed overhead {overhead:.2f} GiB"
    )
    print(f"predicted bound for ours: (2N + 4) x largest + overhead = {bound:.2f} GiB\n")
    print("| run | wall time (s) | peak RSS (GiB) |\n|---|---|---|")
    for label, (wall, peak) in results.items():
        print(f"| {label} | {wall:.0f} | {peak:.2f} |")
    print(f"| bound (ours) | | {bound:.2f} |")
    gap, share = difference(outs["ours"], outs["mergekit (low mem)"], "model.embed_tokens.weight")
    print(
        f"\nours vs mergekit on model.embed_tokens.weight: max |difference| {gap:.3g}, entries differing by > 1e-3: {share:.2%}"
    )
    print("(mergekit computes in the recipe dtype, float16 here; ours in float32, cast at the end)")
    (args.dir / "results.json").write_text(
        json.dumps({"bound_gib": bound, "overhead_gib": overhead, "runs": results}, indent=2)
    )
    for out in outs.values():
        shutil.rmtree(out, ignore_errors=True)
    if not args.keep:
        for folder in models:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
