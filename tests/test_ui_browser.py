"""The app in a real browser (Debian chromium via Playwright): merge two zoo experts, inspect,
evaluate with lm-eval, export; then the exported folder must load in transformers and generate."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
from playwright.sync_api import expect, sync_playwright
from transformers import AutoModelForCausalLM, AutoTokenizer

import app
from tests.tiny import save_tiny_gpt2

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]
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
    port = _free_port()
    demo = app.build_demo(models)
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}", models
    demo.close()


@pytest.fixture(scope="module")
def page(served):
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(TIMEOUT)
        yield page
        browser.close()


def _tab(page, name: str) -> None:
    page.get_by_role("tab", name=name).click()


def test_merge_inspect_evaluate_export(served, page, tmp_path):
    url, models = served
    shots = Path(os.environ.get("MERGE_EXPLORER_SCREENSHOTS", tmp_path))
    page.goto(url)
    expect(page.locator("#models-status")).to_contain_text("Found", timeout=60_000)
    page.locator("#load").click()
    expect(page.locator("#models-status")).to_contain_text("all compatible")

    _tab(page, "Merge")
    expect(page.get_by_text("density · zoo/expert-", exact=False).first).to_be_visible()
    page.locator("#merge-btn").click()
    expect(page.locator("#merge-status")).to_contain_text("Merged 2 model(s) with ties")

    _tab(page, "Inspect")
    expect(page.locator("#inspect-status")).to_contain_text("Task vectors of")
    expect(page.locator("#plot-histogram .js-plotly-plot")).to_be_visible()
    page.wait_for_timeout(1000)
    page.screenshot(path=str(shots / "inspect.png"), full_page=True)

    _tab(page, "Evaluate")
    boxes = page.locator("#tasks input[type=checkbox]")
    expect(boxes.first).to_be_visible()
    for i in range(min(2, boxes.count())):
        boxes.nth(i).check()
    page.locator("#limit input").fill("20")
    page.locator("#eval-btn").click()
    expect(page.locator("#eval-status")).to_contain_text("Evaluated", timeout=TIMEOUT)
    expect(page.locator("#eval-table")).to_contain_text("merge (ties)")
    page.screenshot(path=str(shots / "evaluate.png"), full_page=True)
    cells = [c.strip() for c in page.locator("#eval-table").inner_text().splitlines() if c.strip()]
    assert cells[:3] == ["model", "zoo_add", "zoo_reverse"], cells
    body = {cells[i]: [float(x) for x in cells[i + 1 : i + 3]] for i in range(3, len(cells), 3)}
    assert set(body) == {"zoo/base", "zoo/expert-add", "zoo/expert-reverse", "merge (ties)"}, cells
    assert all(len(v) == 2 and all(0 <= x <= 1 for x in v) for v in body.values()), cells

    _tab(page, "Export")
    page.locator("#save").click()
    expect(page.locator("#export-status")).to_contain_text("Saved")
    out = models / "merges" / "merge-1"
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("add 12+34=", return_tensors="pt").input_ids
    generated = model.generate(ids, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert generated.shape[1] == ids.shape[1] + 3
    assert "merge_method: ties" in (out / "merge_recipe.yaml").read_text()
    assert torch.isfinite(model.lm_head.weight).all()


def test_bad_input_is_reported_in_the_ui(served, page, tmp_path):
    url, models = served
    page.goto(url)
    expect(page.locator("#models-status")).to_contain_text("Found")
    # Two architectures: refused on Load, before any merge.
    page.locator("#experts label", has_text="zoo/expert-reverse").click()
    page.locator("#experts label", has_text="other/gpt2-tiny").click()
    page.locator("#load").click()
    expect(page.locator("#models-status")).to_contain_text("architecture GPT2LMHeadModel differs")
    # Output folder equal to an input: refused on Save, nothing written there.
    page.locator("#experts label", has_text="other/gpt2-tiny").click()
    page.locator("#experts label", has_text="zoo/expert-reverse").click()
    page.locator("#load").click()
    expect(page.locator("#models-status")).to_contain_text("all compatible")
    _tab(page, "Merge")
    page.locator("#merge-btn").click()
    expect(page.locator("#merge-status")).to_contain_text("Merged")
    _tab(page, "Export")
    before = sorted(p.name for p in (models / "zoo" / "expert-add").iterdir())
    page.locator("#export-folder textarea, #export-folder input").first.fill("zoo/expert-add")
    page.locator("#save").click()
    expect(page.locator("#export-status")).to_contain_text("overlaps input")
    assert sorted(p.name for p in (models / "zoo" / "expert-add").iterdir()) == before
    # A folder that does not exist: reported on Scan.
    _tab(page, "Models")
    page.locator("#models-folder textarea, #models-folder input").first.fill(str(tmp_path / "missing"))
    page.locator("#scan").click()
    expect(page.locator("#models-status")).to_contain_text("does not exist")
