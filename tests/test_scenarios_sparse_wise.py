"""The wise_ft and sparse_soup scenarios on the tiny zoo, with short fine-tunes and few examples.

WiSE-FT: alpha 0 is exactly the base and alpha 1 exactly the expert (same scores, same perplexity).
Sparse soup: the sparse fine-tunes keep every pruned zero and move the rest; with the shared mask
both averages are as sparse as their inputs; with differing masks the sparse soup is at least as
sparse as either input and the linear average less sparse than either.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from evals.scenarios import run_scenario, sparse_soup, wise_ft
from evals.scenarios.report import score_models, to_markdown
from explorer.zoo.sparse_finetune import decoder_matrix
from explorer.zoo.testbed import load_model, tiny_testbed

LIMIT = 10  # held-out examples per task
STEPS = 20  # sparse fine-tune steps per task (the zoo's experts: 400)


@pytest.fixture(scope="module")
def bed(zoo_dir: Path):
    full = tiny_testbed(zoo_dir)
    return replace(full, finetune=replace(full.finetune, steps=dict.fromkeys(full.finetune.steps, STEPS)))


@pytest.fixture(scope="module")
def wise_table(bed, tmp_path_factory: pytest.TempPathFactory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(wise_ft, "HELDOUT_MODULES", ("json", "csv"))  # ~5,000 characters
        (table,) = run_scenario("wise_ft", bed, tmp_path_factory.mktemp("work"), LIMIT, lambda _: None)
        return table, wise_ft.heldout_text()


@pytest.fixture(scope="module")
def sparse_run(bed, tmp_path_factory: pytest.TempPathFactory):
    work = tmp_path_factory.mktemp("work")
    return run_scenario("sparse_soup", bed, work, LIMIT, lambda _: None), work / "sparse_soup"


def test_wise_ft_curve_ends_are_base_and_expert(bed, wise_table, one_thread):
    table, text = wise_table
    scores = table.scores
    assert list(scores["alpha"]) == list(wise_ft.ALPHAS)
    held_in = next(iter(bed.experts))
    tasks = [bed.lm_eval_tasks[t] for t in bed.experts]
    columns = [f"{tasks[0]} (held-in)", *tasks[1:]]
    for row, folder in ((0, bed.base), (-1, bed.experts[held_in])):
        model, tokenizer = load_model(folder)
        alone = score_models({"m": lambda m=model, t=tokenizer: (m, t)}, tasks, bed.task_dir, LIMIT)
        assert [scores.iloc[row][c] for c in columns] == [alone.iloc[0][t] for t in tasks]
        assert scores.iloc[row][wise_ft.PPL] == wise_ft.text_perplexity(model, tokenizer, text)
    assert scores.iloc[-1][columns[0]] > scores.iloc[0][columns[0]]  # the expert learned its task
    assert "#### WiSE-FT" in to_markdown(table)


def test_sparse_fine_tunes_keep_the_pruned_zeros(bed, sparse_run):
    _, work = sparse_run
    pruned = load_file(work / f"pruned-{sparse_soup.SPARSITY}" / "model.safetensors")
    for task in list(bed.experts)[:2]:
        tuned = load_file(work / f"sparse-{sparse_soup.SPARSITY}-{task}" / "model.safetensors")
        matrices = [n for n, t in pruned.items() if decoder_matrix(n, t)]
        assert matrices
        for name in matrices:
            zero = pruned[name] == 0
            assert zero.float().mean().item() == pytest.approx(sparse_soup.SPARSITY, abs=1e-3)
            assert torch.all(tuned[name][zero] == 0), name
            assert torch.all(tuned[name][~zero] != 0), name
        assert any(not torch.equal(tuned[n], pruned[n]) for n in matrices)  # it did train


def test_sparse_soup_keeps_sparsity_the_naive_average_loses_it(bed, sparse_run):
    (shared, differing), _ = sparse_run
    tasks = list(bed.experts)[:2]
    labels = [f"sparse FT {t}" for t in tasks]
    merges = [m.split(" (")[0] for m in sparse_soup.MERGES]
    assert [m.split(" (")[0] for m in shared.scores["model"]] == ["base", "pruned base", *labels, *merges]
    assert [m.split(" (")[0] for m in differing.scores["model"]] == [*labels, *merges]

    def sparsity(table, prefix):
        return table.scores.loc[table.scores["model"].str.startswith(prefix), sparse_soup.SPARSE].tolist()

    inputs = sparsity(shared, "sparse FT")
    assert inputs[0] == inputs[1] == sparsity(shared, "pruned base")[0]
    assert sparsity(shared, "sparse soup") == sparsity(shared, "linear average") == [inputs[0]]
    assert sparsity(shared, "base")[0] < 1.0
    inputs = sparsity(differing, "sparse FT")
    assert min(inputs) >= 100 * sparse_soup.REPRUNE - 0.1
    assert sparsity(differing, "sparse soup")[0] > max(inputs)
    assert sparsity(differing, "linear average")[0] < min(inputs)
    assert shared.settings["mask agreement (Jaccard)"] == "1.000"
    assert float(differing.settings["mask agreement (Jaccard)"]) < 1.0
