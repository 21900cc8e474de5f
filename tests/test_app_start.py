"""``python app.py`` on an empty models folder serves within a minute while the demo experts build.

The Models tab reports the build; an interrupted build never looks finished.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from explorer.background import BackgroundJob

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_app_serves_within_a_minute_while_the_demo_builds(tmp_path):
    port = _free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
    start = time.monotonic()
    server = subprocess.Popen(
        [sys.executable, "app.py", "--models", str(tmp_path), "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        served = None
        while served is None and time.monotonic() - start < 60:
            try:
                served = urllib.request.urlopen(f"http://127.0.0.1:{port}/config", timeout=5).read()
            except OSError:
                time.sleep(1)
        assert served is not None, f"not serving after 60 s: {server.stdout and server.poll()}"
        seconds = time.monotonic() - start
        config = json.loads(served)
        texts = [str(c.get("props", {}).get("value", "")) for c in config["components"]]
        assert any("SmolLM2 demo experts" in t for t in texts), "the Models tab does not show the demo build"
        print(f"served after {seconds:.1f} s")
    finally:
        server.terminate()
        server.wait(30)
    assert not [
        p for p in tmp_path.rglob("*") if p.name == "smollm2_experts.json"
    ]  # an interrupted build never looks finished


def test_background_job_reports_progress_and_errors():
    def work(progress):
        progress(0.5, "half way")
        return Path(".")

    def broken(progress):
        progress(0.1, "starting")
        raise OSError("disk full")

    job = BackgroundJob("demo", work).start()
    assert job.wait(10) and job.status() == "demo: ready (half way)."
    failed = BackgroundJob("demo", broken).start()
    assert (
        failed.wait(10)
        and failed.status().startswith("demo failed after")
        and failed.status().endswith("OSError: disk full")
    )
