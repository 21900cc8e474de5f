"""Bad input and safety of data: a correct merge, or an error naming model, tensor and fix with nothing written."""

from __future__ import annotations

import errno
import hashlib
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from explorer.executor import cast_output, merge_to_folder
from explorer.io.checkpoint import CheckpointError, discover, open_checkpoint
from explorer.io.formats.safetensors_io import ShardWriter
from explorer.recipe import MergeRecipe
from explorer.session import MergeSession
from tests.helpers import assert_expected
from tests.tiny import tiny_family
from tests.tiny_formats import hub_cache, save_lora, save_sharded, state, to_bin

ROOT = Path(__file__).resolve().parent.parent
NORM = "model.norm.weight"


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return tiny_family(tmp_path_factory.mktemp("family"), n_experts=2)


def _recipe(models, base=None, method="linear", **extra) -> MergeRecipe:
    return MergeRecipe(
        merge_method=method, base_model=str(base) if base else None, models=[{"model": str(m)} for m in models], **extra
    )


def _refused(recipe: MergeRecipe, out: Path, match: str) -> None:
    with pytest.raises((CheckpointError, ValueError), match=match):
        merge_to_folder(recipe, out)
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]


def _variant(src: Path, dst: Path, change) -> Path:
    """Copy of checkpoint ``src`` with ``change(state_dict)`` applied, saved as one safetensors file."""
    tensors = state(src)
    change(tensors)
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    save_file(tensors, str(dst / "model.safetensors"))
    return dst


def _hashes(folders) -> dict[Path, str]:
    return {
        f: hashlib.sha256(f.read_bytes()).hexdigest()
        for folder in folders
        for f in sorted(Path(folder).rglob("*"))
        if f.is_file()
    }


def test_mixed_float16_bfloat16_float32_inputs(family, tmp_path):
    base, experts = family
    half = _variant(experts[0], tmp_path / "fp16", lambda t: t.update({k: v.half() for k, v in t.items()}))
    brain = _variant(experts[1], tmp_path / "bf16", lambda t: t.update({k: v.bfloat16() for k, v in t.items()}))
    assert {
        open_checkpoint(half).dtype(NORM),
        open_checkpoint(brain).dtype(NORM),
        open_checkpoint(base).dtype(NORM),
    } == {"F16", "BF16", "F32"}
    out = merge_to_folder(_recipe([half, brain, base]), tmp_path / "out")
    merged, a, b, c = state(out), state(half), state(brain), state(base)
    for name in merged:
        assert merged[name].dtype == torch.float32
        assert_expected(merged[name], (a[name].float() + b[name].float() + c[name]) / 3)


@pytest.mark.parametrize("where", ["base", "model"])
def test_nan_or_inf_names_model_and_tensor(family, tmp_path, where):
    base, experts = family
    bad = _variant(
        base if where == "base" else experts[1],
        tmp_path / "bad",
        lambda t: t["model.layers.1.mlp.up_proj.weight"].view(-1)[:2].fill_(float("inf")),
    )
    recipe = _recipe(
        [experts[0], bad] if where == "model" else experts,
        base=bad if where == "base" else base,
        method="task_arithmetic",
    )
    _refused(
        recipe,
        tmp_path / "out",
        r"bad: tensor 'model.layers.1.mlp.up_proj.weight' has 2 NaN/inf values; .*re-export or drop it",
    )


def test_float16_overflow_refused_or_clamped(family, tmp_path):
    _, experts = family
    big = _variant(experts[0], tmp_path / "big", lambda t: t[NORM].fill_(70000.0))
    _refused(
        _recipe([big, big], dtype="float16"),
        tmp_path / "refused",
        r"'model.norm.weight' has values up to 7e\+04, beyond the torch.float16 range .*out_of_range: clamp",
    )
    out = merge_to_folder(_recipe([big, big], dtype="float16", out_of_range="clamp"), tmp_path / "clamped")
    merged = state(out)
    assert merged[NORM].dtype == torch.float16 and bool((merged[NORM] == 65504).all())
    assert all(bool(t.isfinite().all()) for t in merged.values())
    assert "out_of_range: clamp" in (out / "merge_recipe.yaml").read_text()


def test_inputs_never_modified(family, tmp_path):
    base, experts = family
    adapter = tmp_path / "adapter"
    save_lora(base, adapter)
    binary = to_bin(experts[1], tmp_path / "bin", shards=2)
    before = _hashes([base, *experts, adapter, binary])
    merge_to_folder(
        _recipe([experts[0], binary, adapter], base=base, method="ties", parameters={"density": 0.5}), tmp_path / "out"
    )
    assert _hashes([base, *experts, adapter, binary]) == before


def test_output_inside_a_lora_base_refused(family, tmp_path):
    base, experts = family
    save_lora(base, tmp_path / "adapter")
    with pytest.raises(CheckpointError, match="overlaps input"):
        merge_to_folder(_recipe([tmp_path / "adapter", experts[0]]), base / "merged")
    assert not (base / "merged").exists()


