"""Vocabulary alignment of a composite (vision-language) model: its vocab_size lives in text_config.

A tiny LlavaForConditionalGeneration (Llama text model, CLIP vision tower): experts with different added
tokens are aligned by token and the output declares the aligned size in text_config, so transformers
loads it; a config that keeps the size where transformers does not read it is refused before writing.
Mixed tied and untied inputs are untied in text_config as well as at the top level.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer, LlavaConfig, LlavaForConditionalGeneration

from explorer.executor import merge_to_folder
from explorer.io.checkpoint import CheckpointError
from explorer.io.config_compat import vocab_places, vocab_size_of, with_vocab_size
from explorer.io.inputs import compatibility_report
from explorer.recipe import MergeRecipe
from tests.tiny import TINY_DECODER
from tests.tiny_formats import save_tokenizer

TEXT = dict(model_type="llama", **TINY_DECODER)
VISION = dict(
    model_type="clip_vision_model",
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    image_size=8,
    patch_size=4,
    projection_dim=16,
)


def _save_llava(path, seed=0, base=None, added=()):
    """A tiny Llava with a 64-token tokenizer plus ``added`` tokens (its embeddings resized to fit)."""
    torch.manual_seed(seed)
    if base is None:
        model = LlavaForConditionalGeneration(
            LlavaConfig(text_config=TEXT, vision_config=VISION, image_token_index=63, vision_feature_layer=-1)
        )
    else:
        model = LlavaForConditionalGeneration.from_pretrained(base)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.02 * torch.randn_like(p))
    tok = save_tokenizer(path, added=added)
    if len(tok) != 64:
        model.resize_token_embeddings(len(tok), mean_resizing=False)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def llavas(tmp_path_factory):
    root = tmp_path_factory.mktemp("llava")
    base = _save_llava(root / "base")
    a = _save_llava(root / "a", seed=1, base=base)
    b = _save_llava(root / "b", seed=2, base=base, added=("<tool>", "<think>"))
    return base, a, b


def _config(path) -> dict:
    return json.loads((path / "config.json").read_text())


def test_vocab_lives_in_text_config(llavas):
    _, _, b = llavas
    config = _config(b)
    assert "vocab_size" not in config and vocab_places(config) == [("text_config",)] and vocab_size_of(config) == 66
    moved = with_vocab_size(config, 70)
    assert moved["text_config"]["vocab_size"] == 70 and "vocab_size" not in moved
    assert config["text_config"]["vocab_size"] == 66  # the input config is not changed
    assert vocab_size_of({"vocab_size": 5, "text_config": {"vocab_size": 7}}) == 5
    assert with_vocab_size({"model_type": "llama"}, 9) == {"model_type": "llama", "vocab_size": 9}


@pytest.mark.parametrize("source, rows", [("union", 66), ("base", 64)])
def test_composite_aligned_and_loadable(llavas, tmp_path, source, rows):
    base, a, b = llavas
    recipe = MergeRecipe(
        merge_method="task_arithmetic",
        base_model=str(base),
        models=[{"model": str(a)}, {"model": str(b)}],
        tokenizer_source=source,
    )
    out = merge_to_folder(recipe, tmp_path / "out")
    config = _config(out)
    assert config["text_config"]["vocab_size"] == rows and "vocab_size" not in config
    model = LlavaForConditionalGeneration.from_pretrained(out)
    assert model.config.text_config.vocab_size == rows
    assert model.get_input_embeddings().weight.shape[0] == rows == model.get_output_embeddings().weight.shape[0]
    tok = AutoTokenizer.from_pretrained(out)
    assert len(tok) == rows
    ids = tok("w1 <tool> w2" if source == "union" else "w1 w2", return_tensors="pt").input_ids
    assert model(input_ids=ids).logits.shape[-1] == rows
    # b's added tokens keep b's rows (neither the base nor a has them: base + (b - base) = b)
    if source == "union":
        b_rows = LlavaForConditionalGeneration.from_pretrained(b).get_input_embeddings().weight[64:]
        torch.testing.assert_close(model.get_input_embeddings().weight[64:], b_rows)
    report = compatibility_report([a, b], base=base, tokenizer_source=source)
    assert report.vocab.tolist() == [64, 64, 66] and report.status.tolist() == ["ok", "ok", "aligned"]


def test_vocab_where_transformers_does_not_read_it_is_refused(llavas, tmp_path):
    base, a, b = llavas
    odd = _save_llava(tmp_path / "odd", seed=3, base=base, added=("<x>",))
    config = _config(odd)
    # vocab_size at the top level only: transformers reads the text model's (its default, 32000) instead
    config["vocab_size"] = config["text_config"].pop("vocab_size")
    (odd / "config.json").write_text(json.dumps(config))
    recipe = MergeRecipe(
        merge_method="linear", models=[{"model": str(a)}, {"model": str(odd)}], tokenizer_source="union"
    )
    with pytest.raises(CheckpointError) as refusal:
        merge_to_folder(recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
    assert f"{odd}: the vocabularies are aligned to 65 rows" in str(refusal.value)
    assert "transformers does not read it (it reads 32000)" in str(refusal.value)


def test_composite_tied_and_untied(llavas, tmp_path):
    """A tied Llava (no lm_head stored) with an untied one: the output is untied in text_config too."""
    base, _, _ = llavas
    torch.manual_seed(5)
    text = {**TEXT, "tie_word_embeddings": True}
    config = LlavaConfig(
        text_config=text, vision_config=VISION, image_token_index=63, vision_feature_layer=-1, tie_word_embeddings=True
    )
    LlavaForConditionalGeneration(config).save_pretrained(tmp_path / "tied")
    save_tokenizer(tmp_path / "tied")
    # the tied model first: its config (tied in both places) is the output's
    recipe = MergeRecipe(merge_method="linear", models=[{"model": str(tmp_path / "tied")}, {"model": str(base)}])
    out = merge_to_folder(recipe, tmp_path / "out")
    config = _config(out)
    assert config["tie_word_embeddings"] is False and config["text_config"]["tie_word_embeddings"] is False
    merged, untied = (LlavaForConditionalGeneration.from_pretrained(p) for p in (out, base))
    tied = LlavaForConditionalGeneration.from_pretrained(tmp_path / "tied")
    assert merged.get_output_embeddings().weight is not merged.get_input_embeddings().weight
    expected = (untied.get_output_embeddings().weight + tied.get_input_embeddings().weight) / 2
    torch.testing.assert_close(merged.get_output_embeddings().weight, expected)
