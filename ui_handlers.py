"""The app's event handlers: each calls ``explorer.workbench.Workbench`` or ``evals``.

Each returns what the widgets show. Errors become one readable sentence with the fix; the details go
to the server log. Per-method controls are named by keys: ``"lambda"`` for a global param,
``"density · zoo/expert-add"`` for a per-model one (``KEY_SEP`` between the param and the label).
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
import weakref
from pathlib import Path
from typing import Optional

import gradio as gr
import pandas as pd

import evals
from evals.ensemble import OutputEnsemble
from evals.greedy_soup import session_greedy_soup
from evals.heldout import COPY, NEXT_WORD, heldout_task_dir
from explorer import registry
from explorer.background import BackgroundJob
from explorer.inspect import plots
from explorer.inspect.compare import merge_comparison, merge_comparison_figure
from explorer.inspect.recipe_curves import recipe_curves, recipe_curves_figure
from explorer.io.inputs import REPORT_COLUMNS, compatibility_report
from explorer.messages import user_message
from explorer.recipe import MergeRecipe
from explorer.recipe_values import is_scalar
from explorer.workbench import Workbench

log = logging.getLogger("merge_explorer.app")
KEY_SEP = " · "
DOWNLOADS = Path(tempfile.mkdtemp(prefix="merge-explorer-"))
SCORES = pd.DataFrame(columns=["model"])  # Evaluate's tables before any score: named, not gradio's 1 2 3
SOUP_STEPS = pd.DataFrame(columns=["step", "model", "score", "kept"])


def readable(e: Exception) -> str:
    """``e`` as one Markdown sentence for the user; the traceback goes to the server log."""
    log.warning("shown to the user: %s", e, exc_info=e)
    return "**Error:** " + user_message(e).replace("<", "&lt;")  # PyYAML's "<block end>" is not an HTML tag


PROGRESS_EVERY_S = 0.1  # the least time between two progress updates sent to the browser


def _progress(progress: gr.Progress, every_s: float = PROGRESS_EVERY_S):
    """An ``explorer.progress.Progress`` callback (fraction in [0, 1], message) that updates ``progress``.

    At most one update per ``every_s`` seconds, and the last one (fraction 1), reach gradio: each costs
    about 0.3 ms, and a merge reports every tensor (272 for SmolLM2, 0.09 s of a 0.2 s slider move).
    """
    sent = -math.inf

    def report(fraction: float, message: str) -> None:
        nonlocal sent
        now = time.monotonic()
        if now - sent >= every_s or fraction >= 1:
            sent = now
            progress(fraction, desc=message)

    return report


# Browser tabs -----------------------------------------------------------------------------------------

OPEN: dict[str, Workbench] = {}  # each open browser tab's workbench, by gradio session


def opened(bench: Workbench, request: gr.Request) -> None:
    """Note the workbench of the tab that just opened, so that closing the tab frees it."""
    OPEN[request.session_hash] = bench


def closed(request: gr.Request) -> None:
    """The tab was closed or reloaded: free its models and merges now.

    gradio keeps a closed tab's state for an hour (in case it reopens); a workbench holds gigabytes,
    so a few reloads would exhaust the memory. The state itself stays, emptied.
    """
    bench = OPEN.pop(request.session_hash, None)
    if bench is not None:
        bench.close()


# Models ---------------------------------------------------------------------------------------------


def scan(bench: Workbench, folder: str):
    """List the checkpoints of ``folder`` (one of the folders allowed at start-up)."""
    bench.models_dir = Path(folder)
    labels = [bench.label(p) for p in bench.checkpoints()]
    base = next((lab for lab in labels if Path(lab).name == "base"), None)
    experts = [
        lab for lab in labels if Path(lab).name.startswith("expert") and Path(lab).parent == Path(base or "").parent
    ][:2]
    if not bench.models_dir.is_dir():
        message = readable(
            ValueError(
                f"folder {folder} does not exist; create it or start the app with --models pointing at your checkpoints"
            )
        )
    elif labels:
        message = f"Found {len(labels)} checkpoint(s) in {folder}."
    else:
        message = f"No checkpoints in {folder}: a checkpoint is a folder with config.json and weights (safetensors, .bin), a .gguf file or a LoRA adapter."
    found = evals.list_tasks(task_folders(bench))
    local = evals.list_tasks(evals.task_dirs(bench.models_dir))
    held_in = gr.update(choices=found, value=local[:3])
    held_out = gr.update(choices=found, value=[t for t in (NEXT_WORD, COPY) if t in found])  # higher is better
    expert_choices = [lab for lab in labels if lab != base]
    return (
        bench,
        bench.catalog(),
        gr.update(choices=[""] + labels, value=base),
        gr.update(choices=expert_choices, value=experts),
        message,
        gr.update(choices=found, value=[]),
        held_in,
        held_out,
    )


def build_tick(job: BackgroundJob, bench: Workbench, folder: str, known: int, *chosen):
    """Poll the demo build: its status line, a rescan when checkpoints appeared, the timer off when done.

    chosen: what is chosen now (base, experts, tasks, held-in and held-out tasks). A rescan adds the new
    checkpoints and tasks to the choices but keeps every choice that is made and still there, and the
    Models tab's status line (a Load's report stays); an empty choice gets the scan's default.
    """
    found = len(bench.checkpoints())
    if found == known:
        return job.status(), found, gr.Timer(active=not job.done), bench, *(gr.update(),) * 7
    bench, catalog, base, experts, _message, *tasks = scan(bench, folder)
    updates = [base, experts, *tasks]
    for update, value in zip(updates, chosen, strict=True):
        kept = [v for v in value if v in update["choices"]] if isinstance(value, list) else value
        if kept and (isinstance(kept, list) or kept in update["choices"]):
            update["value"] = kept
    return job.status(), found, gr.Timer(active=not job.done), bench, catalog, *updates[:2], gr.update(), *updates[2:]


def experts_without_base(bench: Workbench, base: str, experts: list[str]):
    """The expert choices without the chosen base (it cannot be merged into itself)."""
    labels = [bench.label(p) for p in bench.checkpoints()]
    return gr.update(choices=[lab for lab in labels if lab != base], value=[e for e in experts if e != base])


def load(
    bench: Workbench,
    base: str,
    experts: list[str],
    loaded: dict,
    values: dict,
    method: str,
    dtype: str,
    seed: float,
    progress=gr.Progress(),
):
    """Open base and experts; clears every output of the previous models and shows the recipe."""
    root = bench.models_dir
    no_merges = [gr.update(choices=[], value=None), gr.update(choices=[], value=[]), gr.update(choices=[], value=None)]
    cleared = ["", "", None, *no_merges, "", SCORES, SCORES, None, "", ""]
    cleared += inspect_placeholder(
        "Press Refresh (or open this tab after a merge) to inspect the task vectors of the loaded experts.", bench
    )
    try:
        message = bench.load(str(root / base) if base else None, [str(root / e) for e in experts], _progress(progress))
        labels = _labels(bench)
        for label, found in bench.training_metadata().items():
            values.update({f"{name}{KEY_SEP}{label}": value for name, value in found.items()})
            message += f"\n\n{label}: from trainer_state.json " + ", ".join(f"{k} = {v:g}" for k, v in found.items())
    except Exception as e:
        message, labels = readable(e), []
    cleared[1], cleared[2] = current_recipe(bench, values, method, dtype, seed)[0], bench.history_table()
    report = (
        compatibility_report([root / e for e in experts], root / base if base else None)
        if experts
        else pd.DataFrame(columns=REPORT_COLUMNS)
    )
    return bench, {"labels": labels, "version": loaded["version"] + 1}, message, report, *cleared


# Merge ----------------------------------------------------------------------------------------------


def control_keys(spec: registry.MethodSpec, labels: list[str]) -> list[tuple[str, registry.Param]]:
    """(key, param) of every control of ``spec``: global params, then each expert's per-model ones."""
    keys = [(p.name, p) for p in spec.global_params]
    return keys + [(f"{p.name}{KEY_SEP}{label}", p) for label in labels for p in spec.per_model_params]


