"""Every file beside the reference model's weights is copied into the merge and listed in its model card.

Processor configs (preprocessor_config.json, processor_config.json, video_preprocessor_config.json),
tokenizers of any format (tokenizer.model, a tiktoken file), generation config and any other side file;
not weights, indexes, the config (written), nor files that describe another model (its card, a Trainer
state, an adapter config, the zoo's training record). A merged Gemma3 vision-language model loads with AutoProcessor and runs.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoProcessor, Gemma3ForConditionalGeneration, Gemma3Processor, PreTrainedTokenizerFast

from explorer.executor import merge_to_folder
from explorer.io.formats.base import side_files
from explorer.io.writer import MANIFEST
from explorer.recipe import MergeRecipe
from tests.test_key_names import loads_cleanly, noisy, tiny_gemma3
from tests.tiny_formats import llama_with_tokenizer

SIDE = {
    "preprocessor_config.json": json.dumps(
        {"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 28}}
    ),
    "processor_config.json": json.dumps({"processor_class": "LlavaProcessor", "patch_size": 14}),
    "video_preprocessor_config.json": json.dumps({"video_processor_type": "LlavaOnevisionVideoProcessor"}),
    "qwen.tiktoken": "IQ== 0\nIg== 1\n",
    "notes.txt": "anything the model's authors put beside the weights\n",
}
NOT_COPIED = {
    "README.md": "the base model's own card",
    "trainer_state.json": json.dumps({"global_step": 10, "log_history": []}),
    "zoo_info.json": json.dumps({"task": "add", "steps": 300}),
    "optimizer.pt": "not really",
    "training_args.bin": "not really",
    ".hidden": "x",
}


def merge(models: list[Path], out: Path, **recipe) -> Path:
    return merge_to_folder(
        MergeRecipe(merge_method="linear", models=[{"model": str(m)} for m in models], **recipe), out
    )


@pytest.fixture(scope="module")
def llamas(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("side")
    base = llama_with_tokenizer(root / "base")
    expert = llama_with_tokenizer(root / "expert", seed=1, base=base, added=("<tool>",))
    for name, text in (SIDE | NOT_COPIED).items():
        (base / name).write_text(text)
    (base / "tokenizer.model").write_bytes(bytes(range(256)))  # a sentencepiece model, as bytes
    (base / "runs").mkdir()
    (base / "runs" / "events.out").write_text("tensorboard")
    return base, expert


def test_side_files_lists_all_but_weights_config_and_foreign_files(llamas):
    base, _ = llamas
    names = [f.name for f in side_files(base)]
    assert set(SIDE) | {"tokenizer.model", "tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= set(
        names
    )
    assert not set(names) & (set(NOT_COPIED) | {"config.json", "model.safetensors", "runs"})
    assert names == sorted(names) and side_files(None) == []


def test_merge_copies_every_side_file_and_lists_it_in_the_card(llamas, tmp_path):
    base, expert = llamas
    out = merge([base, expert], tmp_path / "out")
    for name, text in SIDE.items():
        assert (out / name).read_text() == text
    assert (out / "tokenizer.model").read_bytes() == bytes(range(256))
    assert (out / "README.md").read_text() != NOT_COPIED["README.md"]
    assert not any((out / name).exists() for name in NOT_COPIED if name != "README.md") and not (out / "runs").exists()
    card = (out / "README.md").read_text()
    section = card[card.index("## Files beside the weights") :]
    for name in [*SIDE, "tokenizer.model", "tokenizer.json", "generation_config.json"]:
        assert f"- `{name}`" in section
    assert "model.safetensors" not in section and "- `config.json`" not in section
    listed = set(json.loads((out / MANIFEST).read_text())["files"])
    assert set(SIDE) | {"tokenizer.model"} <= listed


def test_union_vocabulary_keeps_the_processor_files(llamas, tmp_path):
    """With tokenizer_source union the tokenizer is rewritten; the other side files are still the reference's."""
    base, expert = llamas
    out = merge([base, expert], tmp_path / "out", tokenizer_source="union")
    for name, text in SIDE.items():
        assert (out / name).read_text() == text
    assert "<tool>" in PreTrainedTokenizerFast.from_pretrained(out).get_vocab()


def save_gemma3_processor(folder: Path) -> None:
    """A Gemma3Processor (image processor + a word-level tokenizer with Gemma3's image tokens) saved in ``folder``."""
    from transformers.models.gemma3 import Gemma3ImageProcessor

    words = ["[UNK]", "[PAD]", "<s>", "</s>"] + [f"w{i}" for i in range(56)]
    vocab = {t: i for i, t in enumerate(words + ["<image_soft_token>", "<start_of_image>", "<end_of_image>"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = {"image_token": "<image_soft_token>", "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>"}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="[UNK]",
        pad_token="[PAD]",
        bos_token="<s>",
        eos_token="</s>",
        extra_special_tokens=specials,
    )
    image_processor = Gemma3ImageProcessor(size={"height": 28, "width": 28})
    Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_length=4).save_pretrained(folder)
    image_processor.save_pretrained(folder)  # preprocessor_config.json too, as hub Gemma3 repos have it


def test_merged_vision_language_model_loads_with_its_processor_and_runs(tmp_path):
    torch.manual_seed(0)
    tiny_gemma3().save_pretrained(tmp_path / "base")
    save_gemma3_processor(tmp_path / "base")
    expert = noisy(tmp_path / "base", tmp_path / "expert", seed=1, cls=Gemma3ForConditionalGeneration)
    out = merge([tmp_path / "base", expert], tmp_path / "out")
    assert {"processor_config.json", "preprocessor_config.json"} <= {p.name for p in out.iterdir()}
    processor = AutoProcessor.from_pretrained(out)
    assert type(processor).__name__ == "Gemma3Processor"
    image = Image.fromarray(np.full((28, 28, 3), 128, dtype=np.uint8))
    inputs = processor(text="w1 <start_of_image> w2", images=image, return_tensors="pt")
    model = loads_cleanly(out, Gemma3ForConditionalGeneration)
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (1, inputs["input_ids"].shape[1], 64) and torch.isfinite(logits).all()
