"""examples/quickstart.ipynb runs top to bottom against the library (and is committed without outputs).

The notebook is executed by ``nbclient`` in a fresh ipykernel whose working directory is
``examples/`` (as when a user opens it there), over the session's demo zoo (``zoo_dir``: set
``MERGE_EXPLORER_ZOO`` to reuse a built one) and exporting into a temporary folder. Every step of
the notebook asserts on its result, so a broken library fails the cell, and a failing cell fails
this test. About 40 s on a 2-core machine once the zoo exists.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, CellTimeoutError

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "quickstart.ipynb"
CELL_TIMEOUT_S = 600  # generous: the whole notebook takes ~40 s over a built zoo, more on a loaded machine
STARTUP_TIMEOUT_S = 120


def test_committed_notebook_has_no_outputs() -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, "the notebook has no code cells"
    dirty = [
        i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count is not None)
    ]
    assert not dirty, f"cells {dirty} of {NOTEBOOK.name} keep outputs; clear them before committing"


def test_quickstart_notebook_runs(zoo_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The kernel inherits this process's environment: the notebook reads both variables.
    monkeypatch.setenv("MERGE_EXPLORER_ZOO", str(zoo_dir))
    monkeypatch.setenv("MERGE_EXPLORER_EXPORT", str(tmp_path / "exports"))
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    zoo_before = sorted(p.relative_to(zoo_dir) for p in zoo_dir.rglob("*"))

    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        nb,
        timeout=CELL_TIMEOUT_S,
        startup_timeout=STARTUP_TIMEOUT_S,
        kernel_name="python3",
        allow_errors=False,
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},  # cwd of the kernel: examples/
    )
    try:
        client.execute()
    except (CellExecutionError, CellTimeoutError) as e:
        pytest.fail(f"{NOTEBOOK.name} failed:\n{e}", pytrace=False)

    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code), "not every code cell ran"
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors, errors
    # step 3 displayed plotly figures, step 4 a DataFrame, step 5 wrote the export where it was told
    mimes = {
        m
        for c in code
        for o in c.outputs
        if o.output_type in ("display_data", "execute_result")
        for m in o.get("data", {})
    }
    assert "application/vnd.plotly.v1+json" in mimes or "text/html" in mimes, mimes
    assert (tmp_path / "exports" / "notebook-merge" / "merge_recipe.yaml").is_file()
    # the notebook did not write into the (shared) zoo
    assert sorted(p.relative_to(zoo_dir) for p in zoo_dir.rglob("*")) == zoo_before