SET_UNDER = "set under"  # in a tab's values: {control key: the default it had in the method it was set under}


def remember(values: dict, method: str, key: str, value) -> None:
    """Note that control ``key`` of ``method`` now shows ``value``.

    The value carries over to another method's control of that name only when both methods give it the
    same default: ``normalize`` left at dare_ties' False must not turn linear's averaging into a sum.
    """
    spec, name = registry.get(method), key.partition(KEY_SEP)[0]
    values[key] = value
    values.setdefault(SET_UNDER, {})[key] = next((p.default for p in spec.params if p.name == name), None)


def remembered(values: dict, p: registry.Param, key: str):
    """The value the control ``key`` showed last, if set under the same default and valid for ``p``; else the default."""
    if key not in values or values.get(SET_UNDER, {}).get(key, p.default) != p.default:
        return p.default
    try:
        return p.check(values[key], key)
    except ValueError:
        return p.default


def _labels(bench: Workbench) -> list[str]:
    return bench.expert_labels() if bench.session else []


def _settings(bench: Workbench, values: dict, method: str) -> tuple[dict, list[dict]]:
    """(global params, per-model params in load order): the controls' remembered values or defaults."""
    labels = _labels(bench)
    parameters, per_model = {}, [{} for _ in labels]
    for key, p in control_keys(registry.get(method), labels):
        name, _, label = key.partition(KEY_SEP)
        (per_model[labels.index(label)] if label else parameters)[name] = remembered(values, p, key)
    return parameters, per_model


