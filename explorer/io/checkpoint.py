"""Local checkpoints of every common format: detect, open, discover, check compatibility.

``open_checkpoint(path)`` accepts a Hugging Face folder (single or sharded safetensors, or .bin
pickles), a .gguf file, a PEFT LoRA adapter folder (folded into its base; ``BASE+ADAPTER`` names the
base explicitly, as in mergekit), a cached hub repo folder ``models--ORG--NAME`` or its repo id
``ORG/NAME`` when it is in the Hugging Face cache. Each returns a ``Checkpoint`` that reads one tensor
at a time (see ``explorer.io.formats``). Every refusal is a ``CheckpointError`` whose message names the
model folder, the tensor where there is one, and what to do.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional

from explorer.io.config_compat import config_differences
from explorer.io.formats.base import (
    TIED_NAMES,
    Checkpoint,
    CheckpointError,
    check_tokenizer_files,
    is_float_dtype,
    read_json,
)
from explorer.io.formats.bin import BinCheckpoint, is_bin_dir
from explorer.io.formats.gguf_file import GgufCheckpoint, is_gguf
from explorer.io.formats.hf_cache import hub_snapshot, is_repo_dir, snapshot_of
from explorer.io.formats.lora import LoraCheckpoint, adapter_base
from explorer.io.formats.quantized import dequantized
from explorer.io.formats.refs import is_adapter_dir, resolved_ref, split_adapter_ref
from explorer.io.formats.safetensors_dir import (
    INDEX_FILE,
    SINGLE_FILE,
    SafetensorsCheckpoint,
    is_safetensors_dir,
)
from explorer.io.formats.trainer import is_run_dir, trainer_checkpoints
from explorer.io.keymap import with_loaded_names

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "INDEX_FILE",
    "SINGLE_FILE",
    "TIED_NAMES",
    "PARTIAL_MARK",
    "PARTIAL_SUFFIX",
    "is_unfinished",
    "open_checkpoint",
    "is_checkpoint",
    "discover",
    "check_config",
    "check_compatible",
    "trainer_checkpoints",
    "split_adapter_ref",
    "resolved_ref",
]

PARTIAL_MARK = ".partial-"  # in the name of a merge output folder still being written (see explorer.io.writer)
PARTIAL_SUFFIX = ".partial"  # the end of the folder an earlier zoo builder wrote a checkpoint into (NAME.partial)


def is_unfinished(path: Path) -> bool:
    """True for a folder a writer has not finished (or was killed while writing): never a checkpoint.

    The merge writer's ``.NAME.partial-XXXX`` (and ``.NAME.old-XXXX`` while replacing), any other
    hidden folder, and the zoo builder's ``NAME.partial``.
    """
    return path.name.startswith(".") or _is_partial(path)


def _is_partial(path: Path) -> bool:
    return PARTIAL_MARK in path.name or path.name.endswith(PARTIAL_SUFFIX)


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Open the checkpoint at ``path`` (any supported format); CheckpointError saying what is wrong and the fix.

    Besides the format's own checks, the small JSON tokenizer files (tokenizer_config.json, ...) must
    parse, so that a broken one is named here rather than failing later without a file name.
    """
    return _open_checked(path, ())


def _open_checked(path: str | Path, adapters: tuple[Path, ...]) -> Checkpoint:
    """``open_checkpoint`` inside a chain of ``adapters`` (resolved folders) whose bases are being opened.

    A quantized checkpoint reads as its dequantized float weights, or is refused (``formats.quantized``).
    """
    checkpoint = dequantized(_open(path, adapters))
    check_tokenizer_files(checkpoint.assets_dir)
    return with_loaded_names(checkpoint)  # the names transformers loads the tensors under (explorer.io.keymap)


