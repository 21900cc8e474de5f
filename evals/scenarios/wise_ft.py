"""WiSE-FT: the base-expert interpolation curve, held-in gain against held-out loss.

WiSE-FT (Wortsman et al., arXiv:2109.01903) interpolates the zero-shot model B and its fine-tune M,
``(1 - alpha) B + alpha M``, and finds intermediate alphas that keep most of the fine-tune's gain on
its own task while losing less of what the base was good at. Here B is the testbed's base and M its
first expert; every alpha is merged in memory (``explorer.session.MergeSession``, method
``wise_ft``) and scored on

- the expert's own task (held-in) and the other experts' tasks (held-out), with lm-eval;
- generic English text neither model was tuned on: the docstrings of a fixed list of standard-library
  modules (``heldout_text``; not part of ``pydoc_data.topics``, the text the zoo's base was
  pre-trained on and the tasks' words come from), as perplexity per token of the model's tokenizer.
  On SmolLM2 the base scores ~0 on every expert task, so this is where its general skill shows.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import torch
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from evals.scenarios.report import ScenarioTable, score_models
from explorer.session import MergeSession
from explorer.zoo.testbed import Testbed

ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)  # the curve's points; 0 is the base, 1 the expert
HELDOUT_MODULES = (  # stdlib modules with long docstrings (~29,000 characters together on Python 3.11)
    "argparse json collections itertools subprocess unittest csv heapq difflib string random inspect re typing "
    "doctest statistics"
).split()
BLOCK = 128  # tokens per perplexity window (within the tiny zoo's 256 positions)
PPL = "docstring ppl"  # the perplexity column


def heldout_text() -> str:
    """The docstrings of ``HELDOUT_MODULES``, joined by blank lines: generic text no model here trained on."""
    return "\n\n".join(importlib.import_module(m).__doc__.strip() for m in HELDOUT_MODULES)


@torch.no_grad()
def text_perplexity(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, text: str, block: int = BLOCK, batch_size: int = 8
) -> float:
    """Perplexity of ``model`` on ``text``: exp of the mean next-token loss in nats per token.

    The text is tokenized once (no special tokens) and cut into consecutive windows of ``block``
    tokens (the last, shorter one dropped); every token after the first of a window is predicted,
    so ``n_windows * (block - 1)`` tokens are scored. Deterministic for given weights.
    """
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
    windows = ids[: len(ids) // block * block].view(-1, block)  # (W, block)
    total, count = 0.0, 0
    for start in range(0, len(windows), batch_size):
        x = windows[start : start + batch_size]  # (B, block)
        logits = model(input_ids=x).logits[:, :-1].float()  # (B, block-1, V)
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"
        )
        total, count = total + float(nll), count + x[:, 1:].numel()
    return math.exp(total / count)


def run(bed: Testbed, work: Path, limit: int | None, log: Callable[[str], None]) -> list[ScenarioTable]:
    """Score ``wise_ft`` merges of the base and the first expert at every alpha in ``ALPHAS``.

    Returns one table: a row per alpha with the held-in task, the held-out tasks (and their mean),
    the docstring perplexity and ``n``; also written to ``work/wise_ft.csv``.
    """
    held_in, *held_out = bed.experts
    tasks = [bed.lm_eval_tasks[t] for t in (held_in, *held_out)]
    session = MergeSession(bed.base, [bed.experts[held_in]])
    tokenizer = AutoTokenizer.from_pretrained(bed.base)
    text = heldout_text()
    rows = []
    for alpha in ALPHAS:
        model = session.build_model(session.merge(session.recipe("wise_ft", {"alpha": alpha}, [{}])))
        label = f"alpha={alpha:.2f}" + {0.0: " (base)", 1.0: f" (expert-{held_in})"}.get(alpha, "")
        row = score_models({label: lambda m=model: (m, tokenizer)}, tasks, bed.task_dir, limit)
        row.insert(1, "alpha", alpha)
        row[PPL] = text_perplexity(model, tokenizer, text)
        log(f"{label}: " + ", ".join(f"{t} {row[t].iloc[0]:.2f}" for t in tasks) + f", {PPL} {row[PPL].iloc[0]:.2f}")
        rows.append(row)
        del model
    scores = pd.concat(rows, ignore_index=True)
    scores.insert(scores.columns.get_loc("n"), "held-out mean", scores[tasks[1:]].mean(axis=1))
    scores = scores.rename(
        columns={tasks[0]: f"{tasks[0]} (held-in)", f"{tasks[0]} stderr": f"{tasks[0]} (held-in) stderr"}
    )
    scores.to_csv(work / "wise_ft.csv", index=False)
    return [
        ScenarioTable(
            title=f"WiSE-FT: base to expert-{held_in}, (1 - alpha) base + alpha expert",
            scores=scores,
            note=curve_note(scores, f"{tasks[0]} (held-in)"),
            settings={
                "method": "wise_ft (in memory)",
                "held-in": tasks[0],
                "held-out": ", ".join(tasks[1:]),
                PPL: f"perplexity per token on {len(text):,} characters of stdlib module docstrings, "
                f"windows of {BLOCK} tokens (lower is better)",
            },
        )
    ]


def curve_note(scores: pd.DataFrame, held_in: str) -> str:
    """One sentence from the curve: the ends, and what alpha = 0.5 keeps of the gain and the perplexity."""
    first, last = scores.iloc[0], scores.iloc[-1]
    middle = scores.loc[scores["alpha"] == 0.5].iloc[0]
    gain = last[held_in] - first[held_in]
    kept = f"{(middle[held_in] - first[held_in]) / gain:.0%} of the held-in gain" if gain > 0 else "no held-in gain"
    return (
        f"From alpha 0 (base) to 1 (expert), {held_in} goes {first[held_in]:.2f} -> {last[held_in]:.2f}, the "
        f"held-out mean {first['held-out mean']:.2f} -> {last['held-out mean']:.2f} and the {PPL} "
        f"{first[PPL]:.2f} -> {last[PPL]:.2f}; alpha 0.5 keeps {kept} at {PPL} {middle[PPL]:.2f}."
    )