def current_recipe(bench: Workbench, values: dict, method: str, dtype: str, seed: float):
    """(recipe YAML, status): the recipe the controls make now (nothing is merged)."""
    if bench.session is None:
        return "# Load models in the Models tab: the recipe lists them.", gr.update()
    try:
        recipe = bench.recipe_for(method, *_settings(bench, values, method), dtype, int(seed or 0))
    except Exception as e:  # an earlier method's recipe would stay on show
        return "# These settings make no recipe: see the message above.", readable(e)
    text = recipe.to_yaml()
    if bench.recipe is not None and bench.merged is not None and text == bench.recipe.to_yaml():
        return text, gr.update()  # the controls show the current merge: its status stays
    return text, "Settings changed: press Merge (or tick Live)."


def preview(bench: Workbench, values: dict, method: str, dtype: str, seed: float, key: str, value):
    """Remember that control ``key`` now shows ``value``; show the recipe."""
    remember(values, method, key, value)
    return current_recipe(bench, values, method, dtype, seed)


def _merged(bench: Workbench, message: str):
    """What a merge updates: state, status, recipe, history and the merge choices of Inspect/Evaluate."""
    labels = [e.label for e in bench.history]
    current = labels[-1] if labels and bench.merged is not None else None
    recipe = bench.recipe.to_yaml() if bench.recipe else gr.update()
    choices = gr.update(choices=labels, value=current), gr.update(choices=labels, value=[current] if current else [])
    return bench, message, recipe, bench.history_table(), *choices, gr.update(choices=labels, value=None)


def merge(bench: Workbench, values: dict, method: str, dtype: str, seed: float, progress=gr.Progress()):
    """Merge the loaded models with the controls' settings."""
    try:
        parameters, per_model = _settings(bench, values, method)
        message = bench.merge(method, parameters, per_model, dtype, int(seed or 0), _progress(progress))
    except Exception as e:
        message = readable(e)
    return _merged(bench, message)


def live_merge(
    live: bool,
    bench: Workbench,
    values: dict,
    method: str,
    dtype: str,
    seed: float,
    key: str,
    value,
    progress=gr.Progress(),
):
    """When Live is ticked: remember control ``key``'s ``value`` and merge; otherwise nothing changes."""
    if not live or bench.session is None:
        return (bench,) + (gr.update(),) * 6
    remember(values, method, key, value)
    return merge(bench, values, method, dtype, seed, progress=progress)


def import_recipe(bench: Workbench, values: dict, text: str, file: Optional[str], loaded: dict, progress=gr.Progress()):
    """Merge a pasted or uploaded mergekit YAML recipe (loading its models when they are not loaded).

    Returns the merge's outputs, then the per-layer curves of the values the recipe varies (hidden when
    none vary).
    """
    hidden = gr.update(value=None, visible=False)
    try:
        recipe = MergeRecipe.from_yaml(Path(file).read_text() if file else text or "")
        for model in filter(None, [recipe.base_model, *recipe.input_models()]):
            inside_models(bench, model, "the recipe's model")
        message = bench.merge_recipe(recipe, _progress(progress))
    except Exception as e:
        return bench, gr.update(), gr.update(), gr.update(), gr.update(), *_merged(bench, readable(e))[1:], hidden
    labels = _labels(bench)
    for key, value in recipe.parameters.items():
        if is_scalar(value):
            remember(values, recipe.merge_method, key, value)
    for label, entry in zip(labels, recipe.models, strict=not recipe.slices):  # slices: no per-model controls
        for key, value in entry.parameters.items():
            if is_scalar(value):
                remember(values, recipe.merge_method, f"{key}{KEY_SEP}{label}", value)
    curves = hidden
    if recipe.varying() or recipe.slices:
        message += (
            f"\n\nMerged as written, with values per layer or tensor ({', '.join(recipe.varying()) or 'slices'}); "
            "the curves below show them, the controls one value each, so Merge from the controls does not repeat them."
        )
    if recipe.varying():
        figure = recipe_curves_figure(recipe_curves(recipe, bench.require_session().names))
        curves = gr.update(value=figure, visible=True)
    state = {"labels": labels, "version": loaded["version"] + 1}
    controls = recipe.merge_method, recipe.dtype, recipe.seed  # the controls now make this recipe
    return bench, *controls, state, *_merged(bench, message)[1:], curves