def _open(text: str | Path, adapters: tuple[Path, ...]) -> Checkpoint:
    text = str(text)
    path = Path(text).expanduser()
    if not path.exists():
        if "+" in text:
            return _open_pair(text)
        snapshot = hub_snapshot(text)
        if snapshot is None:
            raise CheckpointError(
                f"{path}: folder not found; check the path (it must be a local checkpoint folder, .gguf file, or a repo in the Hugging Face cache)"
            )
        path = snapshot
    if path.is_file():
        if is_gguf(path):
            return GgufCheckpoint(path)
        raise CheckpointError(f"{path}: is a file; give the checkpoint folder that holds config.json (or a .gguf file)")
    if _is_partial(path):
        raise CheckpointError(
            f"{path}: an unfinished merge output or zoo checkpoint (its writer was interrupted); delete this folder and merge or build again"
        )
    if is_repo_dir(path):
        path = snapshot_of(path) or path
    if is_adapter_dir(path):
        return _fold(path, adapters)
    if not (path / "config.json").is_file():
        return _without_config(path)
    config = read_json(path / "config.json", "config.json")
    if is_safetensors_dir(path):
        return SafetensorsCheckpoint(path, config)
    if is_bin_dir(path):
        return BinCheckpoint(path, config)
    raise CheckpointError(
        f"{path}: no {SINGLE_FILE}, {INDEX_FILE} or pytorch_model.bin; save the model with save_pretrained(..., safe_serialization=True)"
    )


def _open_pair(text: str) -> Checkpoint:
    """``BASE+ADAPTER``: the adapter folded into the base (see ``split_adapter_ref``)."""
    pair = split_adapter_ref(text)
    if pair is None:
        raise CheckpointError(
            f"{text}: not found, and no '+' in it is followed by a LoRA adapter folder (one with adapter_config.json); "
            "check the path, or give BASE+ADAPTER with an existing adapter folder after the '+'"
        )
    base, adapter = pair
    return LoraCheckpoint(Path(adapter).expanduser(), open_checkpoint(base))


def _fold(adapter: Path, adapters: tuple[Path, ...]) -> LoraCheckpoint:
    """The adapter folded into the base its config names; CheckpointError when those bases loop back."""
    here = adapter.resolve()
    if here in adapters:
        loop = " -> ".join(str(a) for a in (*adapters, here))
        raise CheckpointError(
            f"{adapter}: the adapters' base models loop ({loop}); set base_model_name_or_path in adapter_config.json "
            "to the full model, or give it as BASE+ADAPTER"
        )
    return LoraCheckpoint(adapter, _open_checked(adapter_base(adapter), (*adapters, here)))


def _without_config(path: Path) -> Checkpoint:
    """A folder without config.json: one .gguf file in it, or an explanation of what it is."""
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return GgufCheckpoint(ggufs[0])
    if ggufs:
        raise CheckpointError(
            f"{path}: holds {len(ggufs)} .gguf files ({', '.join(g.name for g in ggufs)}); give one of them"
        )
    if is_run_dir(path):
        raise CheckpointError(
            f"{path}: a Trainer run folder; choose one of its checkpoint-STEP folders (trainer_checkpoints lists them)"
        )
    raise CheckpointError(f"{path}: no config.json; this is not a Hugging Face checkpoint folder")


def is_checkpoint(path: Path) -> bool:
    """True when ``path`` looks like something ``open_checkpoint`` opens (a cheap look at file names only)."""
    if is_unfinished(path):
        return False
    if is_gguf(path):
        return True
    if is_repo_dir(path):
        snapshot = snapshot_of(path)
        return snapshot is not None and is_checkpoint(snapshot)
    return path.is_dir() and (is_adapter_dir(path) or is_safetensors_dir(path) or is_bin_dir(path))


def discover(root: str | Path, max_depth: int = 3) -> list[Path]:
    """Checkpoints under ``root`` (itself included), sorted by path, searched ``max_depth`` folders deep.

    Finds checkpoint folders, .gguf files, LoRA adapter folders, the checkpoint-STEP folders of Trainer
    runs, and the current snapshot of each cached hub repo (``models--ORG--NAME``). Hidden folders and
    unfinished outputs (``is_unfinished``: an interrupted merge or zoo build) are skipped, with
    everything inside them; a hidden ``root`` itself is searched (``~/.models``), an unfinished one not.
    """
    root = Path(root).expanduser()
    found: list[Path] = []
    frontier = [root] if root.exists() and not _is_partial(root) else []
    for _ in range(max_depth + 1):
        hits = [p for p in frontier if is_checkpoint(p)]
        found += [snapshot_of(p) if is_repo_dir(p) else p for p in hits]
        frontier = [
            c
            for p in frontier
            if p.is_dir() and (p not in hits or is_run_dir(p))
            for c in sorted(p.iterdir())
            if (c.is_dir() or is_gguf(c)) and not is_unfinished(c)
        ]
    return sorted(found)


