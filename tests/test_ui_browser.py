"""The app in a real browser (Debian chromium via Playwright), used as a person uses it.

Move each kind of control and read the recipe it makes, merge, inspect, compare merges, evaluate with
lm-eval, import a recipe, cancel, export; and each case that was once broken (disabled controls, an
export that deleted files, silent folder creation, raw error dumps, stale state after a second Load).
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path

import pytest
import torch
import yaml
from playwright.sync_api import expect, sync_playwright
from transformers import AutoModelForCausalLM, AutoTokenizer

import app
import ui_handlers as ui
from explorer import registry
from tests.tiny import save_tiny_gpt2

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT = 180_000  # ms; lm-eval on CPU dominates
expect.set_options(timeout=TIMEOUT)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(zoo_dir, tmp_path_factory):
    models = tmp_path_factory.mktemp("models")
    (models / "zoo").symlink_to(zoo_dir, target_is_directory=True)
    save_tiny_gpt2(models / "other" / "gpt2-tiny")
    (models / "notes").mkdir()
    (models / "notes" / "thesis.tex").write_text("years of work")
    port = _free_port()
    demo = app.build_demo(models)
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}", models
    demo.close()


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        yield browser
        browser.close()


@pytest.fixture()
def page(browser, served):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(TIMEOUT)
    page.goto(served[0])
    expect(page.locator("#models-status")).to_contain_text("Found", timeout=60_000)
    yield page
    page.close()


@pytest.fixture()
def shots(tmp_path) -> Path:
    return Path(os.environ.get("MERGE_EXPLORER_SCREENSHOTS", tmp_path))


# Acting as a person ----------------------------------------------------------------------------------


def _tab(page, name: str) -> None:
    page.get_by_role("tab", name=name).click()


def _load(page, experts: tuple[str, ...] = ("zoo/expert-add", "zoo/expert-reverse")) -> None:
    """Load ``experts`` and wait until the Merge tab's controls are redrawn for them.

    A control moved before the redraw is gone with its listener (gradio answers its event with an error).
    """
    _tab(page, "Merge")
    drawn = _drawn_for_load(page)
    _tab(page, "Models")
    for label in page.locator("#experts label").all():
        box = label.locator("input")
        if box.is_checked() != (label.inner_text().strip() in experts):
            label.click()
    page.locator("#load").click()
    expect(page.locator("#models-status")).to_contain_text("all compatible")
    _tab(page, "Merge")
    expect(page.locator("#method-info")).to_have_class(re.compile(rf"\bdrawn-for-load-{drawn + 1}\b"))


def _drawn_for_load(page) -> int:
    """The number of the load the Merge controls on show were drawn for (0: none yet)."""
    classes = page.locator("#method-info").get_attribute("class")
    return int(re.search(r"drawn-for-load-(\d+)", classes).group(1))


def _set_number(page, elem_id: str, value: float) -> None:
    box = page.locator(f"#{elem_id} input[type=number]")
    expect(box).to_be_enabled()
    box.fill(str(value))
    box.press("Enter")
    box.blur()


def _choose(page, elem_id: str, option: str) -> None:
    """Pick ``option`` in a dropdown; a method waits until the Merge controls are redrawn for it."""
    box = page.locator(f"#{elem_id} input").first
    expect(box).to_be_enabled()
    box.click()
    page.get_by_role("option", name=option, exact=True).click()
    if elem_id == "method":
        drawn = re.compile(rf"^\s*{re.escape(registry.get(option).pretty_name)} —")
        expect(page.locator("#method-info")).to_have_text(drawn)


def _recipe(page, elem_id: str = "merge-recipe") -> dict:
    text = page.locator(f"#{elem_id} .cm-content").inner_text()
    return yaml.safe_load(text)


def _wait_recipe(page, check, elem_id: str = "merge-recipe") -> dict:
    """Poll the recipe view until ``check(recipe)`` holds (the preview updates after each change)."""
    for _ in range(100):
        try:
            recipe = _recipe(page, elem_id)
            if isinstance(recipe, dict) and check(recipe):
                return recipe
        except yaml.YAMLError:
            pass
        page.wait_for_timeout(200)
    raise AssertionError(f"recipe never satisfied the check: {page.locator(f'#{elem_id}').inner_text()}")


def _per_model(recipe: dict, expert: str) -> dict:
    return next(m["parameters"] for m in recipe["models"] if m["model"].endswith(expert))


def _figure_data(page, key: str) -> str:
    return page.locator(f"#plot-{key} .js-plotly-plot").evaluate("e => JSON.stringify(e.data.map(t => [t.name, t.y]))")


def _scores(page, columns: list[str]) -> dict[str, list[float]]:
    """{model: its values} read off the Evaluate table, whose cells show ``value ± stderr``."""
    cells = [c.strip() for c in page.locator("#eval-table").inner_text().splitlines() if c.strip()][1:]  # the label
    width = len(columns) + 1
    assert cells[:width] == ["model", *columns], cells
    rows = [cells[i : i + width] for i in range(width, len(cells), width)]
    assert all(" ± " in value for row in rows for value in row[1:]), rows
    return {row[0]: [float(value.split(" ± ")[0]) for value in row[1:]] for row in rows}


# The tests -------------------------------------------------------------------------------------------


def test_every_control_changes_the_recipe_and_the_merge(page, shots):
    _load(page)
    _tab(page, "Merge")
    numbers = page.locator("input[data-testid=number-input]")
    expect(numbers).to_have_count(5)  # ties, two experts: lambda + weight and density per expert
    assert all(numbers.nth(i).is_enabled() for i in range(5))
    _wait_recipe(page, lambda r: r["merge_method"] == "ties" and len(r["models"]) == 2)

    _set_number(page, "ctl-density-zoo-expert-add", 0.3)  # a per-model slider
    _wait_recipe(
        page,
        lambda r: _per_model(r, "expert-add")["density"] == 0.3 and _per_model(r, "expert-reverse")["density"] == 1.0,
    )
    _set_number(page, "ctl-lambda", 1.5)  # a global slider
    _wait_recipe(page, lambda r: r["parameters"]["lambda"] == 1.5)
    page.locator("#ctl-normalize input[type=checkbox]").click()  # a checkbox
    _wait_recipe(page, lambda r: r["parameters"]["normalize"] is False)
    _choose(page, "ctl-election", "unweighted")  # a dropdown
    _wait_recipe(page, lambda r: r["parameters"]["election"] == "unweighted")
    _choose(page, "dtype", "bfloat16")
    _wait_recipe(page, lambda r: r["dtype"] == "bfloat16")
    _set_number(page, "seed", 7)
    _wait_recipe(page, lambda r: r["seed"] == 7)

    page.locator("#merge-btn").click()
    expect(page.locator("#merge-status")).to_contain_text("Merged 2 model(s) with ties")
    expect(page.locator("#history")).to_contain_text("#1 ties")
    _tab(page, "Inspect")
    expect(page.locator("#plot-merge_distance .js-plotly-plot")).to_be_visible()
    first = _figure_data(page, "merge_distance")
    page.screenshot(path=str(shots / "inspect.png"), full_page=True)

    _tab(page, "Merge")  # a method change keeps what still applies: weights yes, density gone
    _set_number(page, "ctl-weight-zoo-expert-reverse", 0.5)
    _wait_recipe(page, lambda r: _per_model(r, "expert-reverse")["weight"] == 0.5)
    _choose(page, "method", "task_arithmetic")
    recipe = _wait_recipe(page, lambda r: r["merge_method"] == "task_arithmetic")
    assert _per_model(recipe, "expert-reverse") == {"weight": 0.5} and recipe["parameters"]["lambda"] == 1.5
    expect(page.locator("#ctl-density-zoo-expert-add")).to_have_count(0)
    expect(page.locator("#ctl-weight-zoo-expert-reverse input[type=number]")).to_have_value("0.5")
    page.locator("#live input").check()  # live: releasing a slider re-merges
    slider = page.locator("#ctl-lambda input[type=range]")
    slider.fill("0.5")
    slider.dispatch_event("pointerup")
    expect(page.locator("#history")).to_contain_text("#2 task_arithmetic", timeout=60_000)
    page.locator("#live input").uncheck()
    page.screenshot(path=str(shots / "merge.png"), full_page=True)
    _tab(page, "Inspect")
    expect(page.locator("#inspect-status")).to_contain_text("#2 task_arithmetic")
    assert _figure_data(page, "merge_distance") != first


def test_evaluate_compare_import_cancel_and_export(page, served, shots):
    url, models = served
    _load(page)
    _tab(page, "Merge")
    page.locator("#merge-btn").click()
    expect(page.locator("#merge-status")).to_contain_text("#1 ties")
    _set_number(page, "ctl-density-zoo-expert-add", 0.5)
    _set_number(page, "ctl-density-zoo-expert-reverse", 0.5)
    _wait_recipe(page, lambda r: _per_model(r, "expert-reverse")["density"] == 0.5)
    page.locator("#merge-btn").click()
    expect(page.locator("#merge-status")).to_contain_text("#2 ties")

    _tab(page, "Inspect")  # two merges side by side
    _choose(page, "inspect-other", "#1 ties")
    expect(page.locator("#caption-compare")).to_contain_text("#2 ties (density=0.5,0.5) against #1 ties")
    legend = page.locator("#plot-compare .js-plotly-plot").evaluate("e => e.data.map(t => t.name)")
    assert [name.split(" (")[0] for name in legend] == ["#2 vs base", "#1 vs base", "#2 vs #1"], legend

    _tab(page, "Evaluate")  # compare the two merges side by side
    boxes = page.locator("#tasks input[type=checkbox]")
    expect(boxes.first).to_be_visible()
    for empty in ("eval-table", "eval-normalized"):  # named columns before any score, not gradio's 1 2 3
        header = page.locator(f"#{empty} thead").inner_text().split()
        assert header == ["model"], (empty, header)
    page.locator("#tasks label", has_text="zoo_add").click()
    page.locator("#tasks label", has_text="zoo_reverse").click()
    page.locator("#eval-merges label", has_text="#1 ties").click()
    page.locator("#limit input").fill("20")
    page.locator("#eval-btn").click()
    expect(page.locator("#eval-status")).to_contain_text("Done: 12/12 scored", timeout=TIMEOUT)
    page.screenshot(path=str(shots / "evaluate.png"), full_page=True)
    rows = _scores(page, ["zoo_add acc", "zoo_reverse acc"])
    assert [r.split(" (")[0] for r in rows] == [
        "zoo/base",
        "zoo/expert-add",
        "zoo/expert-reverse",
        "#1 ties",
        "#2 ties",
        "ensemble",
    ], rows
    assert rows["zoo/expert-add"][0] > 0.5 and rows["zoo/expert-reverse"][1] > 0.5, rows
    normalized = page.locator("#eval-normalized").inner_text()
    assert "vs best expert" in normalized and "gain kept" in normalized and "ensemble (experts)" in normalized
    bars = page.locator("#eval-chart .js-plotly-plot").evaluate("e => e.data.filter(t => t.error_y).length")
    assert bars == 12  # one bar with its stderr per (model, task)

    page.locator("#limit input").fill("0")  # cancel a long evaluation: the app answers at once and stays usable
    page.locator("#eval-btn").click()
    page.wait_for_timeout(500)
    page.locator("#eval-cancel").click()
    expect(page.locator("#eval-status")).to_contain_text("Cancelled: scoring stopped", timeout=10_000)
    _tab(page, "Merge")
    page.locator("#merge-btn").click()
    expect(page.locator("#merge-status")).to_contain_text("#3 ties")

    _tab(page, "Export")  # export, then import the exported recipe with another density
    folder = page.locator("#export-folder textarea, #export-folder input").first
    folder.fill("merges/first")
    expect(page.locator("#export-target")).to_contain_text("Will write a new folder")
    page.locator("#save").click()
    expect(page.locator("#export-status")).to_contain_text("Saved")
    out = models / "merges" / "first"
    model = AutoModelForCausalLM.from_pretrained(out)
    ids = AutoTokenizer.from_pretrained(out)("add 12+34=", return_tensors="pt").input_ids
    assert model.generate(ids, max_new_tokens=3, min_new_tokens=3, do_sample=False).shape[1] == ids.shape[1] + 3
    assert torch.isfinite(model.lm_head.weight).all()
    recipe = yaml.safe_load((out / "merge_recipe.yaml").read_text())
    recipe["models"][0]["parameters"]["density"] = 0.2
    _tab(page, "Merge")
    page.get_by_text("Import a recipe").click()
    page.locator("#recipe-in .cm-content").fill(yaml.safe_dump(recipe))
    page.locator("#import-btn").click()
    expect(page.locator("#merge-status")).to_contain_text("#4 ties")
    expect(page.locator("#ctl-density-zoo-expert-add input[type=number]")).to_have_value("0.2")
    recipe["models"][0]["parameters"]["density"] = [0.2, 0.8]  # a gradient: merged as written, drawn per layer
    page.locator("#recipe-in .cm-content").fill(yaml.safe_dump(recipe))
    page.locator("#import-btn").click()
    expect(page.locator("#merge-status")).to_contain_text("Merged as written")
    expect(page.locator("#recipe-curves")).to_be_visible()
    expect(page.locator("#recipe-curves .scatterlayer .trace")).not_to_have_count(0)  # a curve is drawn
    page.locator("#recipe-curves").screenshot(path=str(shots / "recipe_curves.png"))
    _tab(page, "Export")
    expect(page.locator("#export-target")).to_contain_text("holds an earlier merge: tick Replace")
    (out / "my-notes.txt").write_text("mine")  # a file added outside the app: the preview says so on return
    _tab(page, "Merge")
    _tab(page, "Export")
    expect(page.locator("#export-target")).to_contain_text("holds other files: it will not be replaced")
    page.screenshot(path=str(shots / "export.png"), full_page=True)


def test_once_broken_cases(page, served, tmp_path, shots):
    url, models = served
    _tab(page, "Merge")  # a method chosen before Load: a sentence, no crash
    _choose(page, "method", "slerp")
    _tab(page, "Models")
    page.screenshot(path=str(shots / "models.png"), full_page=True)
    expect(page.locator("#catalog")).to_contain_text("LlamaForCausalLM")
    _choose(page, "base", "")
    _load(page)
    _tab(page, "Merge")  # slerp with two experts and no base: one readable sentence
    expect(page.locator("#merge-recipe")).to_contain_text("These settings make no recipe")
    page.locator("#merge-btn").click()
    expect(page.locator("#merge-status")).to_contain_text("Error:")
    assert "validation error" not in page.locator("#merge-status").inner_text().lower()
    _choose(page, "method", "task_arithmetic")
    page.locator("#merge-btn").click()
    expect(page.locator("#merge-status")).to_contain_text(
        "needs base_model: set base_model to the checkpoint the experts were fine-tuned from"
    )
    assert "pydantic" not in page.locator("#merge-status").inner_text().lower()

    _tab(page, "Models")  # the base is never offered among the experts
    _choose(page, "base", "zoo/base")
    expect(page.locator("#experts label", has_text="zoo/base")).to_have_count(0)
    _load(page)
    _tab(page, "Merge")
    _choose(page, "method", "dare_ties")  # its normalize is off; linear's and ties' are on
    page.locator("#merge-btn").click()
    expect(page.locator("#merge-status")).to_contain_text("Merged")
    for method in ("linear", "ties"):  # a method chosen after that merge starts from its own default
        _choose(page, "method", method)
        recipe = _wait_recipe(page, lambda r, m=method: r["merge_method"] == m)
        assert recipe["parameters"]["normalize"] is True, recipe
    page.locator("#merge-btn").click()
    expect(page.locator("#merge-status")).to_contain_text("#2 ties")
    _tab(page, "Inspect")
    expect(page.locator("#inspect-status")).to_contain_text("zoo/expert-reverse")
    threshold = page.locator("#threshold textarea, #threshold input").first
    threshold.fill("abc")
    threshold.press("Enter")
    expect(page.locator("#inspect-status")).to_contain_text("is not a number between 0 and 1")
    expect(page.locator("#plot-histogram")).to_be_hidden()
    expect(page.locator("#caption-histogram")).to_be_hidden()
    expect(page.get_by_text("Error", exact=True)).to_have_count(0)  # no red badges without text
    _tab(page, "Evaluate")
    page.locator("#tasks label", has_text="zoo_add").click()
    page.locator("#limit input").fill("-3")
    page.locator("#eval-btn").click()
    expect(page.locator("#eval-status")).to_contain_text("must be 0 (all) or a positive number")

    _tab(page, "Export")  # export never deletes or creates what it should not
    folder = page.locator("#export-folder textarea, #export-folder input").first
    page.locator("#overwrite input").check()
    for text, error in (
        ("", "no output folder given"),
        (".", "is the models folder"),
        ("notes", "holds files this tool did not write"),
        ("zoo/expert-add", "overlaps input"),
        (str(tmp_path / "nonexistent" / "deep" / "dir"), "is outside the models folder"),
        ("../escape", "is outside the models folder"),  # the app writes only inside its models folder
        (str(tmp_path), "is outside the models folder"),
    ):
        folder.fill(text)
        page.locator("#save").click()
        expect(page.locator("#export-status")).to_contain_text(error)
    assert (models / "notes" / "thesis.tex").read_text() == "years of work"
    assert not (tmp_path / "nonexistent").exists() and not (models.parent / "escape").exists()
    assert not list(tmp_path.rglob("merge_recipe.yaml"))

    _tab(page, "Models")  # a second Load clears what belonged to the first
    _load(page, ("zoo/expert-add", "zoo/expert-upper"))
    _tab(page, "Merge")
    expect(page.locator("#merge-status")).not_to_contain_text("Merged")
    expect(page.locator("#history")).not_to_contain_text("ties")
    _tab(page, "Inspect")
    expect(page.locator("#inspect-status")).not_to_contain_text("expert-reverse")
    threshold.fill("0.002")
    threshold.press("Enter")
    expect(page.locator("#inspect-status")).to_contain_text(
        "Task vectors of zoo/expert-add, zoo/expert-upper (no merge chosen)"
    )
    expect(page.locator("#plot-histogram .js-plotly-plot")).to_be_visible()
    expect(page.locator("#caption-histogram")).to_contain_text("Delta histogram")  # captions come back too
    _tab(page, "Models")
    page.locator("#experts label", has_text="other/gpt2-tiny").click()  # two architectures: refused on Load
    page.locator("#load").click()
    expect(page.locator("#models-status")).to_contain_text("architecture GPT2LMHeadModel differs")
    report = page.locator("#compat").inner_text()  # the compatibility report says which input and why
    assert "incompatible" in report and "other/gpt2-tiny" in report and "GPT2LMHeadModel" in report, report


def test_two_browser_tabs_keep_their_own_state(page, browser, served):
    other = browser.new_page(viewport={"width": 1400, "height": 1000})
    other.set_default_timeout(TIMEOUT)
    other.goto(served[0])
    expect(other.locator("#models-status")).to_contain_text("Found", timeout=60_000)
    _load(page)
    _load(other, ("zoo/expert-add", "zoo/expert-upper"))
    _tab(page, "Merge")
    page.locator("#merge-btn").click()
    expect(page.locator("#merge-status")).to_contain_text("#1 ties")
    _tab(other, "Merge")
    mine, theirs = _wait_recipe(page, lambda r: True), _wait_recipe(other, lambda r: True)
    assert [m["model"].rsplit("/", 1)[1] for m in mine["models"]] == ["expert-add", "expert-reverse"]
    assert [m["model"].rsplit("/", 1)[1] for m in theirs["models"]] == ["expert-add", "expert-upper"]
    expect(other.locator("#history")).not_to_contain_text("ties")
    theirs = next(b for b in ui.OPEN.values() if b.session and b.session.model_paths[-1].name == "expert-upper")
    other.close()  # a closed tab's models are freed now, not when gradio drops its state an hour later
    for _ in range(150):
        if theirs not in ui.OPEN.values():
            break
        page.wait_for_timeout(100)
    assert theirs not in ui.OPEN.values() and theirs.session is None and not theirs.history
    assert any(b.merged is not None for b in ui.OPEN.values())  # the open tab keeps its own


def test_sweep_search_best_recipe_soup_and_playground(page, served, shots):
    _load(page)
    _tab(page, "Merge")
    _choose(page, "method", "linear")
    page.locator("#merge-btn").click()
    expect(page.locator("#merge-status")).to_contain_text("linear")

    _tab(page, "Sweep")  # a 3-point grid of the weight between the two experts, held-in and held-out
    _choose(page, "sweep-param1", "mix")
    values = page.locator("#sweep-values1 textarea, #sweep-values1 input").first
    expect(values).to_have_value("0.25, 0.5, 0.75")  # the values follow the parameter chosen
    values.fill("0.5, 0.8, 1.0")
    page.locator("#sweep-btn").click()
    expect(page.locator("#sweep-status")).to_contain_text("3 finished trial(s)", timeout=TIMEOUT)
    page.screenshot(path=str(shots / "sweep.png"), full_page=True)
    traces = page.locator("#sweep-plot .js-plotly-plot").evaluate("e => e._fullData.map(t => [t.name, t._length])")
    assert sorted(traces) == [["held_in_mean", 3], ["held_out_mean", 3]], traces
    table = page.locator("#sweep-table").inner_text()
    assert "params_mix" in table and "heldout_next_word" in table
    page.locator("#sweep-btn").click()  # the same settings again: resumed from the database, nothing recomputed
    expect(page.locator("#sweep-status")).to_contain_text("3 finished trial(s)")
    page.locator("#sweep-best").click()
    expect(page.locator("#merge-status")).to_contain_text("#2 linear")
    _tab(page, "Merge")
    recipe = _recipe(page)
    assert _per_model(recipe, "expert-add")["weight"] + _per_model(recipe, "expert-reverse")["weight"] == 1.0

    _tab(page, "Sweep")  # a search, cancelled after its first trial: what finished is kept
    expect(page.locator("#sweep-param1 input")).to_have_value("mix")  # loading the best recipe kept the grid
    page.get_by_text("Search (every parameter)").click()
    page.locator("#sweep-trials input").fill("40")
    page.locator("#sweep-btn").click()
    page.wait_for_timeout(3000)
    page.locator("#sweep-cancel").click()
    expect(page.locator("#sweep-status")).to_contain_text("(cancelled)", timeout=TIMEOUT)
    assert page.locator("#sweep-csv").is_visible()

    _tab(page, "Evaluate")  # the current merge alone, then a typed task name, then a greedy soup
    page.locator("#tasks label", has_text="zoo_add").click()
    page.locator("#limit input").fill("20")
    page.locator("#include input").uncheck()
    page.locator("#ensemble input").uncheck()
    page.locator("#eval-btn").click()
    expect(page.locator("#eval-status")).to_contain_text("Done: 1/1 scored", timeout=TIMEOUT)
    cells = [c.strip() for c in page.locator("#eval-table").inner_text().splitlines() if c.strip()][1:]
    assert cells[:2] == ["model", "zoo_add acc"] and cells[2].startswith("#2 linear"), cells
    typed = page.locator("#typed-tasks textarea, #typed-tasks input").first
    typed.fill("zoo_reverse, zoo_ad")
    page.locator("#eval-btn").click()
    expect(page.locator("#eval-status")).to_contain_text("did you mean 'zoo_add'", timeout=TIMEOUT)
    expect(page.locator("#eval-status")).not_to_contain_text("Traceback")
    expect(page.locator("#eval-status")).not_to_contain_text("PosixPath")  # folders as a reader writes them
    expect(page.locator("#eval-table")).to_contain_text("#2 linear")  # checked first: the last scores stay
    typed.fill("")
    page.get_by_text("Greedy soup of the loaded experts").click()
    page.locator("#soup-btn").click()
    expect(page.locator("#soup-status")).to_contain_text("Greedy soup of 1: zoo/expert-add", timeout=TIMEOUT)
    steps = page.locator("#soup-steps").inner_text()
    assert "kept" in steps and "left out" in steps, steps

    _tab(page, "Playground")
    page.locator("#prompt textarea").fill("add 12+34=")  # the tiny zoo's format (the default is SmolLM2's)
    page.locator("#play-btn").click()
    expect(page.locator("#play-status")).to_contain_text("Greedy continuations of 4 model(s)", timeout=TIMEOUT)
    text = page.locator("#generations").inner_text()
    assert "46" in text and "zoo/base" in text, text  # the add expert answers add 12+34=
    page.screenshot(path=str(shots / "playground.png"), full_page=True)
    page.locator("#new-tokens input").fill("0")  # refused in our words, and the old continuations go
    page.locator("#play-btn").click()
    expect(page.locator("#play-status")).to_contain_text("New tokens is 0; give a whole number of at least 1")
    expect(page.locator("#generations")).not_to_contain_text("46")
