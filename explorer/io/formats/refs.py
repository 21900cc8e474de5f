"""How a recipe names an input: a path, a repo id in the Hugging Face cache, or ``BASE+ADAPTER``.

Only looks at names and the file system (no checkpoint is opened, no model library imported), so the
recipe schema can compare the names of its inputs without pulling in transformers, peft or gguf.
"""

from __future__ import annotations

from pathlib import Path

from explorer.io.formats.hf_cache import hub_snapshot

ADAPTER_CONFIG = "adapter_config.json"


def is_adapter_dir(path: Path) -> bool:
    """True for a PEFT adapter folder (one holding adapter_config.json)."""
    return (path / ADAPTER_CONFIG).is_file()


def split_adapter_ref(text: str) -> tuple[str, str] | None:
    """``(base, adapter)`` when ``text`` is ``BASE+ADAPTER``; None when it names no such pair.

    The split is at a '+' whose right side is an existing LoRA adapter folder (adapter_config.json in
    it), so folder names may hold '+' themselves (``base+/x/lora+v2``). When several '+' qualify, the
    ones whose left side is a model (an existing path, a repo id in the Hugging Face cache, or itself a
    BASE+ADAPTER) come first, and among equals the last '+' wins (the split mergekit's syntax implies).
    A ``text`` that is itself an existing path names that path, not a pair: None, as ``open_checkpoint``
    opens the path.
    """
    if Path(text).expanduser().exists():
        return None
    pairs = [(text[:i], text[i + 1 :]) for i, c in enumerate(text) if c == "+" and 0 < i < len(text) - 1]
    pairs = [(base, adapter) for base, adapter in pairs if is_adapter_dir(Path(adapter).expanduser())]
    return max(reversed(pairs), key=lambda pair: _names_a_model(pair[0]), default=None)


def resolved_ref(ref: str) -> str:
    """A recipe's name for an input with each path made absolute, ``BASE+ADAPTER`` part by part.

    So "x", "x/" and "./x" compare equal.
    """
    pair = split_adapter_ref(ref)
    if pair:
        return "+".join(resolved_ref(part) for part in pair)
    return str(Path(ref).expanduser().resolve())


def _names_a_model(text: str) -> bool:
    return Path(text).expanduser().exists() or hub_snapshot(text) is not None or split_adapter_ref(text) is not None
