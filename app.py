"""Merge Explorer in the browser: Models -> Merge -> Inspect -> Evaluate -> Export.

``python app.py`` serves on 127.0.0.1:7860 over ./models, building the demo zoo there on first run.
Handlers are a few lines each: they call ``explorer``/``evals`` and turn errors into status messages.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: busy-waiting threads stall a loaded 2-core machine

import argparse
import tempfile
from pathlib import Path

import gradio as gr
import plotly.express as px

import evals
from explorer import plots, registry
from explorer.workbench import Workbench

DEFAULT_MODELS = Path("models")
CSV_DIR = Path(tempfile.mkdtemp(prefix="merge-explorer-csv-"))


def _error(e: Exception) -> str:
    return f"**Error:** {e}"


def _progress(progress: gr.Progress):
    return lambda fraction, message: progress(fraction, desc=message)


def _control(p: registry.Param, label: str):
    """The widget for one method parameter, built from its spec."""
    if isinstance(p.default, bool):
        return gr.Checkbox(value=p.default, label=label, info=p.help)
    if p.choices:
        return gr.Dropdown(list(p.choices), value=p.default, label=label, info=p.help)
    return gr.Slider(p.low, p.high, value=p.default, step=p.step, label=label, info=p.help)


# Handlers -------------------------------------------------------------------------------------

def scan(bench: Workbench, folder: str):
    bench.models_dir = Path(folder).expanduser()
    labels = [bench.label(p) for p in bench.checkpoints()]
    base = next((lab for lab in labels if Path(lab).name == "base"), None)
    experts = [lab for lab in labels if Path(lab).name.startswith("expert")][:2]
    if not bench.models_dir.is_dir():
        message = _error(f"folder {folder} does not exist; give the folder that holds your checkpoints")
    elif labels:
        message = f"Found {len(labels)} checkpoint(s) in {folder}."
    else:
        message = f"No checkpoints in {folder}: a checkpoint is a folder with config.json and safetensors weights."
    tasks = gr.update(choices=evals.list_tasks(evals.task_dirs(bench.models_dir)))
    return bench, gr.update(choices=[""] + labels, value=base), gr.update(choices=labels, value=experts), message, tasks


def load(bench: Workbench, base: str, experts: list[str], progress=gr.Progress()):
    root = bench.models_dir
    paths = [str(p if Path(p).is_absolute() else root / p) for p in experts]
    try:
        message = bench.load(str(root / base) if base else None, paths, _progress(progress))
    except Exception as e:
        bench.session = None
        return bench, [], _error(e)
    return bench, [bench.label(p) for p in paths], message


def merge(bench: Workbench, method: str, dtype: str, seed: float, *values, progress=gr.Progress()):
    spec = registry.get(method)
    n_global = len(spec.global_params)
    parameters = dict(zip([p.name for p in spec.global_params], values[:n_global]))
    per = values[n_global:]
    k = len(spec.per_model_params)
    per_model = [dict(zip([p.name for p in spec.per_model_params], per[i : i + k])) for i in range(0, len(per), k)] if k else [{} for _ in bench.require_session().model_paths]
    try:
        message = bench.merge(method, parameters, per_model, dtype, int(seed), _progress(progress))
    except Exception as e:
        return bench, _error(e)
    return bench, message


def inspect(bench: Workbench, density: float, threshold: float):
    if bench.session is None or bench.session.base is None:
        empty = [None] * (3 * len(plots.PANEL_KEYS))
        return ["Load a base and experts to inspect their task vectors."] + empty
    panels = plots.inspect_panels(bench.session, density=density, merged=bench.merged, threshold=float(threshold))
    outputs = ["Task vectors of " + ", ".join(bench.label(p) for p in bench.session.model_paths) + "."]
    for panel in panels:
        csv = CSV_DIR / f"{panel.key}.csv"
        panel.table.to_csv(csv, index=False)
        outputs += [f"#### {panel.title}\n{panel.caption}", panel.figure, str(csv)]
    return outputs


def evaluate(bench: Workbench, tasks: list[str], limit: float, include_inputs: bool, progress=gr.Progress()):
    try:
        progress(0.1, desc="building models in memory")
        models = bench.eval_models(include_inputs)
        progress(0.3, desc=f"lm-eval on {len(models)} model(s)")
        table = evals.compare(models, tasks, evals.task_dirs(bench.models_dir), limit=int(limit) or None)
    except Exception as e:
        return _error(e), None, None
    long = table.melt(id_vars="model", var_name="task", value_name="acc")
    chart = px.bar(long, x="task", y="acc", color="model", barmode="group", range_y=[0, 1], title="lm-eval accuracy")
    return f"Evaluated {len(models)} model(s) on {', '.join(tasks)} (limit {int(limit) or 'none'}).", table, chart


def export(bench: Workbench, folder: str, overwrite: bool):
    try:
        out = bench.export(folder, overwrite)
    except Exception as e:
        return _error(e), ""
    return f"Saved {out}", bench.recipe.to_yaml()


# Layout ---------------------------------------------------------------------------------------

def build_demo(models_dir: Path = DEFAULT_MODELS) -> gr.Blocks:
    """The whole UI over checkpoints found under ``models_dir``."""
    methods = [s.name for s in registry.all_methods()]
    with gr.Blocks(title="Merge Explorer") as demo:
        bench = gr.State(Workbench(models_dir))
        loaded = gr.State([])
        gr.Markdown("# Merge Explorer\nMerge local checkpoints, see their task vectors, evaluate and export.")
        with gr.Tab("Models", id="models"):
            with gr.Row():
                folder = gr.Textbox(str(models_dir), label="Models folder", elem_id="models-folder", scale=4)
                scan_btn = gr.Button("Scan", elem_id="scan")
            base = gr.Dropdown([], label="Base model (the experts' common ancestor)", elem_id="base")
            experts = gr.CheckboxGroup([], label="Experts to merge", elem_id="experts")
            load_btn = gr.Button("Load", variant="primary", elem_id="load")
            models_status = gr.Markdown(elem_id="models-status")
        with gr.Tab("Merge", id="merge"):
            with gr.Row():
                method = gr.Dropdown(methods, value="ties", label="Method", elem_id="method")
                dtype = gr.Dropdown(["float32", "bfloat16", "float16"], value="float32", label="Output dtype")
                seed = gr.Number(0, label="Seed", precision=0)
            merge_btn = gr.Button("Merge", variant="primary", elem_id="merge-btn")
            merge_status = gr.Markdown(elem_id="merge-status")

            @gr.render(inputs=[method, loaded])
            def controls(method_name: str, labels: list[str]):
                spec = registry.get(method_name)
                gr.Markdown(f"**{spec.pretty_name}** — {spec.summary} ([paper]({spec.paper_url}))")
                widgets = [_control(p, p.name) for p in spec.global_params]
                for label in labels:
                    with gr.Row():
                        widgets += [_control(p, f"{p.name} · {label}") for p in spec.per_model_params]
                merge_btn.click(merge, [bench, method, dtype, seed, *widgets], [bench, merge_status]).then(
                    inspect, [bench, density, threshold], inspect_outputs
                )

        with gr.Tab("Inspect", id="inspect"):
            with gr.Row():
                density = gr.Slider(0.01, 1.0, value=0.5, step=0.01, label="Density for trim / interference statistics", elem_id="inspect-density")
                threshold = gr.Dropdown([0.005, 0.002], value=0.005, label="|delta| threshold (DARE paper presets)", allow_custom_value=True)
                inspect_btn = gr.Button("Refresh", elem_id="inspect-btn")
            inspect_status = gr.Markdown(elem_id="inspect-status")
            inspect_outputs = [inspect_status]
            for key in plots.PANEL_KEYS:
                inspect_outputs += [
                    gr.Markdown(elem_id=f"caption-{key}"),
                    gr.Plot(show_label=False, elem_id=f"plot-{key}"),
                    gr.DownloadButton("Download CSV", elem_id=f"csv-{key}", size="sm"),
                ]
        with gr.Tab("Evaluate", id="evaluate"):
            tasks = gr.CheckboxGroup([], label="lm-eval tasks", elem_id="tasks")
            with gr.Row():
                limit = gr.Number(50, label="Examples per task (0 = all)", precision=0, elem_id="limit")
                include = gr.Checkbox(True, label="Also evaluate base and experts")
                eval_btn = gr.Button("Run", variant="primary", elem_id="eval-btn")
            eval_status = gr.Markdown(elem_id="eval-status")
            table = gr.Dataframe(elem_id="eval-table", interactive=False)
            chart = gr.Plot(elem_id="eval-chart")
        with gr.Tab("Export", id="export"):
            out_folder = gr.Textbox("merges/merge-1", label="Output folder (relative paths are inside the models folder)", elem_id="export-folder")
            overwrite = gr.Checkbox(False, label="Replace the folder if it exists")
            save_btn = gr.Button("Save", variant="primary", elem_id="save")
            export_status = gr.Markdown(elem_id="export-status")
            recipe_view = gr.Code(language="yaml", label="Recipe (mergekit-style YAML)")

        scan_args = ([bench, folder], [bench, base, experts, models_status, tasks])
        demo.load(scan, *scan_args)
        scan_btn.click(scan, *scan_args)
        load_btn.click(load, [bench, base, experts], [bench, loaded, models_status])
        inspect_btn.click(inspect, [bench, density, threshold], inspect_outputs)
        density.release(inspect, [bench, density, threshold], inspect_outputs)
        threshold.change(inspect, [bench, density, threshold], inspect_outputs)
        eval_btn.click(evaluate, [bench, tasks, limit, include], [eval_status, table, chart])
        save_btn.click(export, [bench, out_folder, overwrite], [export_status, recipe_view])
    return demo


def main() -> None:
    parser = argparse.ArgumentParser(description="Merge Explorer app")
    parser.add_argument("--models", type=Path, default=DEFAULT_MODELS, help="folder of checkpoints (default ./models; the demo zoo is built there if empty)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7860)
    args = parser.parse_args()
    if not Workbench(args.models).checkpoints():
        from explorer.zoo import build_zoo

        print(f"No checkpoints in {args.models}: building the demo zoo in {args.models / 'zoo'} (about 2 minutes, once).")
        build_zoo(args.models / "zoo")
    build_demo(args.models).launch(server_name=args.host, server_port=args.port)


if __name__ == "__main__":
    main()
