"""Import directions: every module imports, and no module imports against the layering.

    app -> evals -> explorer
    inside explorer:  executor -> methods, executor -> io (explorer/io/), inspect (explorer/inspect/) -> methods/io
                      methods never import io; io never imports methods; nothing imports app or evals

Each module's imports (also those inside functions) are read with ``ast`` and checked against
``RULES``; the groups are named by module path, so a new module joins its group by its name.
"""

from __future__ import annotations

import ast
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tiny import tiny_family

ROOT = Path(__file__).resolve().parents[1]

# group -> module-name prefixes (longest match wins; the rest of explorer is "explorer")
GROUPS = {
    "core": (
        "explorer.choices",
        "explorer.progress",
        "explorer.registry",
        "explorer.methods.selection",
        "explorer.recipe",
    ),
    "methods": ("explorer.methods",),
    "formats": ("explorer.io.formats",),  # the lowest io layer: one module per checkpoint format
    "io": ("explorer.io", "explorer.fisher"),
    "executor": ("explorer.executor",),
    "inspect": ("explorer.inspect",),
    "evals": ("evals",),
    "app": ("app", "ui_handlers"),
}
_IO = ("explorer.io", "explorer.fisher")
_ABOVE_IO = ("explorer.executor", "explorer.session", "explorer.workbench", "explorer.cli", "explorer.adapter_merge")
_NEVER_IN_EXPLORER = ("app", "ui_handlers", "evals", "gradio", "lm_eval", "tests")

# group -> module prefixes it must not import (on top of _NEVER_IN_EXPLORER for everything in explorer)
RULES = {
    "core": (*_IO, "explorer.inspect", *_ABOVE_IO, "explorer.zoo"),
    "methods": (
        *_IO,
        "explorer.inspect",
        "explorer.recipe",
        *_ABOVE_IO,
        "explorer.zoo",
        "transformers",
        "peft",
        "gguf",
        "safetensors",
    ),
    "formats": (
        "explorer.methods",
        "explorer.inspect",
        *_ABOVE_IO,
        "explorer.zoo",
        "explorer.recipe",
        "explorer.io.checkpoint",
        "explorer.io.inputs",
        "explorer.io.vocab",
        "explorer.io.writer",
        "explorer.io.finite",
        "explorer.fisher",
    ),
    "io": ("explorer.methods", "explorer.inspect", *_ABOVE_IO, "explorer.zoo"),
    "executor": (
        "explorer.inspect",
        "explorer.session",
        "explorer.workbench",
        "explorer.cli",
        "explorer.adapter_merge",
        "explorer.zoo",
    ),
    "inspect": (*_ABOVE_IO, "explorer.zoo"),
    "evals": ("app", "ui_handlers", "gradio"),
}
# (importer, imported): the deliberate exceptions, each with its reason.
ALLOWED = {
    # The registry loads the built-in methods on first use (a plugin loader: the methods import the
    # registry to register themselves, so it cannot import them at the top).
    ("explorer.registry", "explorer.methods"),
    # The recipe compares its inputs' names (the base listed among the models, as mergekit writes it);
    # formats.refs only looks at names and the file system, no model library (see the test below).
    ("explorer.recipe", "explorer.io.formats.refs"),
    ("explorer.recipe_keys", "explorer.io.formats.refs"),  # a slice's base_model compared with the top-level one
}


def _modules() -> list[tuple[str, Path]]:
    """(dotted name, file) of every module under explorer/ and evals/."""
    found = []
    for package in ("explorer", "evals"):
        for file in sorted((ROOT / package).rglob("*.py")):
            parts = file.relative_to(ROOT).with_suffix("").parts
            found.append((".".join(parts[:-1] if parts[-1] == "__init__" else parts), file))
    return found


def group_of(module: str) -> str | None:
    """The group of a dotted module name (longest prefix match), "explorer" for the rest of explorer."""
    best = None
    for group, prefixes in GROUPS.items():
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".") or module.startswith(prefix + "_")) and (
                best is None or len(prefix) > len(best[1])
            ):
                best = (group, prefix)
    if best:
        return best[0]
    return "explorer" if module == "explorer" or module.startswith("explorer.") else None


def imported_modules(source: str, module: str, is_package: bool = False) -> set[str]:
    """Every module ``source`` imports (top level and inside functions), as dotted names.

    ``from P import x`` counts as ``P.x`` (x may be a submodule) and as ``P``; relative imports are
    resolved against ``module``.
    """
    names = set()
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, *([base] if base else [])])
            names.add(base)
            names |= {f"{base}.{alias.name}" for alias in node.names if alias.name != "*"}
    return names


def _matches(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".") or name.startswith(prefix + "_")


def violations(module: str, imported: set[str]) -> list[str]:
    """The imports of ``module`` that break ``RULES`` (empty when it follows them)."""
    group = group_of(module)
    banned = RULES.get(group, ())
    if group not in ("evals", "app", None):
        banned = (*banned, *_NEVER_IN_EXPLORER)
    bad = []
    for name in sorted(imported):
        if (
            name == module
            or (module, name) in ALLOWED
            or any((module, name.rsplit(".", k)[0]) in ALLOWED for k in range(1, 4))
        ):
            continue
        if any(_matches(name, prefix) for prefix in banned):
            bad.append(f"{module} ({group}) imports {name}")
    return bad


