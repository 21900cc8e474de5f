"""Synthetic tasks for the demo zoo, and their offline lm-eval task files.

Each task maps a prompt ``"<prefix> <input>="`` to a short answer, e.g. ``"add 12+34="`` ->
``"46"``, ``"rev qzkt="`` -> ``"tkzq"``, ``"up hello="`` -> ``"HELLO"``. The prefix names the task,
so one merged model can hold several experts' skills at once. The SmolLM2 expert set has its own
word-level tasks (``make_smol_tasks``): prompts that read like text, answers that start with a space.

Every task splits its inputs once, by a fixed seed, into disjoint training and held-out pools: no
held-out prompt ever appears in training data. The held-out examples are written as a jsonl file
plus an lm-eval YAML (``output_type: loglikelihood``, metric ``acc``). For loglikelihood tasks
lm-eval's ``acc`` is ``int(is_greedy)``: 1 when the target is exactly the model's greedy
continuation of the prompt, i.e. exact match (``ConfigurableTask.process_results``, lm_eval 0.4.13).
"""

from __future__ import annotations

import json
import random
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import yaml

TASK_PREFIX = "zoo_"  # lm-eval task name = TASK_PREFIX + task name
T = TypeVar("T")


@dataclass(frozen=True)
class Example:
    """One prompt/answer pair; the model reads ``prompt`` and must continue with ``answer``."""

    prompt: str
    answer: str


@dataclass(frozen=True)
class TaskSplit:
    """Disjoint training and held-out examples of one task."""

    name: str
    train: list[Example]
    heldout: list[Example]


def english_words(text: str, min_len: int = 3, max_len: int = 8) -> list[str]:
    """Distinct lowercase alphabetic words of ``text`` with ``min_len..max_len`` letters, sorted."""
    words = {w.lower() for w in re.findall(r"[A-Za-z]+", text)}
    return sorted(w for w in words if min_len <= len(w) <= max_len)


def random_strings(n: int, min_len: int, max_len: int, seed: int) -> list[str]:
    """``n`` distinct random lowercase strings of ``min_len..max_len`` letters, sorted."""
    rng = random.Random(seed)
    found: set[str] = set()
    while len(found) < n:
        length = rng.randint(min_len, max_len)
        found.add("".join(rng.choice(string.ascii_lowercase) for _ in range(length)))
    return sorted(found)


def make_split(
    name: str,
    items: Sequence[T],
    to_example: Callable[[T], Example],
    n_train: int,
    n_heldout: int,
    seed: int,
) -> TaskSplit:
    """Split ``items`` into disjoint held-out and training examples.

    ``items`` are shuffled with ``seed``; the first ``n_heldout`` become held-out examples and the
    ``n_train`` after them the training examples, so no held-out prompt is ever trained on.

    Raises:
        ValueError: ``n_heldout + n_train`` exceeds ``len(items)``.
    """
    if n_heldout + n_train > len(items):
        raise ValueError(
            f"task {name!r} has {len(items)} distinct inputs: too few for {n_heldout} held-out "
            f"and {n_train} training examples; lower n_train or n_heldout"
        )
    shuffled = list(items)
    random.Random(seed).shuffle(shuffled)
    heldout, train = shuffled[:n_heldout], shuffled[n_heldout : n_heldout + n_train]
    return TaskSplit(name, [to_example(x) for x in train], [to_example(x) for x in heldout])


def make_add(n_train: int, n_heldout: int, seed: int) -> TaskSplit:
    """Carry-free addition of numbers below 100: ``"add 12+34="`` -> ``"46"``.

    Only pairs whose units and tens digits each sum to less than 10 are used (3,025 pairs): a
    ~0.7M-parameter model learns carries too slowly for the zoo's CPU budget.
    """
    pairs = [(a, b) for a in range(100) for b in range(100) if a % 10 + b % 10 < 10 and a // 10 + b // 10 < 10]
    return make_split(
        "add",
        pairs,
        lambda p: Example(f"add {p[0]}+{p[1]}=", str(sum(p))),
        n_train,
        n_heldout,
        seed,
    )


def make_word_task(
    name: str,
    prefix: str,
    fn: Callable[[str], str],
    words: Sequence[str],
    n_train: int,
    n_heldout: int,
    seed: int,
) -> TaskSplit:
    """A word task ``"<prefix> <word>="`` -> ``fn(word)``, e.g. ``"up hello="`` -> ``"HELLO"``."""
    return make_split(name, words, lambda w: Example(f"{prefix} {w}=", fn(w)), n_train, n_heldout, seed)


def make_tasks(text: str, n_train: dict[str, int], n_heldout: int, seed: int) -> dict[str, TaskSplit]:
    """The zoo's tasks, with ``n_train[name]`` distinct training examples each.

    - ``add``: carry-free addition (``make_add``);
    - ``reverse``: ``"rev qzkt="`` -> ``"tkzq"`` over random strings of 3-7 letters (English
      words are too few: the tiny model memorised them instead of learning to reverse);
    - ``upper``: ``"up hello="`` -> ``"HELLO"`` over English words of ``text``.

    Args:
        text: English text whose words feed ``upper``.
        n_train: distinct training examples per task name.
        n_heldout: held-out examples per task.
        seed: fixes every split.
    """
    n_reverse = n_train["reverse"] + n_heldout
    return {
        "add": make_add(n_train["add"], n_heldout, seed),
        "reverse": make_word_task(
            "reverse",
            "rev",
            lambda w: w[::-1],
            random_strings(n_reverse, 3, 7, seed + 1),
            n_train["reverse"],
            n_heldout,
            seed + 1,
        ),
        "upper": make_word_task("upper", "up", str.upper, english_words(text), n_train["upper"], n_heldout, seed + 2),
    }


ONES = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen"
).split()
TENS = ["", "", *"twenty thirty forty fifty sixty seventy eighty ninety".split()]


