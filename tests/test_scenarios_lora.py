"""Scenario "lora" on the tiny zoo: valid PEFT adapters, cat adapter merge = folded task arithmetic, the table.

The LoRA experts train 30 steps each (the product trains the set's full-expert steps); every model is
scored on the first 20 held-out examples. About 60 s on one busy core.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from evals.scenarios import lora, run_scenario
from explorer.zoo.lora_experts import load_folded, lora_info
from explorer.zoo.testbed import load_model, tiny_testbed
from tests.helpers import assert_expected

STEPS = 30
LIMIT = 20


@pytest.fixture(scope="module")
def scenario(zoo_dir, tmp_path_factory):
    """(testbed with 30 fine-tuning steps, work folder of the scenario, its tables)."""
    bed = tiny_testbed(zoo_dir)
    bed = replace(bed, finetune=replace(bed.finetune, steps=dict.fromkeys(bed.finetune.steps, STEPS)))
    work = tmp_path_factory.mktemp("scenarios")
    tables = run_scenario("lora", bed, work, LIMIT, log=lambda line: None)
    return bed, work / "lora", tables


def test_lora_experts_are_peft_adapter_folders_of_the_base(scenario):
    bed, work, _ = scenario
    base_state = load_model(bed.base)[0].state_dict()
    for task in list(bed.experts)[:2]:
        folder = lora.adapter_dir(work, task)
        config = json.loads((folder / "adapter_config.json").read_text())
        assert config["peft_type"] == "LORA" and config["r"] == lora.SETTINGS.r
        assert config["base_model_name_or_path"] == str(bed.base.resolve())
        tensors = load_file(folder / "adapter_model.safetensors")
        assert lora_info(folder)["trainable_parameters"] == sum(t.numel() for t in tensors.values())
        b_factors = [t for k, t in tensors.items() if "lora_B" in k]
        assert len(b_factors) == 4 * len(lora.SETTINGS.target_modules)  # every projection of the 4 layers
        assert all(t.abs().max() > 0 for t in b_factors)  # trained: B starts at zero
        peft_model = PeftModel.from_pretrained(load_model(bed.base)[0], str(folder))
        assert len(peft_model.peft_config) == 1
        folded = load_folded(bed.base, folder)[0].state_dict()
        assert not torch.equal(
            folded["model.layers.0.self_attn.q_proj.weight"], base_state["model.layers.0.self_attn.q_proj.weight"]
        )
        assert torch.equal(folded["model.embed_tokens.weight"], base_state["model.embed_tokens.weight"])


def test_cat_adapter_merge_equals_folded_task_arithmetic(scenario, one_thread):
    """B1 A1 + B2 A2 two ways: PEFT folds the cat adapter; the session merges the folded experts."""
    bed, work, _ = scenario
    adapters = [lora.adapter_dir(work, task) for task in list(bed.experts)[:2]]
    cat = load_folded(bed.base, lora.merged_adapter_dir(work, "cat"))[0].state_dict()
    session = lora.folded_session(bed, adapters)
    recipe = session.recipe("task_arithmetic", {}, [{"weight": 1.0}] * 2)
    merged = session.merge(recipe)
    assert set(merged) <= set(cat)
    for name, tensor in merged.items():
        assert_expected(cat[name], tensor)
    base = session.base["model.layers.1.mlp.down_proj.weight"]
    assert not torch.allclose(merged["model.layers.1.mlp.down_proj.weight"], base)  # not an identity of zeros


def test_table_rows_and_ranks(scenario):
    bed, _, tables = scenario
    (table,) = tables
    frame = table.scores
    tasks = [bed.lm_eval_tasks[t] for t in list(bed.experts)[:2]]
    experts = [f"LoRA expert {t} (folded)" for t in list(bed.experts)[:2]]
    assert list(frame["model"]) == ["base", *experts, *lora.ADAPTER_MERGES, *lora.FOLDED_MERGES]
    r = lora.SETTINGS.r
    assert list(frame["rank"]) == ["-", str(r), str(r), str(2 * r), str(r), str(r), "full", "full"]
    assert (frame["n"] == LIMIT).all()
    for task in tasks:
        assert frame[task].between(0, 1).all() and f"{task} stderr" in frame
    scores = frame.set_index("model")[tasks]
    gap = (scores.loc[list(lora.ADAPTER_MERGES)[0]] - scores.loc[list(lora.FOLDED_MERGES)[0]]).abs()
    assert (gap <= 1 / LIMIT).all()  # the same weights: at most one greedy tie flipped by rounding
