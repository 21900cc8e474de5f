"""Vocabulary alignment (added tokens, padded rows, union/base) and tied/untied embeddings, end to end."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from explorer.executor import merge_to_folder
from explorer.io.checkpoint import CheckpointError
from explorer.io.inputs import compatibility_report
from explorer.recipe import MergeRecipe
from explorer.session import MergeSession
from tests.helpers import assert_expected
from tests.tiny import save_tiny_llama
from tests.tiny_formats import llama_with_tokenizer, state

EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


@pytest.fixture(scope="module")
def vocab_family(tmp_path_factory):
    """base (64 tokens), a: base + noise, b: base + noise + 2 added tokens, c: like a but rows padded to 72."""
    root = tmp_path_factory.mktemp("vocab")
    base = llama_with_tokenizer(root / "base")
    a = llama_with_tokenizer(root / "a", seed=1, base=base)
    b = llama_with_tokenizer(root / "b", seed=2, base=base, added=("<tool>", "<think>"))
    c = llama_with_tokenizer(root / "c", seed=3, base=base, pad_to=72)
    return base, a, b, c


def _recipe(models, base=None, method="linear", **extra) -> MergeRecipe:
    return MergeRecipe(
        merge_method=method, base_model=str(base) if base else None, models=[{"model": str(m)} for m in models], **extra
    )


def test_added_tokens_base_vocabulary(vocab_family, tmp_path):
    base, a, b, _ = vocab_family
    out = merge_to_folder(_recipe([a, b], base=base, method="task_arithmetic"), tmp_path / "out")
    merged, sa, sb, s0 = state(out), state(a), state(b), state(base)
    assert merged[EMBED].shape == (64, 16) and len(AutoTokenizer.from_pretrained(out)) == 64
    assert_expected(merged[EMBED], sa[EMBED] + sb[EMBED][:64] - s0[EMBED])
    assert AutoModelForCausalLM.from_pretrained(out).config.vocab_size == 64


def test_added_tokens_union_vocabulary(vocab_family, tmp_path):
    _, a, b, _ = vocab_family
    out = merge_to_folder(_recipe([a, b], tokenizer_source="union"), tmp_path / "out")
    merged, sa, sb = state(out), state(a), state(b)
    tok = AutoTokenizer.from_pretrained(out)
    assert len(tok) == 66 == merged[EMBED].shape[0] == merged[HEAD].shape[0]
    assert tok.convert_tokens_to_ids(["<tool>", "<think>"]) == [64, 65]
    assert_expected(merged[EMBED][:64], (sa[EMBED] + sb[EMBED][:64]) / 2)
    # a lacks the added tokens and there is no base: it takes b's rows (the mean of the models that have them)
    assert_expected(merged[EMBED][64:], sb[EMBED][64:])
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.vocab_size == 66
    assert model(**tok("w1 <tool> w2", return_tensors="pt")).logits.shape == (1, 3, 66)


def test_union_with_base_fills_from_base_else_mean(vocab_family, tmp_path):
    base, a, b, _ = vocab_family
    out = merge_to_folder(
        _recipe([a, b], base=base, method="task_arithmetic", tokenizer_source="union"), tmp_path / "out"
    )
    merged, sb = state(out), state(b)
    # the base lacks <tool>: its row and a's are b's row, so base + (a - base) + (b - base) = b's row
    assert_expected(merged[EMBED][64:], sb[EMBED][64:])


def test_padded_rows_aligned_to_reference(vocab_family, tmp_path):
    _, a, _, c = vocab_family
    out = merge_to_folder(_recipe([a, c]), tmp_path / "to-a")
    assert_expected(state(out)[EMBED], (state(a)[EMBED] + state(c)[EMBED][:64]) / 2)
    out = merge_to_folder(_recipe([c, a]), tmp_path / "to-c")
    merged, sc = state(out), state(c)
    assert merged[EMBED].shape == (72, 16)
    assert_expected(merged[EMBED][64:], sc[EMBED][64:])  # the reference's padding rows are kept


def test_same_size_different_tokens_aligned_by_token(vocab_family, tmp_path):
    base, a, _, _ = vocab_family
    swapped = llama_with_tokenizer(tmp_path / "swapped", seed=4, base=base)
    tok = AutoTokenizer.from_pretrained(swapped)
    vocab = (
        tok.backend_tokenizer.to_str()
        .replace('"w0":4', '"TMP":4')
        .replace('"w1":5', '"w0":5')
        .replace('"TMP":4', '"w1":4')
    )
    (swapped / "tokenizer.json").write_text(vocab)
    out = merge_to_folder(_recipe([a, swapped]), tmp_path / "out")
    merged, sa, ss = state(out), state(a), state(swapped)
    assert_expected(merged[EMBED][4], (sa[EMBED][4] + ss[EMBED][5]) / 2)
    assert_expected(merged[EMBED][5], (sa[EMBED][5] + ss[EMBED][4]) / 2)


def test_session_merge_equals_streaming_merge_with_union(vocab_family, tmp_path):
    base, a, b, _ = vocab_family
    session = MergeSession(base, [a, b], tokenizer_source="union")
    recipe = session.recipe("task_arithmetic", {}, [{}, {}])
    session.export(recipe, session.merge(recipe), tmp_path / "ui")
    merge_to_folder(recipe, tmp_path / "cli")
    ui, cli = state(tmp_path / "ui"), state(tmp_path / "cli")
    assert ui.keys() == cli.keys() and all(torch.equal(ui[k], cli[k]) for k in ui)
    assert len(AutoTokenizer.from_pretrained(tmp_path / "ui")) == 66
    assert session.build_model(session.merge(recipe)).config.vocab_size == 66


def test_nan_in_an_added_token_row_blames_the_model_it_comes_from(vocab_family, tmp_path):
    """With a union vocabulary the other models' rows for b's added tokens are filled from b.

    So a NaN there is b's, not theirs.
    """
    _, a, b, _ = vocab_family
    tensors = state(b)
    tensors[EMBED][65] = float("nan")  # the row of b's second added token
    bad = tmp_path / "b-nan"
    bad.mkdir()
    for f in b.iterdir():
        if not f.name.endswith(".safetensors"):
            (bad / f.name).write_bytes(f.read_bytes())
    save_file(tensors, str(bad / "model.safetensors"))
    with pytest.raises(CheckpointError, match=rf"b-nan: tensor '{EMBED}' has 16 NaN/inf values"):
        merge_to_folder(_recipe([a, bad], tokenizer_source="union"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_different_rows_without_tokenizer_refused(vocab_family, tmp_path):
    _, a, _, _ = vocab_family
    bare = save_tiny_llama(tmp_path / "bare", vocab_size=80)
    out = tmp_path / "out"
    with pytest.raises(
        CheckpointError,
        match=r"bare: has no tokenizer, and the models' embeddings have different row counts \(a: 64, bare: 80\); add the tokenizer files",
    ):
        merge_to_folder(_recipe([a, bare]), out)
    assert not out.exists()


def test_tokenizer_that_does_not_fit_rows_refused(vocab_family, tmp_path):
    _, a, _, _ = vocab_family
    small = save_tiny_llama(tmp_path / "small", vocab_size=60)
    (small / "tokenizer.json").write_text((a / "tokenizer.json").read_text())
    (small / "tokenizer_config.json").write_text((a / "tokenizer_config.json").read_text())
    with pytest.raises(
        CheckpointError, match=r"small: tokenizer has token id 63 but 'model.embed_tokens.weight' has only 60 rows"
    ):
        merge_to_folder(_recipe([a, small]), tmp_path / "out")


def test_tied_and_untied_inputs(tmp_path):
    tied = save_tiny_llama(tmp_path / "tied", seed=1, tie_word_embeddings=True)
    untied = save_tiny_llama(tmp_path / "untied", seed=2)
    st, su = state(tied), state(untied)
    assert HEAD not in st
    out = merge_to_folder(_recipe([tied, untied]), tmp_path / "mixed")
    merged = state(out)
    assert_expected(merged[HEAD], (st[EMBED] + su[HEAD]) / 2)
    assert_expected(merged[EMBED], (st[EMBED] + su[EMBED]) / 2)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert not model.config.tie_word_embeddings
    assert_expected(model.lm_head.weight.detach(), merged[HEAD])
    report = compatibility_report([tied, untied])
    assert report["status"].tolist() == ["ok", "aligned"] and "output untied" in report.loc[1, "message"]
    both_tied = merge_to_folder(_recipe([tied, tied]), tmp_path / "tied-out")
    assert HEAD not in state(both_tied) and AutoModelForCausalLM.from_pretrained(both_tied).config.tie_word_embeddings
