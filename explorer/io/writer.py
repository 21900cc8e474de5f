"""Write a merged checkpoint: size-capped safetensors shards + index, config, tokenizer, model card.

Everything goes into a hidden temporary folder beside the target (``.NAME.partial-XXXX``), renamed
into place only when complete, so a failed or interrupted merge never leaves a folder that looks like
a checkpoint: a failure removes the temporary folder, and one left by a killed process is hidden,
skipped by ``discover`` and refused by ``open_checkpoint``. Tensors are written to disk as they arrive
(``ShardWriter``), so the writer holds none of them.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence

import torch

from explorer.io.checkpoint import (
    INDEX_FILE,
    PARTIAL_MARK,
    SINGLE_FILE,
    Checkpoint,
    CheckpointError,
    open_checkpoint,
)
from explorer.io.config_compat import ConfigChoice
from explorer.io.formats.safetensors_io import ShardWriter
from explorer.io.keymap import ignored_tensors
from explorer.recipe import MergeRecipe

SHARD_BYTES = 2 * 1024**3
CHAT_TEMPLATE = "chat_template.jinja"  # transformers reads it before tokenizer_config.json's chat_template
MANIFEST = "merge_manifest.json"  # written last into every output folder: the files this tool wrote there


def check_output_dir(out_dir: str | Path, inputs: Iterable[Path], overwrite: bool = False) -> Path:
    """Resolve ``out_dir`` and refuse it (CheckpointError) if it would touch an input or hold data.

    Refused: an empty path; an input location itself, a folder inside one, a folder that contains
    one; an existing non-empty folder (or a file) unless ``overwrite``; and, even with ``overwrite``,
    anything this tool did not write: only a folder holding exactly the files its manifest
    (``merge_manifest.json``) lists may be replaced. Input locations are each input resolved and, for
    files an input folder reaches through symlinks (the Hugging Face cache: snapshots/ -> blobs/),
    the folders those files really live in.
    """
    if not str(out_dir).strip():
        raise CheckpointError("no output folder given; type the folder to write the merge to")
    out = Path(out_dir).expanduser().resolve()
    for src in inputs:
        for place in input_locations(Path(src)):
            if out == place or place in out.parents or out in place.parents:
                raise CheckpointError(
                    f"output folder {out} overlaps input {src} (at {place}); choose an output folder outside every input"
                )
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return out
    if not out.is_dir():
        raise CheckpointError(f"{out} is a file, not a folder; choose a new folder for the merge")
    if not is_merge_output(out):
        raise CheckpointError(
            f"{out} holds files this tool did not write, so it is never replaced, even with overwrite; choose a new or empty folder"
        )
    if not overwrite:
        raise CheckpointError(
            f"output folder {out} holds an earlier output of this tool; choose a new folder, or replace it "
            "(--overwrite on the command line, Replace in the app, overwrite=True in Python)"
        )
    return out


def is_merge_output(folder: Path) -> bool:
    """True when ``folder`` holds only what a merge of this tool wrote there (as its manifest lists)."""
    try:
        listed = set(json.loads((folder / MANIFEST).read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return all(p.is_file() and not p.is_symlink() and p.name in listed | {MANIFEST} for p in folder.iterdir())


def input_locations(src: Path) -> set[Path]:
    """``src`` resolved, plus the real folder of every symlinked file under it."""
    src = src.expanduser()
    places = {src.resolve()}
    if src.is_dir():
        places |= {link.resolve().parent for link in src.rglob("*") if link.is_symlink()}
    return places


def write_checkpoint(
    out: Path,
    tensors: Iterable[tuple[str, torch.Tensor]],
    source: Checkpoint | Path,
    recipe: Optional[MergeRecipe],
    overwrite: bool = False,
    shard_bytes: int = SHARD_BYTES,
    files: Optional[dict[str, str | Callable[[], str]]] = None,
    config_updates: Optional[dict] = None,
) -> Path:
    """Consume ``tensors`` into the new checkpoint folder ``out``; returns ``out``.

    ``source`` (the reference checkpoint, or its folder) gives the config (with the output dtype) and
    the tokenizer and generation config files. ``recipe`` adds ``merge_recipe.yaml`` and a model card
    (README.md); None for a checkpoint that is not a merge (e.g. a pruned model, ``explorer.prune``).
    ``files``: more text files to write, {file name: text, or a function returning it, called once every
    tensor is written}, written after (so replacing) those. ``config_updates``: config entries set in
    the output's config.json (e.g. ``num_hidden_layers`` of a layer-stacking merge).
    Shards hold at most ``shard_bytes`` bytes (one larger tensor gets a shard of its own). An OSError
    while writing (e.g. a full disk) becomes a CheckpointError; any failure leaves nothing at ``out``
    and removes the temporary folder.
    """
    source = source if isinstance(source, Checkpoint) else open_checkpoint(source)
    with staged_folder(out, overwrite) as tmp:
        dtype = _write_shards(tmp, tensors, shard_bytes)
        _write_config(tmp, {**source.config, **(config_updates or {})}, dtype)
        source.save_assets(tmp)
        if recipe is not None:
            (tmp / "merge_recipe.yaml").write_text(recipe.to_yaml())
            card = model_card(recipe, getattr(source, "config_choice", None)) + _files_section(tmp, source)
            (tmp / "README.md").write_text(card)
        for name, text in (files or {}).items():
            (tmp / name).write_text(text() if callable(text) else text)
    return out


@contextmanager
def staged_folder(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a new hidden temporary folder beside ``out``; on success rename it to ``out``.

    Before the rename its files are listed in the manifest.

    Any failure inside the block removes the temporary folder and leaves ``out`` as it was; an
    OSError (e.g. a full disk) becomes a CheckpointError that says nothing was written.
    """
    tmp = out.parent / f".{out.name}{PARTIAL_MARK}{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir(parents=True)
        yield tmp
        files = sorted(p.name for p in tmp.iterdir())
        (tmp / MANIFEST).write_text(json.dumps({"written_by": "merge-explorer", "files": files}, indent=2))
        _replace(tmp, out, overwrite)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        where = f" ({e.filename})" if e.filename else ""
        raise CheckpointError(
            f"writing {out} failed: {e.strerror or e}{where}; nothing was written. If the disk is full, free space or choose another output folder"
        ) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_shards(tmp: Path, tensors: Iterable[tuple[str, torch.Tensor]], shard_bytes: int) -> Optional[torch.dtype]:
    """Stream tensors into shard files as they arrive; rename to HF's model-0000i-of-0000n names at the end.

    Returns the dtype of the floating-point tensors (None if there are none).
    """
    shards: list[ShardWriter] = []
    dtype = None
    try:
        for name, tensor in tensors:
            if not shards or not shards[-1].fits(name, tensor, shard_bytes):
                if shards:
                    shards[-1].close()
                shards.append(ShardWriter(tmp / f"shard-{len(shards)}.safetensors"))
            shards[-1].add(name, tensor)
            dtype = tensor.dtype if tensor.is_floating_point() else dtype
        if not shards:
            shards.append(ShardWriter(tmp / "shard-0.safetensors"))
        shards[-1].close()
    except BaseException:
        for shard in shards:
            shard.abort()
        raise
    if len(shards) == 1:
        shards[0].path.rename(tmp / SINGLE_FILE)
        return dtype
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        target = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        shard.path.rename(tmp / target)
        weight_map.update({name: target for name in shard.entries})
        total += shard.size
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2))
    return dtype


