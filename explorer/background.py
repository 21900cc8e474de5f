"""One long job (the demo models' build) in a background thread, with its progress readable at any time.

The app starts it at start-up and serves at once; the Models tab polls ``status()`` and rescans the
folder as checkpoints appear. Plain Python: no gradio here.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from explorer.progress import Progress

log = logging.getLogger(__name__)


class BackgroundJob:
    """Run ``work(progress)`` once in a daemon thread; ``status()`` says how far it got or why it failed."""

    def __init__(self, name: str, work: Callable[[Progress], Path]):
        self.name = name
        self.fraction, self.message, self.error = 0.0, "waiting to start", ""
        self.done = False
        self.started = time.monotonic()
        self._work = work
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> BackgroundJob:
        """Start the thread; returns self."""
        self.started = time.monotonic()
        self._thread.start()
        return self

    def _report(self, fraction: float, message: str) -> None:
        self.fraction, self.message = fraction, message

    def _run(self) -> None:
        try:
            self._work(self._report)
        except Exception as e:  # noqa: BLE001  (reported in the UI, not raised in a thread nobody joins)
            log.exception("%s failed", self.name)
            self.error = f"{type(e).__name__}: {e}"
        self.done = True

    def status(self) -> str:
        """One line: what is being built and how far, the time taken, or the error."""
        elapsed = time.monotonic() - self.started
        if self.error:
            return f"{self.name} failed after {elapsed:.0f} s: {self.error}"
        if self.done:
            return f"{self.name}: ready ({self.message})."
        return f"{self.name}: {self.fraction:.0%}, {self.message} ({elapsed:.0f} s so far; checkpoints appear below as they are finished)."

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the job ends (or ``timeout`` seconds); True when it has ended."""
        self._thread.join(timeout)
        return self.done