def check_compatible(base: Optional[Checkpoint], models: Iterable[Checkpoint], keep_config: bool = False) -> list[str]:
    """Raise CheckpointError on the first incompatibility between ``base`` and ``models``.

    Checks, in order: architecture, depth (num_hidden_layers), config fields that change the
    computation (``check_config``; allowed with ``keep_config``), tensor names (ignoring a tied
    lm_head), and every tensor's shape and kind of dtype (floating or not). Returns the tensor names to
    merge, in the reference model's order.
    """
    models = list(models)
    reference = base or models[0]
    names = [n for n in reference.names() if not (n in TIED_NAMES and reference.tied_embeddings)]
    for other in models:
        if other is reference:
            continue
        check_config(reference, other, keep_config)
        _check_names(reference, other, names)
        for name in names:
            _check_tensor(reference, other, name)
    return names


def _check_tensor(reference: Checkpoint, other: Checkpoint, name: str) -> None:
    """CheckpointError unless tensor ``name`` has the same shape in both, and is floating in both or in neither.

    Floating dtypes mix freely (float8, float16, bfloat16, float32 are all read as numbers); an integer
    or bool tensor facing a floating one is quantization codes or a mask, not weights to average.
    """
    if reference.shape(name) != other.shape(name):
        raise CheckpointError(
            f"{other.path}: tensor {name!r} has shape {list(other.shape(name))} but {reference.path} has "
            f"{list(reference.shape(name))}; only models fine-tuned from the same base can be merged"
        )
    if is_float_dtype(reference.dtype(name)) != is_float_dtype(other.dtype(name)):
        raise CheckpointError(
            f"{other.path}: tensor {name!r} is {other.dtype(name)} but {reference.path} has it as {reference.dtype(name)}; "
            "integer or bool tensors beside floating ones are quantized weights: dequantize the quantized checkpoint first "
            "(load it with transformers and save_pretrained in float16/bfloat16/float32)"
        )


def check_config(reference: Checkpoint, other: Checkpoint, keep_config: bool = False) -> None:
    """CheckpointError unless ``other`` has ``reference``'s architecture, depth and computation.

    Architecture and depth (num_hidden_layers) must agree; so must every config field that changes the
    computation (``explorer.io.config_compat``: rope, context length, norm eps, activation, ...) unless
    ``keep_config`` (the recipe's ``config_source`` says which model's config the output keeps).
    """
    if reference.architecture != other.architecture:
        raise CheckpointError(
            f"{other.path}: architecture {other.architecture} differs from {reference.path} ({reference.architecture}); "
            "choose models of the same architecture, fine-tuned from the same base"
        )
    depth_ref, depth = reference.config.get("num_hidden_layers"), other.config.get("num_hidden_layers")
    if depth_ref != depth:
        raise CheckpointError(
            f"{other.path}: {depth} layers but {reference.path} has {depth_ref}; models of different depth cannot be merged"
        )
    maths = [d for d in config_differences(reference.config, other.config) if d.changes_maths]
    if maths and not keep_config:
        more = f" (and {len(maths) - 1} more: {', '.join(d.field for d in maths[1:])})" if len(maths) > 1 else ""
        raise CheckpointError(
            f"{other.path}: config field {maths[0].describe(str(reference.path), str(other.path))}{more}; "
            "these fields change what the model computes, so the merge is refused: make the configs agree, or set "
            "config_source in the recipe (base, or one of the models) to say whose config.json the output keeps"
        )


def _check_names(reference: Checkpoint, other: Checkpoint, names: list[str]) -> None:
    """CheckpointError naming the differing tensors of both sides unless ``other`` has exactly ``names``.

    Names are compared as transformers loads them (``explorer.io.keymap``: prefix added or removed,
    the class's conversion mapping, ignored buffers left out), so what differs here differs for it too.
    """
    have = set(other.names())
    missing = [n for n in names if n not in have]
    extra = sorted(have - set(names) - set(TIED_NAMES))
    lacks = f"missing tensor {missing[0]!r} (and {len(missing) - 1} more) that {reference.path} has" if missing else ""
    has = f"tensor {extra[0]!r} (and {len(extra) - 1} more) is not in {reference.path}" if extra else ""
    if missing or extra:
        raise CheckpointError(
            f"{other.path}: {'; '.join(p for p in (lacks, has) if p)}; both must come from the same architecture and base"
        )