def test_killed_merge_leaves_nothing_that_looks_like_a_checkpoint(family, tmp_path):
    base, experts = family
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(_recipe(experts, base=base, method="ties").to_yaml())
    out = tmp_path / "out"
    script = (
        "import sys, time\n"
        "from explorer.executor import merge_to_folder\n"
        "from explorer.recipe import MergeRecipe\n"
        "def progress(fraction, name):\n"
        "    if fraction >= 0.5:\n"
        "        print('HALF', flush=True)\n"
        "        time.sleep(120)\n"
        "merge_to_folder(MergeRecipe.load(sys.argv[1]), sys.argv[2], progress=progress)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(recipe), str(out)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "HALF"
    finally:
        proc.kill()
        proc.wait()
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    assert not out.exists() and len(leftovers) == 1 and any(leftovers[0].iterdir())
    assert discover(tmp_path) == []
    with pytest.raises(CheckpointError, match="an unfinished merge output .*delete this folder"):
        open_checkpoint(leftovers[0])
    assert merge_to_folder(MergeRecipe.load(recipe), out) == out


def test_full_disk_leaves_nothing(family, tmp_path, monkeypatch):
    _, experts = family
    calls = []
    real_add = ShardWriter.add

    def add(self, name, tensor):
        calls.append(name)
        if len(calls) == 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_add(self, name, tensor)

    monkeypatch.setattr(ShardWriter, "add", add)
    _refused(
        _recipe(experts),
        tmp_path / "out",
        r"writing .*out failed: No space left on device; nothing was written. If the disk is full, free space",
    )
    assert list(tmp_path.iterdir()) == []


def test_stray_single_file_beside_index_is_ignored(family, tmp_path):
    _, experts = family
    folder = save_sharded(state(experts[0]), experts[0], tmp_path / "sharded")
    save_file({NORM: torch.full((16,), 123.0)}, str(folder / "model.safetensors"))
    ckpt = open_checkpoint(folder)
    assert ckpt.format == "safetensors (sharded)"
    assert_expected(ckpt.get(NORM), state(experts[0])[NORM])
    out = merge_to_folder(_recipe([folder, experts[1]]), tmp_path / "out")
    assert_expected(state(out)[NORM], (state(experts[0])[NORM] + state(experts[1])[NORM]) / 2)


def test_stray_extra_shard_beside_index_is_ignored(family, tmp_path):
    _, experts = family
    folder = save_sharded(state(experts[0]), experts[0], tmp_path / "sharded")
    save_file({"model.extra.weight": torch.ones(3)}, str(folder / "model-00003-of-00002.safetensors"))
    assert "model.extra.weight" not in open_checkpoint(folder).names()
    out = merge_to_folder(_recipe([folder, experts[1]]), tmp_path / "out")
    assert state(out).keys() == state(experts[1]).keys()


def test_index_naming_missing_shard_refused(family, tmp_path):
    _, experts = family
    folder = save_sharded(state(experts[0]), experts[0], tmp_path / "sharded")
    (folder / "model-00002-of-00002.safetensors").unlink()
    _refused(
        _recipe([folder, experts[1]]),
        tmp_path / "out",
        r"sharded: model.safetensors.index.json names shard\(s\) \['model-00002-of-00002.safetensors'\] that are not there",
    )


def test_truncated_download_refused(family, tmp_path):
    _, experts = family
    folder = _variant(experts[0], tmp_path / "cut", lambda t: None)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) - 100])
    _refused(
        _recipe([folder, experts[1]]),
        tmp_path / "out",
        r"cut/model.safetensors: file is truncated .*fetch the file again",
    )


