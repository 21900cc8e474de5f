"""The demo a new user sees: the SmolLM2 experts in the browser.

Two experts merged with TIES at density 0.5 keep at least 70% of each expert's gain over the base on
its own task (50 held-out examples each, the app's default), measured by lm-eval from the Evaluate tab; the
first result's time after the click is printed (README). A Live slider move re-merges and the Inspect
figures follow; the times from the release to each are printed (README).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from playwright.sync_api import expect

import app
from tests.test_ui_browser import (
    ARGS,
    CHROMIUM,
    TIMEOUT,
    _figure_data,
    _free_port,
    _load,
    _scores,
    _set_number,
    _tab,
    _wait_recipe,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol_page(smollm2_experts_dir, tmp_path_factory):
    from playwright.sync_api import sync_playwright

    models = tmp_path_factory.mktemp("smol-models")
    (models / "smollm2").symlink_to(smollm2_experts_dir, target_is_directory=True)
    port = _free_port()
    demo = app.build_demo(models)
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(TIMEOUT)
        page.goto(f"http://127.0.0.1:{port}")
        expect(page.locator("#models-status")).to_contain_text("Found", timeout=60_000)
        yield page
        browser.close()
    demo.close()


def test_a_merge_of_two_smollm2_experts_keeps_both_skills(smol_page, tmp_path):
    page = smol_page
    shots = Path(os.environ.get("MERGE_EXPLORER_SCREENSHOTS", tmp_path))
    _load(page, ("smollm2/expert-say", "smollm2/expert-rev"))
    _tab(page, "Merge")
    _set_number(page, "ctl-density-smollm2-expert-say", 0.5)
    _set_number(page, "ctl-density-smollm2-expert-rev", 0.5)
    _wait_recipe(page, lambda r: [m["parameters"]["density"] for m in r["models"]] == [0.5, 0.5])
    page.locator("#merge-btn").click()
    expect(page.locator("#merge-status")).to_contain_text("#1 ties (density=0.5,0.5)", timeout=300_000)

    _tab(page, "Evaluate")
    page.locator("#tasks label", has_text="smol_say").click()
    page.locator("#tasks label", has_text="smol_rev").click()
    expect(page.locator("#limit input")).to_have_value("50")  # the default: 50 held-out examples per task
    clicked = time.perf_counter()
    page.locator("#eval-btn").click()
    expect(page.locator("#eval-status")).to_contain_text("1/10 scored", timeout=300_000)
    first_result_s = time.perf_counter() - clicked  # README: the first result on 2 cores
    expect(page.locator("#eval-status")).to_contain_text("Done: 10/10 scored", timeout=1_800_000)
    expect(page.locator("#eval-chart .js-plotly-plot")).to_be_visible()
    page.screenshot(path=str(shots / "evaluate.png"), full_page=True)
    rows = _scores(page, ["smol_say acc", "smol_rev acc"])
    print(f"first result {first_result_s:.1f} s after the click; ensemble {rows['ensemble (experts)']}")
    base, say, rev, merge = (
        rows[k] for k in ("smollm2/base", "smollm2/expert-say", "smollm2/expert-rev", "#1 ties (density=0.5,0.5)")
    )
    kept_say = (merge[0] - base[0]) / (say[0] - base[0])
    kept_rev = (merge[1] - base[1]) / (rev[1] - base[1])
    print(
        f"base {base}, expert-say {say}, expert-rev {rev}, merge {merge}; share of gain kept: say {kept_say:.2f}, rev {kept_rev:.2f}"
    )
    assert say[0] - base[0] > 0.5 and rev[1] - base[1] > 0.5, rows  # the experts learned their tasks
    assert kept_say >= 0.7 and kept_rev >= 0.7, rows


def test_a_live_slider_move_remerges_and_inspect_follows(smol_page):
    """Release the lambda slider with Live on: a new merge; open Inspect: its figures are that merge's."""
    page = smol_page
    _load(page, ("smollm2/expert-say", "smollm2/expert-rev"))
    _tab(page, "Merge")
    _set_number(page, "ctl-lambda", 0.9)  # a label no earlier merge has: the status cannot be a stale one
    _wait_recipe(page, lambda r: r["parameters"]["lambda"] == 0.9)
    page.locator("#merge-btn").click()
    expect(page.locator("#merge-status")).to_contain_text("lambda=0.9", timeout=300_000)
    _tab(page, "Inspect")  # the first Inspect of these models measures every tensor (later ones reuse it)
    expect(page.locator("#inspect-status")).to_contain_text("lambda=0.9", timeout=300_000)
    expect(page.locator("#plot-merge_distance .js-plotly-plot")).to_be_visible(timeout=300_000)
    before = _figure_data(page, "merge_distance")
    _tab(page, "Merge")
    merges = page.locator("#history").inner_text().count("ties")
    page.locator("#live input").check()
    slider = page.locator("#ctl-lambda input[type=range]")
    slider.fill("0.6")
    released = time.perf_counter()
    slider.dispatch_event("pointerup")
    expect(page.locator("#history")).to_contain_text("lambda=0.6", timeout=300_000)
    merged_s = time.perf_counter() - released
    assert page.locator("#history").inner_text().count("ties") > merges
    opened = time.perf_counter()
    _tab(page, "Inspect")
    expect(page.locator("#inspect-status")).to_contain_text("lambda=0.6", timeout=300_000)
    for _ in range(300):  # the figure is redrawn once the refresh arrives
        if _figure_data(page, "merge_distance") != before:
            break
        page.wait_for_timeout(50)
    inspect_s = time.perf_counter() - opened
    assert _figure_data(page, "merge_distance") != before
    _tab(page, "Merge")
    page.locator("#live input").uncheck()
    print(
        f"live lambda move: merged {merged_s:.2f} s after the release; Inspect redrawn {inspect_s:.2f} s after opening it"
    )
