"""Merge Explorer in the browser: Models -> Merge -> Inspect -> Evaluate -> Export.

``python app.py`` serves on 127.0.0.1:7860 over ./models, building the demo zoo there on first run.
The layout is ``build_demo``; the handlers (``ui_handlers``) are a few lines each that call
``explorer``/``evals`` and turn errors into one readable sentence.
"""

from __future__ import annotations

import os

os.environ.setdefault(
    "OMP_WAIT_POLICY", "PASSIVE"
)  # before torch loads: busy-waiting threads stall a loaded 2-core machine

import argparse
import gc
import re
import threading
from functools import partial
from pathlib import Path
from typing import Optional

DEFAULT_MODELS = Path("models")
DEMO_DIR = "smollm2"  # the demo experts' folder inside the first models folder


def arguments() -> argparse.Namespace:
    """Command line: ``python app.py [--models DIR ...] [--host H] [--port P] [--no-demo]``."""
    parser = argparse.ArgumentParser(description="Merge Explorer app")
    parser.add_argument(
        "--models",
        type=Path,
        action="append",
        help="folder of checkpoints; repeat for several (default ./models; the demo zoo is built there if empty)",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--no-demo", action="store_true", help="do not build the SmolLM2 demo experts")
    return parser.parse_args()


if __name__ == "__main__":
    ARGS = arguments()  # --help and a mistyped option answer before the imports below (10 s on 2 cores)

import gradio as gr
import pandas as pd

import ui_handlers as ui
import ui_sweep
from evals.lm_eval_runner import warm_environment, warm_task_index
from explorer import registry
from explorer.background import BackgroundJob
from explorer.inspect import plots
from explorer.io.inputs import REPORT_COLUMNS
from explorer.workbench import Workbench
from explorer.zoo.experts import build_smollm2_experts, smollm2_experts_built

HEAVY = {"concurrency_id": "heavy", "concurrency_limit": 1}  # one merge/eval/export per process; the rest queue


def _control(p: registry.Param, key: str, value):
    """The widget for one method parameter, built from its spec, labelled ``key`` and showing ``value``.

    ``interactive=True`` is needed: gradio disables components created inside ``gr.render``.
    """
    common = {
        "label": key,
        "info": p.help,
        "interactive": True,
        "elem_id": "ctl-" + re.sub(r"[^a-z0-9]+", "-", key.lower()).strip("-"),
    }
    if isinstance(p.default, bool):
        return gr.Checkbox(value=value, **common)
    if p.choices:
        return gr.Dropdown(list(p.choices), value=value, **common)
    if None in (p.low, p.high, p.step):  # open range or no natural step (epsilon 1e-6): a number box
        return gr.Number(value, minimum=p.low, maximum=p.high, step=p.step or 1e-6, **common)
    if p.slider_only and isinstance(value, (int, float)):  # a recipe's value beyond the slider widens it
        return gr.Slider(min(p.low, value), max(p.high, value), value=value, step=p.step, **common)
    return gr.Slider(p.low, p.high, value=value, step=p.step, **common)


def build_demo(
    models_dirs: Path | list[Path] = DEFAULT_MODELS, demo_build: Optional[BackgroundJob] = None
) -> gr.Blocks:
    """The whole UI over checkpoints found under ``models_dirs`` (the only folders it reads or writes).

    ``demo_build``: the demo models' build running in the background; the Models tab shows its
    progress and lists its checkpoints as they are finished.
    """
    roots = [Path(d) for d in ([models_dirs] if isinstance(models_dirs, (str, Path)) else models_dirs)]
    methods = [s.name for s in registry.all_methods()]
    threading.Thread(target=warm_environment, daemon=True).start()  # the first evaluation then starts at once
    with gr.Blocks(title="Merge Explorer") as demo:
        bench = gr.State(Workbench(roots[0]))
        loaded = gr.State(
            {"labels": [], "version": 0}
        )  # the experts' labels; version forces a re-render of the controls
        values = gr.State({})  # {control key: last value}: a method change keeps what still applies
        gr.Markdown("# Merge Explorer\nMerge local checkpoints, see their task vectors, evaluate and export.")
        with gr.Tab("Models", id="models"):
            with gr.Row():
                folder = gr.Dropdown(
                    [str(r) for r in roots],
                    value=str(roots[0]),
                    label="Models folder (given with --models at start-up)",
                    elem_id="models-folder",
                    scale=4,
                )
                scan_btn = gr.Button("Scan again", elem_id="scan")
            build_status = gr.Markdown(
                demo_build.status() if demo_build else "", elem_id="demo-build", visible=demo_build is not None
            )
            known = gr.State(-1)  # checkpoints seen by the last poll of the demo build
            catalog = gr.Dataframe(elem_id="catalog", interactive=False, label="Checkpoints found: format, size, dtype")
            base = gr.Dropdown([], label="Base model (the experts' common ancestor)", elem_id="base")
            experts = gr.CheckboxGroup([], label="Experts to merge", elem_id="experts")
            load_btn = gr.Button("Load", variant="primary", elem_id="load")
            models_status = gr.Markdown(elem_id="models-status")
            compat = gr.Dataframe(
                pd.DataFrame(columns=REPORT_COLUMNS),
                elem_id="compat",
                interactive=False,
                wrap=True,
                label="Compatibility: each input against the reference, with every config field that differs",
            )
        with gr.Tab("Merge", id="merge"):
            with gr.Row():
                method = gr.Dropdown(methods, value="ties", label="Method", elem_id="method")
                dtype = gr.Dropdown(
                    ["float32", "bfloat16", "float16"],
                    value="float32",
                    label="Output dtype",
                    elem_id="dtype",
                    interactive=True,
                )
                seed = gr.Number(0, label="Seed", precision=0, elem_id="seed", interactive=True)
                live = gr.Checkbox(
                    False,
                    label="Live: re-merge when a control is released (small models)",
                    elem_id="live",
                    interactive=True,
                )
            with gr.Row():
                merge_btn = gr.Button("Merge", variant="primary", elem_id="merge-btn")
                cancel_btn = gr.Button("Cancel", variant="stop", elem_id="cancel-btn")
            merge_status = gr.Markdown(elem_id="merge-status")
            controls_box = gr.Column()
            recipe_preview = gr.Code(
                language="yaml", label="Recipe these settings make", elem_id="merge-recipe", interactive=False
            )
            with gr.Accordion("Import a recipe (mergekit YAML)", open=False):
                recipe_in = gr.Code(language="yaml", label="Paste a recipe", elem_id="recipe-in", interactive=True)
                recipe_file = gr.File(
                    label="or upload a .yaml file", file_types=[".yaml", ".yml"], elem_id="recipe-file"
                )
                import_btn = gr.Button("Merge this recipe", elem_id="import-btn")
                recipe_curves = gr.Plot(label="Values per layer", visible=False, elem_id="recipe-curves")
            history = gr.Dataframe(
                bench.value.history_table(),  # empty: its column names
                elem_id="history",
                interactive=False,
                label="Merges since Load",
            )
        with gr.Tab("Inspect", id="inspect") as inspect_tab:
            with gr.Row():  # the statistics' settings on a row of their own, so the slider keeps its width
                density = gr.Slider(
                    0.01,
                    1.0,
                    value=0.5,
                    step=0.01,
                    label="Density for trim / interference statistics",
                    elem_id="inspect-density",
                    scale=2,
                    min_width=320,
                )
                threshold = gr.Textbox(
                    "0.005", label="|delta| threshold (the DARE paper uses 0.005 and 0.002)", elem_id="threshold"
                )
            with gr.Row():
                shown = gr.Dropdown([], label="Merge shown", elem_id="inspect-merge", interactive=True, scale=2)
                other = gr.Dropdown([], label="Compare with", elem_id="inspect-other", interactive=True, scale=2)
                inspect_btn = gr.Button("Refresh", elem_id="inspect-btn")
            inspect_status = gr.Markdown(elem_id="inspect-status")
            inspect_outputs = [
                inspect_status,
                gr.Markdown(elem_id="caption-compare", visible=False),
                gr.Plot(show_label=False, elem_id="plot-compare", visible=False),
            ]
            for key in plots.PANEL_KEYS:
                inspect_outputs += [
                    gr.Markdown(elem_id=f"caption-{key}"),
                    gr.Plot(show_label=False, elem_id=f"plot-{key}", visible=False),
                    gr.DownloadButton("Download CSV", elem_id=f"csv-{key}", size="sm", visible=False),
                ]
        with gr.Tab("Evaluate", id="evaluate"):
            tasks = gr.CheckboxGroup(
                [],
                label="lm-eval tasks: the experts' own (held-in) and the held-out suite (heldout_*)",
                elem_id="tasks",
            )
            typed_tasks = gr.Textbox(
                label="Other lm-eval tasks (comma-separated names; their data must be on this machine)",
                elem_id="typed-tasks",
            )
            merges = gr.CheckboxGroup([], label="Merges to evaluate (default: the current one)", elem_id="eval-merges")
            with gr.Row():
                limit = gr.Number(50, label="Examples per task (0 = all)", precision=0, elem_id="limit")
                include = gr.Checkbox(True, label="Also evaluate base and experts", elem_id="include")
                ensemble = gr.Checkbox(
                    True, label="Also the output ensemble of the experts (averaged predictions)", elem_id="ensemble"
                )
                eval_btn = gr.Button("Run", variant="primary", elem_id="eval-btn")
                eval_cancel = gr.Button("Cancel", variant="stop", elem_id="eval-cancel")
            eval_status = gr.Markdown(elem_id="eval-status")
            table = gr.Dataframe(
                ui.SCORES, elem_id="eval-table", interactive=False, label="Every metric lm-eval reports"
            )
            normalized = gr.Dataframe(
                ui.SCORES,
                elem_id="eval-normalized",
                interactive=False,
                label="Normalized: value / best expert's, and the share of the owning expert's gain over the base kept",
            )
            chart = gr.Plot(elem_id="eval-chart")
            with gr.Accordion("Greedy soup of the loaded experts (scored on the tasks ticked above)", open=False):
                soup_btn = gr.Button("Make the greedy soup", elem_id="soup-btn")
                soup_status = gr.Markdown(elem_id="soup-status")
                soup_steps = gr.Dataframe(
                    ui.SOUP_STEPS, elem_id="soup-steps", interactive=False, label="Steps: kept or left out"
                )
                soup_recipe = gr.Code(language="yaml", label="The soup's recipe", elem_id="soup-recipe")
        with gr.Tab("Sweep", id="sweep"):
            gr.Markdown(
                "Grid or search over the Merge tab's method; each point is merged in memory and scored with lm-eval. "
                "Studies are kept in the models folder (`.merge-studies`): running the same settings again resumes."
            )
            with gr.Row():
                sweep_kind = gr.Radio(
                    [ui_sweep.GRID, ui_sweep.SEARCH], value=ui_sweep.GRID, label="Kind", elem_id="sweep-kind"
                )
                sweep_limit = gr.Number(20, label="Examples per task (0 = all)", precision=0, elem_id="sweep-limit")
            with gr.Row():
                first_param = gr.Dropdown([], label="Parameter", elem_id="sweep-param1")
                first_values = gr.Textbox("0.5, 1.0, 1.5", label="Values", elem_id="sweep-values1")
                second_param = gr.Dropdown([], label="Second parameter (optional)", elem_id="sweep-param2")
                second_values = gr.Textbox("0.2, 0.5, 0.8", label="Values", elem_id="sweep-values2")
            with gr.Row():
                trials = gr.Number(10, label="Search: trials", precision=0, elem_id="sweep-trials")
                sampler = gr.Dropdown(["tpe", "cmaes"], value="tpe", label="Search: sampler", elem_id="sweep-sampler")
            held_in = gr.CheckboxGroup([], label="Held-in tasks (their mean is maximized)", elem_id="sweep-held-in")
            held_out = gr.CheckboxGroup([], label="Held-out tasks (recorded beside it)", elem_id="sweep-held-out")
            with gr.Row():
                sweep_btn = gr.Button("Run", variant="primary", elem_id="sweep-btn")
                sweep_cancel = gr.Button("Cancel", variant="stop", elem_id="sweep-cancel")
                best_btn = gr.Button("Load the best recipe into the Merge tab", elem_id="sweep-best")
            sweep_status = gr.Markdown(elem_id="sweep-status")
            sweep_plot = gr.Plot(elem_id="sweep-plot")
            sweep_table = gr.Dataframe(elem_id="sweep-table", interactive=False, label="Trials")
            with gr.Row():
                sweep_csv = gr.DownloadButton("Download CSV", elem_id="sweep-csv", size="sm")
                sweep_json = gr.DownloadButton("Download JSON", elem_id="sweep-json", size="sm")
            study_name = gr.State("")
        with gr.Tab("Playground", id="playground"):
            prompt = gr.Textbox("add 12+34 ->", label="Prompt", elem_id="prompt")  # the demo experts' format
            new_tokens = gr.Number(12, label="New tokens", precision=0, elem_id="new-tokens")
            play_btn = gr.Button("Generate with base, experts and the current merge", elem_id="play-btn")
            play_status = gr.Markdown(elem_id="play-status")
            generations = gr.Dataframe(elem_id="generations", interactive=False, wrap=True)
        with gr.Tab("Export", id="export") as export_tab:
            out_folder = gr.Textbox(
                "merges/merge-1",
                label="Output folder (relative paths are inside the models folder)",
                elem_id="export-folder",
            )
            target = gr.Markdown(elem_id="export-target")
            overwrite = gr.Checkbox(False, label="Replace the folder if it holds an earlier merge", elem_id="overwrite")
            save_btn = gr.Button("Save", variant="primary", elem_id="save")
            export_status = gr.Markdown(elem_id="export-status")
            recipe_view = gr.Code(language="yaml", label="Recipe (mergekit-style YAML)", elem_id="export-recipe")
            recipe_download = gr.DownloadButton("Download recipe YAML", elem_id="recipe-download", size="sm")

        with controls_box:

            @gr.render(inputs=[method, loaded, values], triggers=[method.change, loaded.change, demo.load])
            def controls(method_name: str, state: dict, remembered: dict):
                spec = registry.get(method_name)
                gr.Markdown(  # its class tells a browser test which load these controls were drawn for
                    f"**{spec.pretty_name}** — {spec.summary} ([paper]({spec.paper_url}))",
                    elem_id="method-info",
                    elem_classes=[f"drawn-for-load-{state['version']}"],
                )
                keyed = ui.control_keys(spec, state["labels"])
                widgets = [_control(p, key, ui.remembered(remembered, p, key)) for key, p in keyed if not p.per_model]
                for label in state["labels"]:
                    with gr.Row():
                        mine = [(key, p) for key, p in keyed if p.per_model and key.endswith(ui.KEY_SEP + label)]
                        widgets += [_control(p, key, ui.remembered(remembered, p, key)) for key, p in mine]
                for (key, _), widget in zip(keyed, widgets, strict=True):
                    settings = [bench, values, method, dtype, seed, gr.State(key), widget]
                    widget.change(ui.preview, settings, [recipe_preview, merge_status], show_progress="hidden")
                    getattr(widget, "release", widget.change)(ui.live_merge, [live, *settings], merged_outputs, **HEAVY)

        merged_outputs = [bench, merge_status, recipe_preview, history, shown, merges, other]
        scan_args = ([bench, folder], [bench, catalog, base, experts, models_status, tasks, held_in, held_out])
        demo.load(ui.scan, *scan_args)
        demo.load(ui.opened, [bench], None)
        demo.unload(ui.closed)
        if demo_build:
            timer = gr.Timer(2.0)
            tick = lambda wb, root, seen, *chosen: ui.build_tick(demo_build, wb, root, seen, *chosen)  # noqa: E731
            chosen = [base, experts, tasks, held_in, held_out]
            timer.tick(
                tick,
                [bench, folder, known, *chosen],
                [build_status, known, timer, *scan_args[1]],
                show_progress="hidden",
            )
        scan_btn.click(ui.scan, *scan_args)
        folder.change(ui.scan, *scan_args)
        base.change(ui.experts_without_base, [bench, base, experts], [experts])
        cleared = [
            merge_status,
            recipe_preview,
            history,
            shown,
            merges,
            other,
            eval_status,
            table,
            normalized,
            chart,
            export_status,
            recipe_view,
            *inspect_outputs,
        ]
        load_btn.click(
            ui.load,
            [bench, base, experts, loaded, values, method, dtype, seed],
            [bench, loaded, models_status, compat, *cleared],
            **HEAVY,
        )
        settings = [bench, values, method, dtype, seed]
        for event in (method.change, dtype.change, seed.change):
            event(ui.current_recipe, settings, [recipe_preview, merge_status], show_progress="hidden")
        run = merge_btn.click(ui.merge, settings, merged_outputs, **HEAVY)
        cancel_btn.click(
            partial(ui.cancel, said=ui.CANCELLED_MERGE), [bench], [merge_status], cancels=[run], queue=False
        )
        import_btn.click(
            ui.import_recipe,
            [bench, values, recipe_in, recipe_file, loaded],
            [bench, method, dtype, seed, loaded, *merged_outputs[1:], recipe_curves],
            **HEAVY,
        )
        for event in (
            inspect_btn.click,
            inspect_tab.select,
            density.release,
            threshold.submit,
            shown.input,
            other.input,
        ):  # refreshed when the tab is opened, not after every merge: its statistics would slow an evaluation
            event(ui.inspect, [bench, density, threshold, shown, other], inspect_outputs)
        evaluation = eval_btn.click(
            ui.evaluate,
            [bench, tasks, typed_tasks, merges, limit, include, ensemble],
            [eval_status, table, normalized, chart, history],
            **HEAVY,
        )
        eval_cancel.click(
            partial(ui.cancel, said=ui.CANCELLED_EVALUATION), [bench], [eval_status], cancels=[evaluation], queue=False
        )
        soup_btn.click(
            ui.greedy_soup, [bench, tasks, typed_tasks, limit], [soup_status, soup_steps, soup_recipe], **HEAVY
        )
        for event in (method.change, loaded.change, demo.load):
            event(
                ui_sweep.parameters,
                [method, loaded, first_param, second_param],
                [first_param, second_param],
                show_progress="hidden",
            )
        for param, param_values in ((first_param, first_values), (second_param, second_values)):
            param.change(ui_sweep.suggested_values, [method, param], [param_values], show_progress="hidden")
        sweep_btn.click(
            ui_sweep.run,
            [
                bench,
                values,
                method,
                sweep_kind,
                first_param,
                first_values,
                second_param,
                second_values,
                trials,
                sampler,
                held_in,
                held_out,
                sweep_limit,
            ],
            [sweep_status, sweep_table, sweep_plot, sweep_csv, sweep_json, study_name],
            **HEAVY,
        )
        sweep_cancel.click(ui.cancel, [bench], [sweep_status], queue=False)
        best_btn.click(ui_sweep.best_recipe, [bench, study_name], [sweep_status, recipe_in]).success(
            ui.import_recipe,
            [bench, values, recipe_in, recipe_file, loaded],
            [bench, method, dtype, seed, loaded, *merged_outputs[1:], recipe_curves],
            **HEAVY,
        )
        play_btn.click(ui.playground, [bench, prompt, new_tokens], [play_status, generations], **HEAVY)
        for event in (out_folder.change, export_tab.select, demo.load):  # the folder may change outside the app
            event(ui.describe_target, [bench, out_folder], [target], show_progress="hidden")
        save_btn.click(
            ui.export, [bench, out_folder, overwrite], [export_status, recipe_view, recipe_download, target], **HEAVY
        )
    # The imports and the UI leave about 560,000 long-lived objects: each full garbage collection walked
    # them all, a 0.2 s pause at random inside a slider move or an Inspect refresh. Frozen, it skips them.
    gc.freeze()
    return demo


def main(args: argparse.Namespace) -> None:
    """Serve the app over ``args.models`` (``arguments()``), building the demo experts first when they are wanted."""
    roots = args.models or [DEFAULT_MODELS]
    demo_build = None
    wanted = not args.no_demo and (args.models is None or not any(Workbench(r).checkpoints() for r in roots))
    if wanted and not smollm2_experts_built(roots[0] / DEMO_DIR):
        print(
            f"Building the SmolLM2 demo experts in {roots[0] / DEMO_DIR} in the background (about 8 minutes, once); the app serves meanwhile."
        )
        demo_build = BackgroundJob(
            "SmolLM2 demo experts", lambda progress: build_smollm2_experts(roots[0] / DEMO_DIR, progress)
        ).start()
    threading.Thread(target=warm_task_index, daemon=True).start()  # typed lm-eval task names answer at once
    build_demo(roots, demo_build).launch(server_name=args.host, server_port=args.port)


if __name__ == "__main__":
    main(ARGS)