def test_missing_tensor_refused(family, tmp_path):
    _, experts = family
    partial = _variant(experts[0], tmp_path / "partial", lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    _refused(
        _recipe([experts[1], partial]), tmp_path / "out", r"partial: missing tensor 'model.layers.1.mlp.up_proj.weight'"
    )


def test_not_a_checkpoint_refused(family, tmp_path):
    _, experts = family
    (tmp_path / "empty").mkdir()
    _refused(
        _recipe([experts[0], tmp_path / "empty"]),
        tmp_path / "out",
        "empty: no config.json; this is not a Hugging Face checkpoint folder",
    )
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    (broken / "model.safetensors").write_bytes(b"\x00" * 8)
    _refused(_recipe([experts[0], broken]), tmp_path / "out", "broken/config.json: unreadable config.json")


def test_output_onto_the_blobs_of_a_cached_input_refused(family, tmp_path):
    """A hub-cache input reads files that live in blobs/ through symlinks: --out there is refused.

    Also with overwrite, and inside it; the input stays readable.
    """
    _, experts = family
    snapshot = hub_cache(tmp_path / "hub", "org/e1", experts[0])
    blobs = tmp_path / "hub" / "models--org--e1" / "blobs"
    before = _hashes([blobs])
    for out in (blobs, blobs / "merged"):
        with pytest.raises(CheckpointError, match=r"overlaps input .*snapshots.* \(at .*blobs\)"):
            merge_to_folder(_recipe([snapshot, experts[1]]), out, overwrite=True)
    assert _hashes([blobs]) == before and open_checkpoint(snapshot).names()


def test_overwrite_replaces_only_an_earlier_merge(family, tmp_path):
    """Overwrite replaces a folder this tool wrote and nothing else.

    Not a file, not a folder with a stray file, not a folder of unrelated files; an empty path is
    refused.
    """
    base, experts = family
    out = tmp_path / "out"
    merge_to_folder(_recipe(experts), out)
    first = _hashes([out])
    merge_to_folder(_recipe(experts, base=base, method="ties"), out, overwrite=True)
    assert _hashes([out]) != first and "merge_method: ties" in (out / "merge_recipe.yaml").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    (out / "notes.txt").write_text("mine")
    stray = tmp_path / "a-file"
    stray.write_text("an old file")
    user = tmp_path / "user"
    user.mkdir()
    (user / "thesis.tex").write_text("years of work")
    for target, refusal in (
        (out, "this tool did not write, so it is never replaced"),
        (stray, "is a file, not a folder; choose a new folder"),
        (user, "this tool did not write, so it is never replaced"),
    ):
        before = _hashes([tmp_path])
        for overwrite in (True, False):  # the same reason with or without overwrite: it would not help
            with pytest.raises(CheckpointError, match=refusal):
                merge_to_folder(_recipe(experts), target, overwrite=overwrite)
        assert _hashes([tmp_path]) == before
    (out / "notes.txt").unlink()
    with pytest.raises(CheckpointError, match=r"holds an earlier output of this tool; .* \(--overwrite on the command"):
        merge_to_folder(_recipe(experts), out)
    with pytest.raises(CheckpointError, match="no output folder given"):
        merge_to_folder(_recipe(experts), "", overwrite=True)


def test_base_listed_among_the_models_with_another_spelling_is_the_base(family, tmp_path):
    base, experts = family
    exact = merge_to_folder(_recipe([base, *experts], base=base, method="task_arithmetic"), tmp_path / "exact")
    respelled = MergeRecipe(
        merge_method="task_arithmetic",
        base_model=str(base),
        models=[{"model": f"{base}/"}, *({"model": str(e)} for e in experts)],
    )
    assert [e.model for e in respelled.models] == [str(e) for e in experts]  # "base/" is the base, not an input
    other = merge_to_folder(respelled, tmp_path / "respelled")
    assert state(exact).keys() == state(other).keys() and all(
        torch.equal(state(exact)[k], state(other)[k]) for k in state(exact)
    )


@pytest.mark.parametrize(
    "content, match",
    [("models:\n  - model: a\n - model: b\n", "invalid recipe: .*expected"), (None, "cannot read the recipe file")],
)
def test_cli_unreadable_recipe_exits_2_with_a_message(tmp_path, content, match):
    recipe = tmp_path / "recipe.yaml"
    if content is None:
        recipe.mkdir()  # a folder given as the recipe
    else:
        recipe.write_text(content)
    run = subprocess.run(
        [sys.executable, "-m", "explorer", "merge", str(recipe), "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert re.search(match, run.stderr, re.S)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_float32_overflow_is_refused_whatever_the_dtype(bad):
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        with pytest.raises(ValueError, match="holds inf or NaN even in float32.*lower the weights, lambda or scale"):
            cast_output("w", torch.tensor([1.0, bad]), dtype, out_of_range="clamp")


def test_a_ties_merge_measures_its_own_range_and_is_refused_the_same(family, tmp_path):
    """TIES adds the base and measures the peak in its last pass: the same refusals, from disk and in memory."""
    base, experts = family
    big = _variant(experts[0], tmp_path / "big", lambda t: t[NORM].fill_(70000.0))
    for method in ("ties", "dare_ties", "task_arithmetic"):
        _refused(
            _recipe([big, experts[1]], base=base, method=method, dtype="float16"),
            tmp_path / f"{method}-fp16",
            r"'model.norm.weight' has values up to 7e\+04, beyond the torch.float16 range .*out_of_range: clamp",
        )
        _refused(
            _recipe([big, experts[1]], base=base, method=method, parameters={"lambda": 1e36}),
            tmp_path / f"{method}-inf",
            "'model.norm.weight' holds inf or NaN even in float32 .*lower the weights, lambda or scale",
        )
    session = MergeSession(base, [big, experts[1]])
    with pytest.raises(ValueError, match="'model.norm.weight' holds inf or NaN even in float32"):
        session.merge(session.recipe("ties", {"lambda": 1e36}, [{}, {}]))
    session.merge(session.recipe("ties", {"lambda": 1.0}, [{}, {}]))  # the election is kept: a lambda move
    with pytest.raises(ValueError, match="'model.norm.weight' holds inf or NaN even in float32"):
        session.merge(session.recipe("ties", {"lambda": 1e36}, [{}, {}]))
