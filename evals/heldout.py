r"""Held-out tasks no expert trained on: next-word choice, word copying, and perplexity on unseen text.

"What Matters for Model Merging at Scale" (Yadav et al. 2024) scores merges on the experts' own tasks
(held-in) and on tasks none of them trained on (held-out). The demo experts train on synthetic tasks
built from Python's language reference (``pydoc_data.topics``); these tasks are built from other
text every Python ships: the docstrings of standard-library modules and their public classes and
functions (``HELDOUT_MODULES``). Three kinds, as lm-eval YAML + jsonl written once per Python version
into a cache folder (``heldout_task_dir``):

- ``heldout_next_word`` (``multiple_choice``): a docstring paragraph's first words; choose its next word
  among four (three distractors drawn from later in the same paragraph). Metrics acc and acc_norm (chance 0.25).
- ``heldout_copy`` (``generate_until``): ``"Repeat: w1 w2 w3\nAgain:"`` -> ``" w1 w2 w3"``; metric
  exact_match after lm-eval's ``remove_whitespace`` filter and a cut at the first newline.
- ``heldout_docs_ppl`` (``loglikelihood_rolling``): whole docstring paragraphs; word_perplexity,
  byte_perplexity and bits_per_byte (lower is better).
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import os
import random
import re
import sys
from pathlib import Path

import yaml

HELDOUT_MODULES = (
    "argparse asyncio bisect calendar collections contextlib csv dataclasses datetime decimal difflib doctest "
    "email enum fractions functools glob hashlib heapq inspect ipaddress itertools json logging operator optparse "
    "pathlib pdb pickle pprint queue random re sched shutil socket statistics string struct subprocess tarfile "
    "tempfile textwrap threading timeit typing unittest uuid zipfile"
).split()
NEXT_WORD, COPY, PERPLEXITY = "heldout_next_word", "heldout_copy", "heldout_docs_ppl"
HELDOUT_TASKS = (NEXT_WORD, COPY, PERPLEXITY)
N_EXAMPLES = 200  # per task (perplexity: paragraphs)
SEED = 0
PPL_CHARS = 600  # characters of each perplexity paragraph (~150 tokens)
WORD = re.compile(r"[A-Za-z]{3,12}")


def heldout_task_dir(cache: str | Path | None = None) -> Path:
    """The folder of the held-out tasks' YAML and jsonl files, written on first use (about a second).

    Args:
        cache: parent folder; default ``$XDG_CACHE_HOME`` (or ``~/.cache``) ``/merge-explorer``.

    Returns:
        ``<cache>/heldout-<hash>``; the hash covers the Python version and this module's settings, so a
        different interpreter (whose docstrings differ) gets its own folder, and files are never mixed.
    """
    root = Path(cache) if cache else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "merge-explorer"
    key = hashlib.sha256(f"{sys.version}|{HELDOUT_MODULES}|{N_EXAMPLES}|{SEED}|{PPL_CHARS}|3".encode()).hexdigest()[:12]
    folder = root / f"heldout-{key}"
    if not (folder / f"{PERPLEXITY}.yaml").is_file():
        _write_tasks(folder)
    return folder


def docstring_paragraphs() -> list[str]:
    """Paragraphs (>= 200 characters) of the docstrings of ``HELDOUT_MODULES`` and their public members, in order."""
    paragraphs = []
    for name in HELDOUT_MODULES:
        module = importlib.import_module(name)
        members = [module] + [
            obj
            for attr, obj in sorted(vars(module).items())
            if not attr.startswith("_")
            and (inspect.isfunction(obj) or inspect.isclass(obj))
            and getattr(obj, "__module__", None) == name
        ]
        for obj in members:
            for paragraph in (inspect.getdoc(obj) or "").split("\n\n"):
                text = " ".join(paragraph.split())
                if len(text) >= 200 and not text.startswith(">>>"):
                    paragraphs.append(text)
    return paragraphs


def _next_word_docs(paragraphs: list[str], rng: random.Random) -> list[dict]:
    """Distractors come from the same paragraph, so all four choices are on topic."""
    docs = []
    for paragraph in rng.sample(paragraphs, len(paragraphs)):
        words = paragraph.split()
        cut = rng.randint(6, min(20, len(words) - 1))
        answer = words[cut]
        others = sorted({w for w in words[cut + 1 :] if WORD.fullmatch(w) and w.lower() != answer.lower()})
        if not WORD.fullmatch(answer) or len(others) < 3:
            continue
        distractors = rng.sample(others, 3)
        choices = [answer, *distractors]
        rng.shuffle(choices)
        docs.append({"context": " ".join(words[:cut]), "choices": choices, "gold": choices.index(answer)})
        if len(docs) == N_EXAMPLES:
            break
    return docs


def _copy_docs(paragraphs: list[str], rng: random.Random) -> list[dict]:
    words = sorted({w.lower() for p in paragraphs for w in WORD.findall(p)})
    docs = []
    for _ in range(N_EXAMPLES):
        phrase = " ".join(rng.sample(words, rng.randint(2, 4)))
        docs.append({"prompt": f"Repeat: {phrase}\nAgain:", "answer": phrase})
    return docs


def _task_configs() -> dict[str, dict]:
    """The lm-eval YAML of each held-out task (``data_files`` relative: resolved beside the YAML)."""

    def dataset(task: str) -> dict:
        return {
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": f"{task}.jsonl"}},
            "test_split": "test",
        }

    return {
        NEXT_WORD: {
            "task": NEXT_WORD,
            **dataset(NEXT_WORD),
            "output_type": "multiple_choice",
            "doc_to_text": "{{context}}",
            "doc_to_choice": "{{choices}}",
            "doc_to_target": "{{gold}}",
            "target_delimiter": " ",
            "metric_list": [
                {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
            ],
        },
        COPY: {
            "task": COPY,
            **dataset(COPY),
            "output_type": "generate_until",
            "doc_to_text": "{{prompt}}",
            "doc_to_target": "{{answer}}",
            "generation_kwargs": {"until": ["\n"], "max_gen_toks": 24, "do_sample": False},
            "filter_list": [{"name": "remove_whitespace", "filter": [{"function": "remove_whitespace"}]}],
            "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
        },
        PERPLEXITY: {
            "task": PERPLEXITY,
            **dataset(PERPLEXITY),
            "output_type": "loglikelihood_rolling",
            "doc_to_text": "",
            "doc_to_target": "{{text}}",
            "metric_list": [
                {"metric": "word_perplexity"},
                {"metric": "byte_perplexity"},
                {"metric": "bits_per_byte"},
            ],
        },
    }


def _write_tasks(folder: Path) -> None:
    """Write every held-out task's jsonl and YAML into ``folder`` (via a temporary folder renamed when complete)."""
    paragraphs = docstring_paragraphs()
    rng = random.Random(SEED)
    data = {
        NEXT_WORD: _next_word_docs(paragraphs, rng),
        COPY: _copy_docs(paragraphs, rng),
        PERPLEXITY: [{"text": p[:PPL_CHARS]} for p in random.Random(SEED).sample(paragraphs, N_EXAMPLES)],
    }
    tmp = folder.with_name(f".{folder.name}.partial-{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    for task, config in _task_configs().items():
        (tmp / f"{task}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in data[task]))
        (tmp / f"{task}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    try:
        tmp.rename(folder)
    except OSError:  # another process wrote it first: theirs is identical
        for f in tmp.iterdir():
            f.unlink()
        tmp.rmdir()