CANCELLING = "Cancelling: the running job stops at its next step."  # its own message follows (the sweep)
CANCELLED_MERGE = "Cancelled: the merge stopped; nothing was added to the history. Press Merge to merge again."
CANCELLED_EVALUATION = "Cancelled: scoring stopped; the rows already scored stay in the table."


def cancel(bench: Workbench, said: str = CANCELLING) -> str:
    """Ask the running job to stop at its next step; returns ``said``.

    For a job the click also cancels in gradio (a merge, an evaluation), nothing else answers: ``said``
    is then the final word (``CANCELLED_MERGE``, ``CANCELLED_EVALUATION``).
    """
    bench.cancel_requested = True
    return said


# Inspect --------------------------------------------------------------------------------------------


# id of a browser session's Workbench -> each Inspect panel's figure as last sent (plotly JSON)
_SHOWN: dict[int, dict[str, str]] = {}


def _shown(bench: Workbench) -> dict[str, str]:
    """The figures Inspect last sent to ``bench``'s browser session (forgotten with the Workbench)."""
    if id(bench) not in _SHOWN:
        _SHOWN[id(bench)] = {}
        weakref.finalize(bench, _SHOWN.pop, id(bench), None)
    return _SHOWN[id(bench)]


def inspect_placeholder(message: str, bench: Workbench) -> list:
    """Inspect's outputs when there is nothing to draw: the message, and every panel hidden."""
    _shown(bench).clear()  # the next refresh draws every panel again
    compare = [gr.update(value="", visible=False), gr.update(value=None, visible=False)]
    return [message, *compare] + [gr.update(value=v, visible=False) for _ in plots.PANEL_KEYS for v in ("", None, None)]


def _comparison(bench: Workbench, shown: Optional[str], other: Optional[str]) -> list:
    """Caption and figure comparing merges ``shown`` and ``other`` (hidden unless both are chosen and differ)."""
    entries = {e.label: e for e in bench.history}
    if shown not in entries or other not in entries or shown == other:
        return [gr.update(value="", visible=False), gr.update(value=None, visible=False)]
    first, second = (entries[label] for label in (shown, other))
    table = merge_comparison(
        bench.session.base,
        (f"#{first.number}", bench.merged_tensors(first.number)),
        (f"#{second.number}", bench.merged_tensors(second.number)),
        bench.session.names,
    )
    caption = f"#### Two merges compared\n{first.label} against {second.label}: relative L2 distance of each from the base, and between them, per layer (exact)."
    return [gr.update(value=caption, visible=True), gr.update(value=merge_comparison_figure(table), visible=True)]


def inspect(bench: Workbench, density: float, threshold: str, shown: Optional[str], other: Optional[str] = None):
    """All Inspect panels for the loaded experts and the merge chosen in ``shown``."""
    if bench.session is None or bench.session.base is None:
        return inspect_placeholder("Load a base and experts to inspect their task vectors M_i - B.", bench)
    try:
        value = float(threshold)
        if not 0 < value < 1:
            raise ValueError
    except ValueError:
        return inspect_placeholder(
            readable(ValueError(f"|delta| threshold {threshold!r} is not a number between 0 and 1; try 0.005")), bench
        )
    entry = next((e for e in bench.history if e.label == shown), None)
    merged = bench.merged_tensors(entry.number) if entry else None
    panels = plots.inspect_panels(bench.session, density=density, merged=merged, threshold=value)
    about = f" and merge {entry.label}" if entry else " (no merge chosen)"
    outputs = ["Task vectors of " + ", ".join(bench.label(p) for p in bench.session.model_paths) + about + "."]
    outputs += _comparison(bench, shown, other)
    sent = _shown(bench)
    for panel in panels:
        figure = panel.figure.to_json()
        if sent.get(panel.key) == figure:  # unchanged (after a lambda move: all but the merge's distances)
            outputs += [gr.skip()] * 3  # the browser keeps drawing it: no re-render
            continue
        sent[panel.key] = figure
        csv = DOWNLOADS / f"{panel.key}.csv"
        panel.table.to_csv(csv, index=not isinstance(panel.table.index, pd.RangeIndex))  # a pivot's rows are data
        outputs += [
            gr.update(value=f"#### {panel.title}\n{panel.caption}", visible=True),
            gr.update(value=panel.figure, visible=True),
            gr.update(value=str(csv), visible=True),
        ]
    return outputs


