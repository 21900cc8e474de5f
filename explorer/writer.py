"""Write a merged checkpoint: size-capped safetensors shards + index, config, tokenizer, model card.

Everything goes into a hidden temporary folder beside the target, renamed into place only when
complete, so a failed or interrupted merge never leaves a folder that looks like a checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterable, Optional

import torch
from safetensors.torch import save_file

from explorer.checkpoint import INDEX_FILE, SINGLE_FILE, CheckpointError
from explorer.recipe import MergeRecipe

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "vocab.txt", "added_tokens.json", "chat_template.jinja",
)
SHARD_BYTES = 2 * 1024**3


def check_output_dir(out_dir: str | Path, inputs: Iterable[Path], overwrite: bool = False) -> Path:
    """Resolve ``out_dir`` and refuse it (CheckpointError) if it would touch an input or hold data.

    Refused: an input folder itself, a folder inside an input, a folder that contains an input, an
    existing non-empty folder unless ``overwrite``.
    """
    out = Path(out_dir).expanduser().resolve()
    for src in inputs:
        src = Path(src).expanduser().resolve()
        if out == src or src in out.parents or out in src.parents:
            raise CheckpointError(f"output folder {out} overlaps input {src}; choose an output folder outside every input")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise CheckpointError(f"output folder {out} already exists and is not empty; choose a new folder or allow overwrite")
    return out


def write_checkpoint(
    out: Path,
    tensors: Iterable[tuple[str, torch.Tensor]],
    source: Path,
    recipe: MergeRecipe,
    overwrite: bool = False,
    shard_bytes: int = SHARD_BYTES,
) -> Path:
    """Consume ``tensors`` into ``out`` with config/tokenizer/generation config copied from ``source``."""
    tmp = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        dtype = _write_shards(tmp, tensors, shard_bytes)
        _write_config(tmp, source, dtype)
        for name in TOKENIZER_FILES + ("generation_config.json",):
            if (source / name).is_file():
                shutil.copy2(source / name, tmp / name)
        (tmp / "merge_recipe.yaml").write_text(recipe.to_yaml())
        (tmp / "README.md").write_text(model_card(recipe))
        _replace(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write_shards(tmp: Path, tensors: Iterable[tuple[str, torch.Tensor]], shard_bytes: int) -> Optional[torch.dtype]:
    """Write shards as they fill; rename to HF's model-0000i-of-0000n names at the end."""
    shard: dict[str, torch.Tensor] = {}
    size, shards, weight_map, dtype = 0, [], {}, None
    for name, tensor in tensors:
        if shard and size + tensor.numel() * tensor.element_size() > shard_bytes:
            shards.append(_flush(tmp, shard, len(shards), weight_map))
            shard, size = {}, 0
        shard[name] = tensor.contiguous()
        size += tensor.numel() * tensor.element_size()
        dtype = tensor.dtype if tensor.is_floating_point() else dtype
    shards.append(_flush(tmp, shard, len(shards), weight_map))
    if len(shards) == 1:
        shards[0].rename(tmp / SINGLE_FILE)
        return dtype
    final = {}
    for i, path in enumerate(shards):
        target = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        path.rename(tmp / target)
        final[path.name] = target
    total = sum((tmp / f).stat().st_size for f in final.values())
    index = {"metadata": {"total_size": total}, "weight_map": {n: final[f] for n, f in weight_map.items()}}
    (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2))
    return dtype


def _flush(tmp: Path, shard: dict[str, torch.Tensor], number: int, weight_map: dict[str, str]) -> Path:
    path = tmp / f"shard-{number}.safetensors"
    save_file(shard, str(path), metadata={"format": "pt"})
    weight_map.update({name: path.name for name in shard})
    return path


def _write_config(tmp: Path, source: Path, dtype: Optional[torch.dtype]) -> None:
    config = json.loads((source / "config.json").read_text())
    if dtype is not None:
        keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["dtype"]
        config.update({k: str(dtype).removeprefix("torch.") for k in keys})
    (tmp / "config.json").write_text(json.dumps(config, indent=2))


def _replace(tmp: Path, out: Path, overwrite: bool) -> None:
    """Move ``tmp`` to ``out``; an existing ``out`` (only with overwrite) is removed after the swap."""
    if out.exists():
        if not overwrite and any(out.iterdir()):
            raise CheckpointError(f"output folder {out} appeared during the merge; nothing was overwritten")
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        out.rename(old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def model_card(recipe: MergeRecipe) -> str:
    """README.md for the merged model: mergekit-style front matter and the recipe that reproduces it."""
    sources = ([recipe.base_model] if recipe.base_model else []) + [e.model for e in recipe.models]
    lines = ["---", "library_name: transformers", "tags:", "- merge", "- merge-explorer", "base_model:"]
    lines += [f"- {s}" for s in sources]
    lines += [
        "---", "", f"# Merged with Merge Explorer ({recipe.merge_method})", "",
        "Reproduce with `python -m explorer merge merge_recipe.yaml --out DIR`:", "",
        "```yaml", recipe.to_yaml().rstrip(), "```", "",
    ]
    return "\n".join(lines)