def _files_section(tmp: Path, source: Checkpoint) -> str:
    """Model card lines: the files copied beside the weights, and the stored tensors left out (transformers ignores them)."""
    written = {SINGLE_FILE, INDEX_FILE, "config.json", "merge_recipe.yaml"}
    copied = sorted(p.name for p in tmp.iterdir() if p.name not in written and not p.name.endswith(".safetensors"))
    ignored = ignored_tensors(source)
    lines = []
    if copied:
        lines += [
            "## Files beside the weights",
            "",
            f"From {source.path} (tokenizer, processor, generation config):",
            "",
        ]
        lines += [f"- `{name}`" for name in copied] + [""]
    if ignored:
        lines += [
            "## Tensors left out",
            "",
            f"{source.path} stores tensors transformers ignores on load (not merged, not written):",
            "",
        ]
        lines += [f"- `{name}`" for name in ignored] + [""]
    return "\n".join(lines)


def _write_config(tmp: Path, config: dict, dtype: Optional[torch.dtype]) -> None:
    # The output is plain float tensors: a quantization_config (of an input read dequantized) never carries over.
    config = {k: v for k, v in config.items() if k != "quantization_config"}
    if dtype is not None:
        keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["dtype"]
        config.update({k: str(dtype).removeprefix("torch.") for k in keys})
    (tmp / "config.json").write_text(json.dumps(config, indent=2))


