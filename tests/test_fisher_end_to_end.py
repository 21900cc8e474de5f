"""Fisher merging end to end: the CLI and ``MergeSession`` on tiny checkpoints, checked against the formula.

    out = sum_i c_i (F_i + eps) M_i / sum_i c_i (F_i + eps)     per parameter

with each F_i read back from the Fisher cache the merge wrote. With aligned vocabularies (added tokens,
padded rows, reordered tokens, tied and untied embeddings) the Fisher rows must move with the weight
rows; a row a model lacks has Fisher 0 (that model knows nothing about the token).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

import explorer.fisher
from explorer.executor import merge_to_folder
from explorer.fisher import FisherSettings, fisher_file
from explorer.recipe import MergeRecipe
from explorer.session import MergeSession
from tests.helpers import assert_expected
from tests.tiny_formats import llama_with_tokenizer, state

ROOT = Path(__file__).resolve().parents[1]
EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"
PARAMS = {"fisher_examples": 4, "fisher_batch_size": 2, "fisher_max_length": 16, "epsilon": 1e-6}
SETTINGS = FisherSettings(n_examples=4, batch_size=2, max_length=16)
EPS = PARAMS["epsilon"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """base; a, b (+2 added tokens), c (rows padded to 72), swapped (w0 and w1 trade ids): base + noise; tied: its own."""
    root = tmp_path_factory.mktemp("fisher-models")
    base = llama_with_tokenizer(root / "base")
    found = {
        "a": llama_with_tokenizer(root / "a", seed=1, base=base),
        "b": llama_with_tokenizer(root / "b", seed=2, base=base, added=("<tool>", "<think>")),
        "c": llama_with_tokenizer(root / "c", seed=3, base=base, pad_to=72),
        "swapped": llama_with_tokenizer(root / "swapped", seed=4, base=base),
        "tied": llama_with_tokenizer(root / "tied", seed=5, tie_word_embeddings=True),
    }
    swapped = found["swapped"]
    text = AutoTokenizer.from_pretrained(swapped).backend_tokenizer.to_str()
    (swapped / "tokenizer.json").write_text(
        text.replace('"w0":4', '"TMP":4').replace('"w1":5', '"w0":5').replace('"TMP":4', '"w1":4')
    )
    return found


def _recipe(paths, weights, tokenizer_source="base") -> MergeRecipe:
    return MergeRecipe(
        merge_method="fisher",
        models=[{"model": str(p), "parameters": {"weight": w}} for p, w in zip(paths, weights, strict=True)],
        parameters=PARAMS,
        tokenizer_source=tokenizer_source,
    )


def _fisher(path: Path, cache: Path) -> dict[str, torch.Tensor]:
    """The Fisher the merge used (read from the cache: ``fisher_file`` finds it without estimating)."""
    return load_file(fisher_file(path, SETTINGS, cache, load=_no_estimation))


def _no_estimation(path):
    raise AssertionError(f"the merge should have cached the Fisher of {path}")


def _formula(weights: list[torch.Tensor], fishers: list[torch.Tensor], c: list[float]) -> torch.Tensor:
    importance = [ci * (f + EPS) for ci, f in zip(c, fishers, strict=True)]
    return sum(i * w for i, w in zip(importance, weights, strict=True)) / sum(importance)


def _assert_formula(merged: dict, aligned: dict[str, tuple[list, list]], c: list[float]) -> None:
    """Every merged tensor equals the formula on the aligned weights and Fishers; the Fisher mattered."""
    assert sorted(merged) == sorted(aligned)
    moved = 0
    for name, (weights, fishers) in aligned.items():
        expected = _formula(weights, fishers, c)
        assert_expected(merged[name], expected)
        plain = sum(ci * w for ci, w in zip(c, weights, strict=True)) / sum(c)
        moved += not torch.allclose(expected, plain, rtol=1e-4, atol=1e-5)
    assert moved >= len(aligned) // 2  # most tensors differ from the plain weighted average


def _aligned_identity(paths, cache, names) -> dict[str, tuple[list, list]]:
    states, fishers = [state(p) for p in paths], [_fisher(p, cache) for p in paths]
    return {n: ([s[n] for s in states], [f[n] for f in fishers]) for n in names}


def test_fisher_through_the_cli_and_the_session_with_a_union_vocabulary(models, tmp_path, monkeypatch):
    """Models a (64 tokens) and b (64 + <tool>, <think>): the union vocabulary has 66 rows.

    a lacks the last two, so its weight rows there are b's (the fill) and its Fisher rows 0: the
    merge keeps b's rows.
    """
    a, b = models["a"], models["b"]
    cache = tmp_path / "cache"
    monkeypatch.setattr(explorer.fisher, "DEFAULT_CACHE", cache)  # the session uses the default cache
    session = MergeSession(None, [a, b], tokenizer_source="union")
    recipe = session.recipe("fisher", PARAMS, [{"weight": 1.0}, {"weight": 2.0}])
    session.export(recipe, session.merge(recipe), tmp_path / "session")
    recipe_file = tmp_path / "fisher.yaml"
    recipe_file.write_text(recipe.to_yaml())
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "explorer",
            "merge",
            str(recipe_file),
            "--out",
            str(tmp_path / "cli"),
            "--fisher-cache",
            str(cache),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    by_session, by_cli = state(tmp_path / "session"), state(tmp_path / "cli")
    assert by_session.keys() == by_cli.keys() and all(torch.equal(by_session[k], by_cli[k]) for k in by_cli)

    sa, sb, fa, fb = state(a), state(b), _fisher(a, cache), _fisher(b, cache)
    aligned = {n: ([sa[n], sb[n]], [fa[n], fb[n]]) for n in sa}
    for n in (EMBED, HEAD):
        assert sb[n].shape[0] == 66 and sa[n].shape[0] == 64
        aligned[n] = ([torch.cat([sa[n], sb[n][64:]]), sb[n]], [torch.cat([fa[n], torch.zeros(2, 16)]), fb[n]])
    _assert_formula(by_cli, aligned, [1.0, 2.0])
    assert_expected(by_cli[HEAD][64:], sb[HEAD][64:])  # the added tokens' rows are b's


def test_fisher_with_rows_padded_in_the_reference(models, tmp_path):
    """Model c (reference) has 72 rows, 8 of them padding; a's view takes c's padding rows with Fisher 0."""
    c, a = models["c"], models["a"]
    out = merge_to_folder(_recipe([c, a], [1.0, 1.5]), tmp_path / "out", fisher_cache=tmp_path / "cache")
    merged = state(out)
    sc, sa, fc, fa = state(c), state(a), _fisher(c, tmp_path / "cache"), _fisher(a, tmp_path / "cache")
    aligned = _aligned_identity([c, a], tmp_path / "cache", [n for n in sc if n not in (EMBED, HEAD)])
    for n in (EMBED, HEAD):
        aligned[n] = ([sc[n], torch.cat([sa[n], sc[n][64:]])], [fc[n], torch.cat([fa[n], torch.zeros(8, 16)])])
    _assert_formula(merged, aligned, [1.0, 1.5])
    assert_expected(merged[HEAD][64:], sc[HEAD][64:])


def test_fisher_rows_follow_reordered_tokens(models, tmp_path):
    """Model swapped has a's 64 tokens, but w0 and w1 trade ids (4 <-> 5).

    Its weight and Fisher rows 4 and 5 both swap; its Fisher rows unswapped give another (wrong) merge.
    """
    a, swapped = models["a"], models["swapped"]
    cache = tmp_path / "cache"
    out = merge_to_folder(_recipe([a, swapped], [1.0, 1.0]), tmp_path / "out", fisher_cache=cache)
    merged = state(out)
    sa, ss, fa, fs = state(a), state(swapped), _fisher(a, cache), _fisher(swapped, cache)
    perm = torch.arange(64)
    perm[4], perm[5] = 5, 4
    aligned = _aligned_identity([a, swapped], cache, [n for n in sa if n not in (EMBED, HEAD)])
    for n in (EMBED, HEAD):
        aligned[n] = ([sa[n], ss[n][perm]], [fa[n], fs[n][perm]])
    _assert_formula(merged, aligned, [1.0, 1.0])
    unswapped = _formula([sa[HEAD], ss[HEAD][perm]], [fa[HEAD], fs[HEAD]], [1.0, 1.0])
    assert not torch.allclose(unswapped[4:6], merged[HEAD][4:6], rtol=1e-4, atol=1e-6)


def test_fisher_with_tied_and_untied_inputs(models, tmp_path):
    """Model tied has no lm_head tensor: its input embedding serves as the output one, Fisher too."""
    a, tied = models["a"], models["tied"]
    cache = tmp_path / "cache"
    merged = state(merge_to_folder(_recipe([a, tied], [2.0, 1.0]), tmp_path / "out", fisher_cache=cache))
    sa, st, fa, ft = state(a), state(tied), _fisher(a, cache), _fisher(tied, cache)
    assert HEAD not in st and torch.equal(ft[HEAD], ft[EMBED])  # the cache stores a tied Fisher under both names
    aligned = {n: ([sa[n], st[EMBED if n == HEAD else n]], [fa[n], ft[EMBED if n == HEAD else n]]) for n in sa}
    _assert_formula(merged, aligned, [2.0, 1.0])


def test_fisher_problems_are_raised_before_any_output(models, tmp_path):
    out = tmp_path / "out"
    recipe = _recipe([models["a"], models["b"]], [1.0, 1.0]).model_copy(
        update={"parameters": {**PARAMS, "fisher_examples": 4096, "fisher_max_length": 4096}}
    )
    with pytest.raises(ValueError, match="Lower fisher_examples or fisher_max_length"):
        merge_to_folder(recipe, out, fisher_cache=tmp_path / "cache")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no output folder, no hidden temporary one, no cache file