MODULES = _modules()


@pytest.mark.parametrize("module, file", MODULES, ids=[m for m, _ in MODULES])
def test_imports_go_the_right_way(module, file):
    imported = imported_modules(file.read_text(), module, file.name == "__init__.py")
    assert violations(module, imported) == []


@pytest.mark.parametrize("module", [m for m, f in MODULES if not m.endswith("__main__")])
def test_every_module_imports(module):
    importlib.import_module(module)


def test_the_checker_catches_wrong_way_imports():
    """The rules bite: each line below is one import the layering forbids."""
    cases = {
        "explorer.methods.linear": "from explorer.io.checkpoint import open_checkpoint",
        "explorer.methods.sparsify": "from explorer.io import writer",
        "explorer.methods.task_arithmetic": "from ..executor import merge_tensor",
        "explorer.io.formats.lora": "from explorer.io.vocab import x\nfrom explorer.methods.linear import linear",
        "explorer.io.checkpoint": "def f():\n    import explorer.executor",
        "explorer.inspect.scan": "from explorer.executor import Progress",
        "explorer.inspect.plots": "import gradio as gr",
        "explorer.session": "from evals import compare",
        "explorer.registry": "from explorer.io.checkpoint import Checkpoint",
        "evals.lm_eval_runner": "import app",
    }
    for module, source in cases.items():
        found = violations(module, imported_modules(source, module))
        assert found and all(module in v for v in found), (module, source)
    assert (
        violations(
            "explorer.executor",
            imported_modules("from explorer.methods import linear\nfrom explorer import fisher", "explorer.executor"),
        )
        == []
    )
    assert violations("explorer.registry", {"explorer.methods"}) == []  # an allowed exception
    assert violations("explorer.recipe", {"explorer.io.formats.lora"})  # only formats.refs is allowed there


def test_light_modules_do_not_load_model_libraries():
    """The recipe schema, the registry and the methods load without transformers, peft, gguf or gradio."""
    code = (
        "import sys, explorer.recipe, explorer.registry, explorer.methods, explorer.choices;"
        "explorer.registry.all_methods();"
        "print(sorted(m for m in ('transformers', 'peft', 'gguf', 'gradio', 'lm_eval') if m in sys.modules))"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert run.stdout.strip() == "[]"


def test_app_answers_help_and_bad_options_before_loading_gradio():
    """``python app.py --help`` prints its usage at once; a mistyped option is refused just as fast."""
    trace = "import sys, runpy; sys.argv = ['app.py', {}]; runpy.run_path('app.py', run_name='__main__')"
    run = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", trace.format("'--help'")], capture_output=True, text=True, cwd=ROOT
    )
    assert run.returncode == 0 and "--models MODELS" in run.stdout and "--no-demo" in run.stdout
    assert "gradio" not in run.stderr and "torch" not in run.stderr  # -X importtime lists every module loaded
    bad = subprocess.run([sys.executable, "app.py", "--modles", "x"], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and "unrecognized arguments: --modles" in bad.stderr


def test_importing_the_app_writes_nothing_beside_it(tmp_path):
    """Building the app leaves the repository as it was (a gradio component subclass would write app.pyi)."""
    before = sorted(p.name for p in ROOT.iterdir())
    code = f"import app; app.build_demo({str(tmp_path)!r})"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True)
    assert sorted(p.name for p in ROOT.iterdir()) == before


def test_a_cli_merge_of_checkpoints_seen_before_imports_no_transformers(tmp_path):
    """A CLI merge of checkpoints seen before, configs as their base's, runs without importing transformers.

    Their model facts are remembered (``io.model_facts``), and importing transformers costs a fresh
    process about 1.5 s. The first run works the facts out with it; the second writes the same bytes without.
    """
    base, experts = tiny_family(tmp_path / "models")
    recipe = tmp_path / "ties.yaml"
    models = "".join(f"  - model: {e}\n    parameters: {{weight: 0.5, density: 0.5}}\n" for e in experts)
    recipe.write_text(f"merge_method: ties\nbase_model: {base}\nmodels:\n{models}dtype: float32\n")
    env = {**os.environ, "MERGE_EXPLORER_FACTS_CACHE": str(tmp_path / "facts")}
    code = (
        "import sys; from explorer.cli import main; code = main(sys.argv[1:]);"
        "print('transformers' in sys.modules); sys.exit(code)"
    )
    imported, written = [], []
    for out in ("first", "second"):
        argv = ["merge", str(recipe), "--out", str(tmp_path / out)]
        run = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, cwd=ROOT, env=env)
        assert run.returncode == 0, run.stderr[-2000:]
        imported.append(run.stdout.split()[-1])
        written.append((tmp_path / out / "model.safetensors").read_bytes())
    assert imported == ["True", "False"]
    assert written[0] == written[1]
