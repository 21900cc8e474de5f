"""``python -m explorer prune`` and ``average-run`` end to end on tiny checkpoints."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from explorer.cli import main
from explorer.prune import (
    PRUNE_REPORT,
    model_cutoff,
    prune_masks,
    prune_state_dict,
    sparsity,
)
from explorer.recipe import MergeRecipe
from tests.tiny import save_tiny_llama
from tests.tiny_formats import trainer_run


def _files(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _state(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("prune") / "model", seed=3)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("run")
    base = save_tiny_llama(root / "base")
    return trainer_run(root / "run", base, steps=(10, 20, 30, 40))


def _no_leftovers(parent: Path) -> None:
    assert not [p.name for p in parent.iterdir() if p.name.startswith(".")], "a temporary folder was left behind"


# prune -----------------------------------------------------------------------------------------


def test_prune_per_tensor_loads_with_the_expected_sparsity(model: Path, tmp_path: Path, capsys):
    before = _files(model)
    out = tmp_path / "pruned"
    assert main(["prune", str(model), "--sparsity", "0.5", "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    assert _files(model) == before  # the input is only read
    _no_leftovers(tmp_path)

    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(loaded, LlamaForCausalLM)
    original, pruned = _state(model), _state(out)
    assert pruned.keys() == original.keys()
    expected = prune_state_dict(original, 0.5)
    for name, t in pruned.items():
        assert t.dtype == original[name].dtype
        assert torch.equal(t, expected[name]), name
        if t.dim() >= 2:
            assert sparsity(t) == round(0.5 * t.numel()) / t.numel(), name
            kept = t != 0
            assert original[name][~kept].abs().max() <= original[name][kept].abs().min()
        else:
            assert torch.equal(t, original[name]), name  # norms are copied
    report = json.loads((out / PRUNE_REPORT).read_text())
    assert report["scope"] == "tensor" and report["sparsity_after"] == pytest.approx(0.5, abs=1e-3)
    assert sorted(report["kept_tensors"]) == sorted(n for n, t in original.items() if t.dim() < 2)
    assert {"config.json", "README.md", "merge_manifest.json"} <= {p.name for p in out.iterdir()}


def test_prune_model_scope_uses_one_cutoff_over_all_matrices(model: Path, tmp_path: Path):
    out = tmp_path / "pruned"
    assert main(["prune", str(model), "--sparsity", "0.7", "--scope", "model", "--out", str(out)]) == 0
    original, pruned = _state(model), _state(out)
    matrices = [n for n, t in original.items() if t.dim() >= 2]
    total = sum(original[n].numel() for n in matrices)
    zeros = sum(int((pruned[n] == 0).sum()) for n in matrices)
    assert zeros == round(0.7 * total)
    kept_min = min(original[n][pruned[n] != 0].abs().min() for n in matrices)
    dropped_max = max(original[n][pruned[n] == 0].abs().max() for n in matrices)
    assert dropped_max <= kept_min
    per_tensor = {round(sparsity(pruned[n]), 3) for n in matrices}
    assert len(per_tensor) > 1  # unlike per-tensor pruning, the matrices end at different sparsities
    for n, t in pruned.items():
        assert torch.equal(t[t != 0], original[n][t != 0])


def test_model_cutoff_is_exact_with_ties_and_zeros():
    tensors = [torch.tensor([1.0, -2.0, 2.0, 0.0]), torch.tensor([[2.0, 3.0], [0.0, -1.0]])]
    assert model_cutoff(lambda: tensors, 3) == (2.0, 2)  # 3, then two of the three 2s: the first ones in order
    masks = [m for _, m in prune_masks(lambda: tensors, 1 - 3 / 8, "model")]
    assert [m.tolist() for m in masks] == [[False, True, True, False], [[False, True], [False, False]]]
    assert model_cutoff(lambda: tensors, 2) == (2.0, 1)
    assert model_cutoff(lambda: tensors, 7) == (0.0, 0)  # more than the nonzero entries: keep them all
    generator = torch.Generator().manual_seed(0)
    ints = [torch.randint(-5, 6, (40,), generator=generator).float() for _ in range(3)]
    for keep in (1, 17, 60, 100):
        masks = [m for _, m in prune_masks(lambda: ints, 1 - keep / 120, "model")]
        assert sum(int(m.sum()) for m in masks) == min(keep, sum(int(t.count_nonzero()) for t in ints))
        kept = torch.cat([t[m].abs() for t, m in zip(ints, masks, strict=True)])
        dropped = torch.cat([t[~m].abs() for t, m in zip(ints, masks, strict=True)])
        assert kept.min() >= dropped.max()


def test_prune_keeps_float16_and_refuses_bad_output_folders(model: Path, tmp_path: Path, capsys):
    half = tmp_path / "half"
    LlamaForCausalLM.from_pretrained(model, dtype=torch.float16).save_pretrained(half)
    out = tmp_path / "half-pruned"
    assert main(["prune", str(half), "--sparsity", "0.25", "--out", str(out)]) == 0
    pruned = _state(out)
    assert all(t.dtype == torch.float16 for t in pruned.values())
    assert json.loads((out / "config.json").read_text()).get("dtype") == "float16"

    before = _files(half)
    for bad in (half, half / "inside"):
        assert main(["prune", str(half), "--sparsity", "0.5", "--out", str(bad)]) == 2
        assert "overlaps input" in capsys.readouterr().err
    assert _files(half) == before
    assert main(["prune", str(half), "--sparsity", "0.5", "--out", str(out)]) == 2  # exists, not --overwrite
    assert (
        "holds an earlier output of this tool; choose a new folder, or replace it (--overwrite"
        in capsys.readouterr().err
    )
    assert main(["prune", str(half), "--sparsity", "1.5", "--out", str(tmp_path / "x")]) == 2
    assert main(["prune", str(half), "--sparsity", "0.5", "--scope", "layer", "--out", str(tmp_path / "x")]) == 2
    assert "scope" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    _no_leftovers(tmp_path)
    assert (
        main(["prune", str(half), "--sparsity", "0.5", "--out", str(out), "--overwrite"]) == 0
    )  # its own earlier output


# average-run -----------------------------------------------------------------------------------


def _checkpoints(run: Path, *steps: int) -> list[dict[str, torch.Tensor]]:
    return [_state(run / f"checkpoint-{s}") for s in steps]


def test_average_run_last_k_is_the_mean_of_the_last_checkpoints(run: Path, tmp_path: Path, capsys):
    before = _files(run)
    out = tmp_path / "last2"
    assert main(["average-run", str(run), "--last-k", "2", "--out", str(out)]) == 0
    assert _files(run) == before
    _no_leftovers(tmp_path)
    merged, (c30, c40) = _state(out), _checkpoints(run, 30, 40)
    for name, t in merged.items():
        torch.testing.assert_close(t, (c30[name] + c40[name]) / 2, rtol=0, atol=1e-6)
    recipe = MergeRecipe.load(out / "merge_recipe.yaml")
    assert recipe.merge_method == "linear"
    assert [Path(e.model).name for e in recipe.models] == ["checkpoint-30", "checkpoint-40"]
    AutoModelForCausalLM.from_pretrained(out)


def test_average_run_every_k_and_ema_weights(run: Path, tmp_path: Path):
    assert main(["average-run", str(run), "--every-k", "2", "--out", str(tmp_path / "every2")]) == 0
    merged, (c20, c40) = _state(tmp_path / "every2"), _checkpoints(run, 20, 40)
    for name, t in merged.items():
        torch.testing.assert_close(t, (c20[name] + c40[name]) / 2, rtol=0, atol=1e-6)

    assert main(["average-run", str(run), "--ema", "0.5", "--out", str(tmp_path / "ema")]) == 0
    merged, cs = _state(tmp_path / "ema"), _checkpoints(run, 10, 20, 30, 40)
    for name, t in merged.items():
        e = cs[0][name]
        for c in cs[1:]:
            e = 0.5 * e + 0.5 * c[name]  # the EMA recursion, oldest first
        torch.testing.assert_close(t, e, rtol=0, atol=1e-6)

    assert main(["average-run", str(run), "--last-k", "2", "--ema", "0.9", "--out", str(tmp_path / "ema2")]) == 0
    merged, (c30, c40) = _state(tmp_path / "ema2"), _checkpoints(run, 30, 40)
    for name, t in merged.items():
        torch.testing.assert_close(t, 0.9 * c30[name] + 0.1 * c40[name], rtol=0, atol=1e-6)


def test_average_run_prints_a_recipe_that_merge_replays_to_the_same_bytes(run: Path, tmp_path: Path, capsys):
    assert main(["average-run", str(run), "--last-k", "3", "--print-recipe"]) == 0
    text = capsys.readouterr().out
    recipe = MergeRecipe.from_yaml(text)
    assert recipe.merge_method == "linear" and len(recipe.models) == 3
    assert yaml.safe_load(text)["models"][0]["parameters"] == {"weight": 1.0}
    (tmp_path / "recipe.yaml").write_text(text)
    assert main(["merge", str(tmp_path / "recipe.yaml"), "--out", str(tmp_path / "replayed")]) == 0
    capsys.readouterr()
    assert main(["average-run", str(run), "--last-k", "3", "--print-recipe", "--out", str(tmp_path / "direct")]) == 0
    assert capsys.readouterr().out.startswith(text)
    assert (tmp_path / "replayed" / "model.safetensors").read_bytes() == (
        tmp_path / "direct" / "model.safetensors"
    ).read_bytes()


def test_average_run_refusals(run: Path, tmp_path: Path, capsys):
    cases = [
        (["--last-k", "5", "--out", str(tmp_path / "o")], "between 1 and the number of checkpoints"),
        (["--ema", "1.5", "--out", str(tmp_path / "o")], "decay"),
        (["--out", str(tmp_path / "o")], "last_k, every_k or an ema"),
        (["--last-k", "2"], "--out DIR"),
        (["--last-k", "2", "--out", str(run)], "overlaps input"),
        (["--last-k", "2", "--out", str(run / "checkpoint-40" / "avg")], "overlaps input"),
    ]
    for args, message in cases:
        assert main(["average-run", str(run), *args]) == 2, args
        assert message in capsys.readouterr().err, args
    assert main(["average-run", str(tmp_path), "--last-k", "1", "--out", str(tmp_path / "o")]) == 2
    assert "no checkpoint-STEP folders" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    with pytest.raises(SystemExit):
        main(["average-run", str(run), "--last-k", "2", "--every-k", "2", "--out", str(tmp_path / "o")])
