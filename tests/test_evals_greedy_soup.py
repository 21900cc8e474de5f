"""``python -m evals greedy-soup`` end to end on the demo zoo (lm-eval scores, soups merged in memory, the soup written)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from evals.__main__ import main as evals_main
from explorer.cli import main as explorer_main
from explorer.recipe import MergeRecipe

LIMIT = 10


def test_greedy_soup_keeps_what_does_not_hurt_and_writes_the_soup(zoo_dir: Path, tmp_path: Path, capsys):
    twin = tmp_path / "upper-twin"  # the same weights in another folder: adding it cannot lower the score
    shutil.copytree(zoo_dir / "expert-upper", twin)
    candidates = [zoo_dir / "expert-add", zoo_dir / "expert-upper", twin]
    out = tmp_path / "soup"
    args = [*map(str, candidates), "--task-dir", str(zoo_dir / "tasks"), "--task", "zoo_upper", "--limit", str(LIMIT)]
    assert evals_main(["greedy-soup", *args, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    steps = printed.split("greedy steps:\n")[1].splitlines()[:3]
    # ranked by own score (upper and its twin alike, ties in the given order; add 0.0), then kept if the soup holds
    assert [s.split()[0:2] for s in steps] == [
        ["kept", str(zoo_dir / "expert-upper")],
        ["kept", str(twin)],
        ["left", "out"],
    ]
    assert str(zoo_dir / "expert-add") in steps[2] and "soup score 0.0000" in steps[2]
    upper_score = next(line.split()[1] for line in printed.splitlines() if line.strip().startswith("expert-upper:"))
    assert float(upper_score) >= 0.5  # the upper expert has learnt its task
    assert f"soup of 2: {zoo_dir / 'expert-upper'}, {twin}; score {upper_score}" in printed  # (x + x) / 2 scores as x
    assert f"wrote {out}" in printed

    recipe = MergeRecipe.load(out / "merge_recipe.yaml")
    assert recipe.merge_method == "linear" and [e.model for e in recipe.models] == [
        str(zoo_dir / "expert-upper"),
        str(twin),
    ]
    soup, upper = load_file(out / "model.safetensors"), load_file(zoo_dir / "expert-upper" / "model.safetensors")
    assert soup.keys() == upper.keys() and all(torch.equal(soup[n], upper[n]) for n in soup)  # (x + x) / 2 == x
    AutoModelForCausalLM.from_pretrained(out)
    assert explorer_main(["merge", str(out / "merge_recipe.yaml"), "--out", str(tmp_path / "replayed")]) == 0
    assert (tmp_path / "replayed" / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()


def test_greedy_soup_refuses_before_evaluating(zoo_dir: Path, tmp_path: Path, capsys):
    models = [str(zoo_dir / "expert-add"), str(zoo_dir / "expert-upper")]
    common = ["--task-dir", str(zoo_dir / "tasks"), "--limit", str(LIMIT)]
    cases = [
        ([*models, *common, "--task", "zoo_upper", "--out", str(zoo_dir / "expert-add")], "overlaps input"),
        ([*models, *common, "--task", "zoo_uper", "--out", str(tmp_path / "o")], "zoo_upper"),
        ([models[0], models[0], *common, "--task", "zoo_upper", "--out", str(tmp_path / "o")], "given twice"),
    ]
    for args, message in cases:
        assert evals_main(["greedy-soup", *args]) == 2, args
        assert message in capsys.readouterr().err, args
    assert not (tmp_path / "o").exists()
    with pytest.raises(SystemExit):
        evals_main(["greedy-soup", *models, *common])  # --task is required
