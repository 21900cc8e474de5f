"""The Hugging Face hub cache layout: ``models--ORG--NAME/snapshots/<commit>/`` with ``refs/main``.

Only reads what is already on disk (never downloads). The cache folder is huggingface_hub's
``HF_HUB_CACHE`` (``~/.cache/huggingface/hub`` unless HF_HOME or HF_HUB_CACHE say otherwise).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

REPO_PREFIX = "models--"


def is_repo_dir(path: Path) -> bool:
    """True for a cached model repo folder (``models--ORG--NAME`` holding ``snapshots/``)."""
    return path.name.startswith(REPO_PREFIX) and (path / "snapshots").is_dir()


def snapshot_of(repo_dir: Path) -> Optional[Path]:
    """The snapshot ``refs/main`` points at; without refs/main the most recently written snapshot."""
    ref = repo_dir / "refs" / "main"
    if ref.is_file() and (repo_dir / "snapshots" / ref.read_text().strip()).is_dir():
        return repo_dir / "snapshots" / ref.read_text().strip()
    snapshots = [p for p in (repo_dir / "snapshots").iterdir() if p.is_dir()]
    return max(snapshots, key=lambda p: p.stat().st_mtime, default=None)


def hub_snapshot(repo_id: str, cache_dir: Optional[Path] = None) -> Optional[Path]:
    """Local snapshot folder of ``repo_id`` ("org/name") in the hub cache, or None when it is not cached."""
    from huggingface_hub import constants

    if repo_id.count("/") != 1 or repo_id.startswith(("/", ".", "~")):
        return None
    repo_dir = Path(cache_dir or constants.HF_HUB_CACHE) / (REPO_PREFIX + repo_id.replace("/", "--"))
    return snapshot_of(repo_dir) if is_repo_dir(repo_dir) else None