# Evaluate -------------------------------------------------------------------------------------------


ENSEMBLE = "ensemble (experts)"  # the output ensemble's label in the Evaluate tab


def task_folders(bench: Workbench) -> list[Path]:
    """Task folders the Evaluate tab offers: those under the models folder, then the held-out suite."""
    return [*evals.task_dirs(bench.models_dir), heldout_task_dir()]


def _tasks(chosen: list[str], typed: str) -> list[str]:
    """The ticked tasks, then the comma-separated names typed (any lm-eval task), each once."""
    names = [*chosen, *(t.strip() for t in (typed or "").split(",") if t.strip())]
    if not names:
        raise ValueError("choose at least one lm-eval task above, or type a task name")
    return list(dict.fromkeys(names))


def _ensemble_loader(loaders: dict, experts: list[str]):
    """A loader of the output ensemble of ``experts`` (built from their own loaders)."""

    def load():
        members = [loaders[e]() for e in experts]
        return OutputEnsemble([m for m, _ in members]).eval(), members[0][1]

    return load


def evaluate(
    bench: Workbench,
    tasks: list[str],
    typed: str,
    merges: list[str],
    limit: float,
    include_inputs: bool,
    ensemble: bool,
    progress=gr.Progress(),
):
    """lm-eval on the chosen merges (and base, experts, their output ensemble), shown as each result arrives.

    Yields (status, scores table, normalized table, chart, history) after every (model, task).
    """
    try:
        names = _tasks(tasks, typed)
        if limit is None or limit < 0:
            raise ValueError(f"examples per task must be 0 (all) or a positive number, got {limit}")
        evals.check_tasks(names, task_folders(bench))  # a mistyped name leaves the last results on show
        numbers = [e.number for e in bench.history if e.label in (merges or [])]
        loaders = bench.eval_loaders(include_inputs or ensemble, numbers, _progress(progress))
        experts = bench.expert_labels()
        if ensemble:
            loaders[ENSEMBLE] = _ensemble_loader(loaders, experts)
            if not include_inputs:
                loaders = {k: v for k, v in loaders.items() if k not in [*experts, bench.base_label()]}
        stream = evals.score_stream(
            loaders, names, task_folders(bench), int(limit) or None, should_stop=lambda: bench.cancel_requested
        )
        rows, total = [], len(loaders) * len(names)
        message = f"0/{total} scored."
        yield f"Scoring {len(loaders)} model(s) on {', '.join(names)}…", SCORES, SCORES, None, gr.update()
        for rows_done, row in enumerate(stream, start=1):
            rows.append(row)
            table = pd.concat(rows, ignore_index=True)
            progress(rows_done / total, desc=f"{rows_done}/{total} scored")
            message = f"{rows_done}/{total} scored (limit {int(limit) or 'none'})."
            yield (
                message,
                evals.wide_scores(table, stderr=True),
                _normalized(bench, table),
                evals.comparison_chart(table),
                gr.update(),
            )
    except Exception as e:
        yield readable(e), gr.update(), gr.update(), gr.update(), gr.update()
        return
    if rows:
        bench.record_scores(evals.wide_scores(evals.primary(table)))
    done = "Cancelled" if bench.cancel_requested else "Done"
    yield f"{done}: {message}", gr.update(), gr.update(), gr.update(), bench.history_table()


def _normalized(bench: Workbench, table: pd.DataFrame) -> pd.DataFrame:
    return evals.normalized_scores(table, bench.base_label(), bench.expert_labels()).round(3)


