"""Facts read off a model class built on the meta device, kept on disk so each is worked out once.

Which names transformers loads a checkpoint's tensors under (``keymap``) and which tensors are its
embeddings (``formats.base.embedding_names``) come from building the model class on the meta device:
about 2 s for SmolLM2, most of it importing the class's modeling code, paid by every command and app
start that opens a checkpoint. Both are pure functions of the transformers version, the architecture,
the config and the stored tensor names, so ``remembered`` keeps each result as a small JSON file in
``MERGE_EXPLORER_FACTS_CACHE`` (default ~/.cache/merge_explorer/model_facts), keyed by a hash of
all of those. ``formats.base.Checkpoint.tie_word_embeddings`` (the config class's default when
config.json is silent) is kept the same way: with these three and configs equal to the base's
(``config_compat.config_differences``), a process that merges checkpoints it has seen before never
imports transformers (1.3 s of a fresh process; the version in the key is read from the installed
package's metadata). An unreadable file counts as missing; a folder that cannot be written only costs the rebuild.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Callable, TypeVar

log = logging.getLogger(__name__)
DEFAULT_FOLDER = Path("~/.cache/merge_explorer/model_facts")
J = TypeVar("J")  # a JSON value: dicts, lists, strings, numbers, None


def facts_folder() -> Path:
    """``MERGE_EXPLORER_FACTS_CACHE``, else ~/.cache/merge_explorer/model_facts."""
    return Path(os.environ.get("MERGE_EXPLORER_FACTS_CACHE") or DEFAULT_FOLDER).expanduser()


@lru_cache(maxsize=1)
def transformers_version() -> str:
    """The installed transformers' version, from its package metadata (importing it takes 1.5 s), else its own."""
    try:
        return version("transformers")
    except PackageNotFoundError:  # importable without metadata (a source checkout on the path)
        import transformers

        return transformers.__version__


def remembered(kind: str, key: object, compute: Callable[[], J]) -> J:
    """compute(), a JSON value, read from disk when already worked out for ``kind`` and ``key``.

    key: JSON-serializable, everything the result depends on besides the transformers version (added
    here). The file is written complete (a temporary file renamed), so readers never see half of it.
    """
    text = json.dumps([kind, transformers_version(), key], sort_keys=True, default=str)
    path = facts_folder() / f"{kind}-{hashlib.sha256(text.encode()).hexdigest()[:32]}.json"
    try:
        return json.loads(path.read_text())["value"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    value = compute()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{os.getpid()}")
        partial.write_text(json.dumps({"value": value}))
        os.replace(partial, path)
    except OSError as e:
        log.debug("model facts %s not written (%s)", path, e)
    return value