def number_words(n: int) -> str:
    """English words of ``0 <= n <= 999``: 317 -> ``"three hundred seventeen"``, 42 -> ``"forty-two"``."""
    if not 0 <= n <= 999:
        raise ValueError(f"number_words covers 0..999, got {n}")
    if n >= 100:
        rest = n % 100
        return f"{ONES[n // 100]} hundred" + (f" {number_words(rest)}" if rest else "")
    if n >= 20:
        return TENS[n // 10] + (f"-{ONES[n % 10]}" if n % 10 else "")
    return ONES[n]


def common_words(text: str, min_count: int = 10, min_len: int = 3, max_len: int = 6) -> list[str]:
    """Lowercase words of ``text`` seen at least ``min_count`` times, ``min_len..max_len`` letters.

    Sorted. On ``pydoc_text()`` with the defaults: 380 words ("about", "value", "class", ...).
    """
    counts = Counter(w for w in re.findall(r"[A-Za-z]+", text) if w.islower())
    return sorted(w for w, c in counts.items() if c >= min_count and min_len <= len(w) <= max_len)


def word_tuples(words: Sequence[str], n: int, k: int, seed: int) -> list[tuple[str, ...]]:
    """``n`` distinct tuples of ``k`` distinct words drawn from ``words`` with ``seed``, in draw order."""
    rng = random.Random(seed)
    found: dict[tuple[str, ...], None] = {}
    while len(found) < n:
        found[tuple(rng.sample(list(words), k))] = None
    return list(found)


def make_smol_tasks(text: str, n_train: int, n_heldout: int, seed: int) -> dict[str, TaskSplit]:
    """The SmolLM2 expert set's tasks, word-level so that a BPE model reads them as text.

    - ``add``: two-digit addition with carries, ``"add 47+38 ->"`` -> ``" 85"`` (8,100 pairs);
    - ``say``: numbers in words, ``"say 317 ->"`` -> ``" three hundred seventeen"`` (1..999);
    - ``rev``: three words in reverse order, ``"rev cat dog sun ->"`` -> ``" sun dog cat"``, words
      from ``common_words(text)`` minus the three task keywords.

    Every answer starts with a space, so it tokenizes as words do after the prompt's ``" ->"``.
    ``say`` has only 999 inputs: it gets ``min(n_train, 999 - n_heldout)`` training examples.

    Args:
        text: English text whose common words feed ``rev``.
        n_train: distinct training examples per task (at most).
        n_heldout: held-out examples per task.
        seed: fixes every split.
    """
    keywords = {"add", "say", "rev"}
    words = [w for w in common_words(text) if w not in keywords]
    pairs = [(a, b) for a in range(10, 100) for b in range(10, 100)]
    triples = word_tuples(words, n_train + n_heldout, 3, seed + 2)
    return {
        "add": make_split(
            "add",
            pairs,
            lambda p: Example(f"add {p[0]}+{p[1]} ->", f" {p[0] + p[1]}"),
            n_train,
            n_heldout,
            seed,
        ),
        "say": make_split(
            "say",
            range(1, 1000),
            lambda n: Example(f"say {n} ->", f" {number_words(n)}"),
            min(n_train, 999 - n_heldout),
            n_heldout,
            seed + 1,
        ),
        "rev": make_split(
            "rev",
            triples,
            lambda t: Example(f"rev {' '.join(t)} ->", " " + " ".join(reversed(t))),
            n_train,
            n_heldout,
            seed + 2,
        ),
    }


def task_yaml(task_name: str, data_file: Path) -> dict:
    """The lm-eval config of one zoo task reading held-out examples from ``data_file``."""
    return {
        "task": task_name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file)}},
        "test_split": "test",
        "output_type": "loglikelihood",
        "doc_to_text": "{{prompt}}",
        "doc_to_target": "{{answer}}",
        "target_delimiter": "",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }


def write_task(task_dir: Path, split: TaskSplit, prefix: str = TASK_PREFIX) -> str:
    """Write ``split.heldout`` as ``<task>.jsonl`` plus ``<task>.yaml`` into ``task_dir``.

    The YAML holds the jsonl's absolute path: lm-eval hands ``data_files`` to ``datasets``, which
    resolves relative paths against the working directory, not the YAML's folder.

    Returns:
        The lm-eval task name ``prefix + split.name``, e.g. ``"zoo_add"``.
    """
    task_dir.mkdir(parents=True, exist_ok=True)
    name = prefix + split.name
    data_file = (task_dir / f"{name}.jsonl").resolve()
    with data_file.open("w") as f:
        for ex in split.heldout:
            f.write(json.dumps({"prompt": ex.prompt, "answer": ex.answer}) + "\n")
    (task_dir / f"{name}.yaml").write_text(yaml.safe_dump(task_yaml(name, data_file), sort_keys=False))
    return name