def _replace(tmp: Path, out: Path, overwrite: bool) -> None:
    """Move ``tmp`` to ``out``; an existing ``out`` (empty, or an earlier merge with overwrite) is removed after the swap."""
    if out.exists():
        if not out.is_dir() or (any(out.iterdir()) and not (overwrite and is_merge_output(out))):
            raise CheckpointError(
                f"output folder {out} was filled by something else during the merge; nothing was overwritten"
            )
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        out.rename(old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def chat_template_files(template: Optional[str], reference: Checkpoint, inputs: Sequence[Checkpoint]) -> dict[str, str]:
    """The ``chat_template.jinja`` a recipe's ``chat_template`` adds to the output: {file name: text}, {} for none.

    As mergekit 0.1.5's ``_set_chat_template``: ``auto`` takes the template most ``inputs`` carry
    (stripped; the first of equally common ones in input order; none when no input has one); any other
    value is the Jinja text itself. Raises CheckpointError when ``reference`` (whose tokenizer files
    the output gets) has no tokenizer to carry a template.
    """
    if not template:
        return {}
    if not reference.has_tokenizer():
        raise CheckpointError(
            f"chat_template: {reference.path} has no tokenizer files, so the output has no tokenizer to carry a chat "
            "template; remove chat_template or add the tokenizer files to that model"
        )
    if template == "auto":
        found = [t for t in map(_chat_template_of, inputs) if t]
        if not found:
            return {}
        template = Counter(found).most_common(1)[0][0]
    return {CHAT_TEMPLATE: template}


def _chat_template_of(checkpoint: Checkpoint) -> Optional[str]:
    """The (default) chat template of ``checkpoint``'s tokenizer, stripped; None when it has none."""
    tokenizer = checkpoint.tokenizer()
    template = tokenizer.chat_template if tokenizer is not None else None
    if isinstance(template, dict):
        template = template.get("default")
    return template.strip() if template else None


def model_card(recipe: MergeRecipe, config_choice: Optional[ConfigChoice] = None) -> str:
    """README.md for the merged model: mergekit-style front matter and the recipe that reproduces it.

    ``config_choice`` (set by ``open_inputs`` when the recipe has ``config_source``): a section saying
    whose config.json the output has and every config field the inputs differ in.
    """
    sources = ([recipe.base_model] if recipe.base_model else []) + [e.model for e in recipe.models]
    lines = ["---", "library_name: transformers", "tags:", "- merge", "- merge-explorer", "base_model:"]
    lines += [f"- {s}" for s in sources]
    lines += [
        "---",
        "",
        f"# Merged with Merge Explorer ({recipe.merge_method})",
        "",
        "Reproduce with `python -m explorer merge merge_recipe.yaml --out DIR`:",
        "",
        "```yaml",
        recipe.to_yaml().rstrip(),
        "```",
        "",
    ]
    if config_choice is not None:
        lines += [
            "## Config",
            "",
            f"config.json is {config_choice.path}'s (config_source: {config_choice.source}). "
            + ("The inputs' configs differ in:" if config_choice.differences else "The inputs' configs agree."),
            "",
        ]
        lines += [
            f"- `{d.field}`: {path} has {d.other!r}, the reference has {d.reference!r}"
            + ("" if d.changes_maths else " (does not change the computation)")
            for path, d in config_choice.differences
        ]
        lines += ["", ""]
    return "\n".join(lines)