def greedy_soup(bench: Workbench, tasks: list[str], typed: str, limit: float, progress=gr.Progress()):
    """Greedy soup (Wortsman et al.) of the loaded experts on the chosen tasks: (status, steps table, soup recipe)."""
    try:
        session = bench.require_session()
        names = _tasks(tasks, typed)
        lines: list[str] = []

        def log(line: str) -> None:
            lines.append(line)
            progress(len(lines) / (2 * len(session.model_ckpts) - 1), desc=line[:80])

        individual, soup = session_greedy_soup(session, names, task_folders(bench), int(limit) or None, log=log)
    except Exception as e:
        return readable(e), gr.update(), gr.update()
    labels = bench.expert_labels()
    steps = pd.DataFrame(
        [{"step": "own score", "model": labels[i], "score": v, "kept": ""} for i, v in individual.items()]
        + [
            {"step": "soup", "model": labels[i], "score": v, "kept": "kept" if k else "left out"}
            for i, v, k in soup.history
        ]
    ).round(4)
    weights = [{"weight": 1.0 if i in soup.ingredients else 0.0} for i in range(len(labels))]
    recipe = session.recipe("linear", {"normalize": True}, weights)
    kept = ", ".join(labels[i] for i in soup.ingredients)
    return f"Greedy soup of {len(soup.ingredients)}: **{kept}**; score {soup.score:.4f}.", steps, recipe.to_yaml()


def playground(bench: Workbench, prompt: str, max_new_tokens: float, progress=gr.Progress()):
    """Greedy continuations of ``prompt`` from base, experts and the current merge, side by side.

    A refusal empties the table: continuations of an earlier prompt are not left under it.
    """
    try:
        if not (prompt or "").strip():
            raise ValueError("type a prompt first")
        if not (max_new_tokens or 0) >= 1:
            raise ValueError(f"New tokens is {max_new_tokens}; give a whole number of at least 1 (e.g. 12)")
        loaders = bench.eval_loaders(True)
        rows = []
        for i, (label, load) in enumerate(loaders.items()):
            progress(i / len(loaders), desc=f"generating with {label}")
            model, tokenizer = load()
            ids = tokenizer(prompt, return_tensors="pt").to(model.device)
            out = model.generate(**ids, max_new_tokens=int(max_new_tokens), do_sample=False)
            rows.append(
                {
                    "model": label,
                    "continuation": tokenizer.decode(out[0, ids.input_ids.shape[1] :], skip_special_tokens=True),
                }
            )
    except Exception as e:
        return readable(e), pd.DataFrame(columns=["model", "continuation"])
    return f"Greedy continuations of {len(rows)} model(s).", pd.DataFrame(rows)


# Export ---------------------------------------------------------------------------------------------


def inside_models(bench: Workbench, path: str, what: str) -> None:
    """Raise ValueError unless ``path`` (absolute) lies inside the models folder.

    The app reads and writes only there (README): ``..`` counts, symbolic links inside the folder are
    not followed (a linked checkpoint is the user's own choice). The CLI and the library have no such limit.
    """
    root, full = os.path.abspath(bench.models_dir), os.path.abspath(path)
    if os.path.commonpath([root, full]) != root:
        raise ValueError(
            f"{what} {full} is outside the models folder {root}: the app reads and writes only inside it; "
            "choose a path inside it (the command line writes anywhere)"
        )


def _export_folder(bench: Workbench, folder: str) -> str:
    """The export folder as typed, refused unless inside the models folder (relative: to that folder)."""
    inside_models(bench, os.path.join(bench.models_dir, os.path.expanduser(folder.strip())), "the export folder")
    return folder


def describe_target(bench: Workbench, folder: str) -> str:
    """Where Save will write, said before anything is written."""
    try:
        return bench.describe_target(_export_folder(bench, folder))
    except Exception as e:
        return readable(e)


def export(bench: Workbench, folder: str, overwrite: bool):
    """Write the current merge and its recipe, inside the models folder."""
    try:
        out = bench.export(_export_folder(bench, folder), overwrite)
    except Exception as e:
        return readable(e), gr.update(), gr.update(), gr.update()
    recipe = DOWNLOADS / "merge_recipe.yaml"
    recipe.write_text(bench.recipe.to_yaml())
    return (
        f"Saved {bench.history[-1].label} to {out}",
        bench.recipe.to_yaml(),
        str(recipe),
        describe_target(bench, folder),
    )
