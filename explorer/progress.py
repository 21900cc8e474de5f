"""The progress callback every long-running step takes (merge, Fisher estimation, Inspect scan)."""

from __future__ import annotations

from typing import Callable

# progress(fraction done in [0, 1], short message); called from the worker, must return quickly.
Progress = Callable[[float, str], None]
