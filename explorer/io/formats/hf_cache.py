"""The Hugging Face hub cache layout: ``models--ORG--NAME/snapshots/<commit>/`` with ``refs/main``.

Only reads what is already on disk (never downloads). The layout is read by huggingface_hub itself
(``scan_cache_dir`` for a repo's revisions and refs, ``repo_folder_name`` for a repo id's folder); the
cache folder is its ``HF_HUB_CACHE`` (``~/.cache/huggingface/hub`` unless HF_HOME or HF_HUB_CACHE say
otherwise).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

REPO_PREFIX = "models--"


def is_repo_dir(path: Path) -> bool:
    """True for a cached model repo folder (``models--ORG--NAME`` holding ``snapshots/``)."""
    return path.name.startswith(REPO_PREFIX) and (path / "snapshots").is_dir()


def snapshot_of(repo_dir: Path) -> Optional[Path]:
    """The snapshot ``refs/main`` points at; without refs/main the most recently modified revision.

    A repo downloaded at a commit (``revision=<sha>``) has no refs/main. Revisions, their refs and
    modification times come from ``huggingface_hub.scan_cache_dir`` over the repo's cache folder;
    the path returned is spelled under ``repo_dir`` as given. None when the repo has no snapshot.
    """
    from huggingface_hub import scan_cache_dir

    info = scan_cache_dir(repo_dir.parent)
    repo = next((r for r in info.repos if r.repo_path.resolve() == repo_dir.resolve()), None)
    revisions = sorted(repo.revisions, key=lambda r: r.last_modified) if repo else []
    chosen = next((r for r in revisions if "main" in r.refs), revisions[-1] if revisions else None)
    return repo_dir / "snapshots" / chosen.commit_hash if chosen else None


def hub_snapshot(repo_id: str, cache_dir: Optional[Path] = None) -> Optional[Path]:
    """Local snapshot folder of ``repo_id`` ("org/name") in the hub cache, or None when it is not cached."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    if repo_id.count("/") != 1 or repo_id.startswith(("/", ".", "~")):
        return None
    repo_dir = Path(cache_dir or constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model")
    return snapshot_of(repo_dir) if is_repo_dir(repo_dir) else None
