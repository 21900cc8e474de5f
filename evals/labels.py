"""Labels for models named by path: the shortest trailing part of each path that tells them apart."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def distinct_labels(paths: Sequence[str | Path]) -> list[str]:
    """One label per path: its last ``k`` parts, with the smallest ``k`` that makes every label unique.

    ``runs/a/checkpoint-100`` and ``runs/b/checkpoint-100`` become ``a/checkpoint-100`` and
    ``b/checkpoint-100``; distinct names keep their folder name alone.

    Raises:
        ValueError: two paths are the same file or folder (naming both), so no label can tell them apart.
    """
    resolved = [Path(p).expanduser().resolve() for p in paths]
    seen: dict[Path, str] = {}
    for given, path in zip(paths, resolved, strict=True):
        if path in seen:
            raise ValueError(f"{given} and {seen[path]} are the same model ({path}); give each model once")
        seen[path] = str(given)
    depth = max((len(p.parts) for p in resolved), default=1)
    for k in range(1, depth + 1):
        labels = ["/".join(p.parts[-k:]) for p in resolved]
        if len(set(labels)) == len(labels):
            return labels
    return [str(p) for p in resolved]
