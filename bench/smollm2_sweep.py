"""README's sweep: TIES lambda x density on the SmolLM2 demo experts, held-in and held-out, beside the ensemble.

``python bench/smollm2_sweep.py --set SET --work DIR [--limit 50]`` scores base, the three experts and
their output ensemble (``evals.comparison``), runs a 3 x 3 grid of TIES (lambda x density, an Optuna
study in ``DIR``: rerunning resumes it and reuses every cached score), and writes to ``DIR``:
``sweep.md`` (the numbers and timings), ``sweep.html`` and ``sweep.png`` (the heatmaps of the mean
normalized score, held-in and held-out: each task's primary metric divided by the best expert's, a
perplexity inverted so that higher is better).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd  # noqa: E402
import plotly.graph_objects as go  # noqa: E402
from plotly.subplots import make_subplots  # noqa: E402

import evals  # noqa: E402
from evals.ensemble import OutputEnsemble  # noqa: E402
from evals.heldout import HELDOUT_TASKS, heldout_task_dir  # noqa: E402
from evals.study import run_grid, study_table  # noqa: E402
from explorer.session import MergeSession  # noqa: E402
from explorer.zoo.testbed import smollm2_testbed  # noqa: E402

LAMBDAS = [0.5, 1.0, 1.5]
DENSITIES = [0.2, 0.5, 0.8]


def _reference(session: MergeSession, labels: list[str], tasks, task_dirs, limit) -> pd.DataFrame:
    """Every metric of base, experts and their output ensemble."""
    tokenizer = session.reference.tokenizer()
    experts = [session.build_model(t) for t in session.models]
    models = {"base": (session.build_model(session.base), tokenizer)}
    models.update({label: (m, tokenizer) for label, m in zip(labels, experts, strict=True)})
    models["ensemble"] = (OutputEnsemble(experts).eval(), tokenizer)
    loaders = {k: (lambda m=m: m) for k, m in models.items()}
    return pd.concat(evals.score_stream(loaders, tasks, task_dirs, limit), ignore_index=True)


def _grid_rows(table: pd.DataFrame, reference: pd.DataFrame, tasks) -> pd.DataFrame:
    """The grid's per-task primary scores as ``score_stream`` rows, one model per grid point."""
    primary = evals.primary(reference).set_index("task")
    rows = []
    for _, trial in table[table["state"] == "COMPLETE"].iterrows():
        label = f"lambda={trial['params_lambda']:g} density={trial['params_density']:g}"
        for task in tasks:
            rows.append(
                {
                    "model": label,
                    "task": task,
                    "metric": primary.loc[task, "metric"].iloc[0],
                    "value": trial[task],
                    "stderr": trial[f"{task}_stderr"],
                    "n": trial[f"{task}_n"],
                    "higher_is_better": primary.loc[task, "higher_is_better"].iloc[0],
                }
            )
    return pd.DataFrame(rows)


def main() -> None:
    """Run the comparison and the grid; write the markdown, the HTML figure and its PNG screenshot."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", type=Path, required=True, help="built SmolLM2 expert set")
    parser.add_argument("--work", type=Path, required=True, help="folder for the study database and the outputs")
    parser.add_argument("--limit", type=int, default=50, help="examples per task")
    args = parser.parse_args()
    bed = smollm2_testbed(args.set)
    held_in, held_out = list(bed.lm_eval_tasks.values()), list(HELDOUT_TASKS)
    task_dirs = [bed.task_dir, heldout_task_dir()]
    labels = list(bed.experts)
    start = time.perf_counter()
    session = MergeSession(bed.base, list(bed.experts.values()))
    loaded = time.perf_counter() - start
    start = time.perf_counter()
    reference = _reference(session, labels, held_in + held_out, task_dirs, args.limit)
    reference_s = time.perf_counter() - start
    start = time.perf_counter()
    study = run_grid(
        session,
        "ties",
        {"lambda": LAMBDAS, "density": DENSITIES},
        held_in,
        task_dirs,
        args.work,
        held_out=held_out,
        limit=args.limit,
        progress=lambda f, m: print(f"[{f:4.0%}] {m}", flush=True),
    )
    grid_s = time.perf_counter() - start
    table = study_table(args.work, study.study_name)
    rows = _grid_rows(table, reference, held_in + held_out)
    normalized = evals.normalized_scores(pd.concat([reference, rows]), "base", labels)
    normalized["kind"] = normalized["task"].map(lambda t: "held-in" if t in held_in else "held-out")
    means = normalized.groupby(["model", "kind"], sort=False)["vs best expert"].mean().unstack()
    figure = make_subplots(rows=1, cols=2, subplot_titles=["held-in (experts' tasks)", "held-out (heldout_*)"])
    for col, kind in enumerate(["held-in", "held-out"], start=1):
        z = [[means.loc[f"lambda={lam:g} density={d:g}", kind] for d in DENSITIES] for lam in LAMBDAS]
        figure.add_trace(
            go.Heatmap(
                z=z,
                x=[f"density {d:g}" for d in DENSITIES],
                y=[f"lambda {lam:g}" for lam in LAMBDAS],
                text=[[f"{v:.2f}" for v in row] for row in z],
                texttemplate="%{text}",
                coloraxis="coloraxis",
            ),
            row=1,
            col=col,
        )
    figure.update_layout(
        title=f"TIES on the SmolLM2 experts: mean score / best expert's ({args.limit} examples per task)",
        coloraxis={"colorscale": "Viridis"},
        width=1000,
        height=420,
    )
    args.work.mkdir(parents=True, exist_ok=True)
    figure.write_html(args.work / "sweep.html", include_plotlyjs=True)
    wide = evals.wide_scores(pd.concat([evals.primary(reference), rows])).round(3)
    lines = [
        f"loaded in {loaded:.0f} s; base, experts and ensemble scored in {reference_s:.0f} s; "
        f"the 9-point grid in {grid_s:.0f} s ({args.limit} examples per task, 2 CPU cores)",
        "",
        "mean normalized score (vs best expert):",
        means.round(3).to_markdown(),
        "",
        "every primary metric:",
        wide.to_markdown(index=False),
        "",
        "normalized, per task:",
        normalized.round(3).to_markdown(index=False),
    ]
    (args.work / "sweep.md").write_text("\n".join(lines) + "\n")
    _screenshot(args.work / "sweep.html", args.work / "sweep.png")
    print("\n".join(lines))


def _screenshot(html: Path, png: Path) -> None:
    """The HTML figure as a PNG, through the system chromium (Playwright never downloads a browser here)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1020, "height": 440})
        page.goto(html.resolve().as_uri())
        page.wait_for_selector(".js-plotly-plot")
        page.screenshot(path=str(png))
        browser.close()


if __name__ == "__main__":
    main()
