"""mergekit recipes, written as mergekit's examples write them, run unchanged here and in mergekit 0.1.5.

Each recipe (one with ``tokenizer: {source: union}`` over experts with added tokens) runs through mergekit's ``run_merge`` (CPU) and through our command line
(``explorer.cli.main(["merge", ...])``, what ``python -m explorer merge`` runs) on the same tiny
4-layer Llamas; every output tensor must match within 1e-5, and the configs and tokenizers must agree. Random methods
get equal masks in both: DARE's from each entry's value (``force_equal_dare_masks``), DELLA's from one
uniform draw per probability shape (``shape_seeded_bernoulli``). A second test round-trips each recipe:
YAML -> MergeRecipe -> YAML, read by mergekit's ``MergeConfiguration`` to the same parameter values.
"""

from __future__ import annotations

import json
from pathlib import Path
from string import Template

import pytest
import torch
import yaml
from mergekit.config import MergeConfiguration, evaluate_setting
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
from transformers import AutoTokenizer

from explorer.cli import main as explorer_main
from explorer.recipe import MergeRecipe
from explorer.session import MergeSession
from tests.helpers import assert_expected, force_equal_dare_masks, shape_seeded_bernoulli
from tests.tiny import save_tiny_llama
from tests.tiny_formats import llama_with_tokenizer, save_tokenizer, state

LAYERS = 4
TEMPLATE = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"  # every input's

RECIPES = {
    "linear": """
models:
  - model: $a
    parameters: {weight: [0.2, 0.9]}
  - model: $b
    parameters:
      weight:
        - filter: self_attn
          value: 3.0
        - value: 0.5
  - model: $c
    parameters: {weight: -0.4}
merge_method: linear
parameters: {normalize: true}
dtype: float32
chat_template: "{% for m in messages %}{{ m['content'] }}\\n{% endfor %}"
""",
    "task_arithmetic": """
base_model: $base
models:
  - model: $a
    parameters: {weight: 0.7}
  - model: $b
    parameters: {weight: [1.0, 0.2]}
merge_method: task_arithmetic
parameters: {lambda: 0.8}
dtype: float32
""",
    "ties": """
models:
  - model: $base
  - model: $a
    parameters:
      density: [1, 0.7, 0.1]
      weight: [0, 0.3, 0.7, 1]
  - model: $b
    parameters:
      density: 0.5
      weight:
        - filter: mlp
          value: 0.8
        - value: 0.3
merge_method: ties
base_model: $base
parameters:
  normalize: true
  int8_mask: true
dtype: float32
""",
    "dare_ties": """
models:
  - model: $base
  - model: $a
    parameters: {density: [0.9, 0.4], weight: 0.6}
  - model: $b
    parameters:
      density:
        - filter: self_attn
          value: 0.3
        - value: 0.7
      weight: [0.2, 0.8]
merge_method: dare_ties
base_model: $base
parameters: {normalize: true, rescale: true, lambda: [1.0, 1.3]}
dtype: float32
""",
    "slerp_slices": """
slices:
  - sources:
      - model: $base
        layer_range: [0, 2]
      - model: $a
        layer_range: [0, 2]
  - sources:
      - model: $base
        layer_range: [2, 4]
      - model: $a
        layer_range: [2, 4]
    parameters:
      t:
        - filter: mlp
          value: 0.9
merge_method: slerp
base_model: $base
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: float32
""",
    "passthrough": """
slices:
  - sources:
      - model: $a
        layer_range: [0, 3]
  - sources:
      - model: $b
        layer_range: [1, 4]
        parameters:
          scale:
            - filter: o_proj
              value: 0.5
            - value: 1.0
merge_method: passthrough
dtype: float32
""",
    "breadcrumbs": """
models:
  - model: $base
  - model: $a
    parameters: {weight: 0.5, density: 0.8, gamma: 0.05}
  - model: $b
    parameters: {weight: [0.3, 0.9], density: 0.6, gamma: 0.02}
merge_method: breadcrumbs
base_model: $base
parameters: {lambda: 1.2}
dtype: float32
""",
    "model_stock": """
models:
  - model: $base
  - model: $a
  - model: $b
  - model: $c
merge_method: model_stock
base_model: $base
dtype: float32
chat_template: auto
""",
    "della": """
models:
  - model: $base
  - model: $a
    parameters: {weight: 1.0, density: [0.4, 0.6], epsilon: 0.1}
  - model: $b
    parameters: {weight: 0.5, density: 0.5, epsilon: 0.15}
merge_method: della
base_model: $base
parameters: {lambda: 1.0, normalize: true}
dtype: float32
""",
    "tokenizer_union": """
models:
  - model: $base
  - model: $tool
    parameters: {weight: 0.6}
  - model: $think
    parameters: {weight: [0.2, 0.9]}
merge_method: task_arithmetic
base_model: $base
tokenizer:
  source: union
dtype: float32
""",
    "out_dtype": """
models:
  - model: $a
    parameters: {weight: [0.6, 0.4]}
  - model: $b
    parameters: {weight: [0.4, 0.6]}
merge_method: linear
dtype: float32
out_dtype: bfloat16
""",
}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    """A 4-layer tiny Llama base and experts (base + noise) with its tokenizer, by recipe placeholder.

    a, b, c share the base's 64 tokens and chat template; ``tool`` adds ``<tool>`` and ``think`` adds ``<think>`` and
    ``<tool>`` (embedding rows grown to fit), for ``tokenizer: {source: union}``.
    """
    root = tmp_path_factory.mktemp("parity")
    base = save_tiny_llama(root / "base", num_hidden_layers=LAYERS)
    experts = [save_tiny_llama(root / f"expert{i}", seed=i + 1, base=base) for i in range(3)]
    for folder in (base, *experts):
        tokenizer = save_tokenizer(folder)
        tokenizer.chat_template = TEMPLATE
        tokenizer.save_pretrained(folder)
    tool = llama_with_tokenizer(root / "tool", seed=4, base=base, added=("<tool>",))
    think = llama_with_tokenizer(root / "think", seed=5, base=base, added=("<think>", "<tool>"))
    experts = {k: str(e) for k, e in zip("abc", experts, strict=True)}
    return {"base": str(base), **experts, "tool": str(tool), "think": str(think)}


def _recipe(name: str, models: dict[str, str], folder: Path) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(Template(RECIPES[name]).substitute(models))
    return path


def _mergekit(recipe: Path, out: Path) -> Path:
    options = MergeOptions(device="cpu", copy_tokenizer=True, quiet=True, lazy_unpickle=False, write_model_card=False)
    run_merge(MergeConfiguration.model_validate(yaml.safe_load(recipe.read_text())), str(out), options)
    return out


def _ours(recipe: Path, out: Path) -> Path:
    assert explorer_main(["merge", str(recipe), "--out", str(out)]) == 0
    return out


def _tokenizer(folder: Path) -> tuple[list[str], dict, str | None]:
    """(tokens, special tokens, chat template) of the tokenizer saved in ``folder``.

    Token ids are not compared: mergekit's union orders the added tokens by its set of models, which
    changes from run to run; ``_by_token`` lines the embedding rows up by token instead.
    """
    tok = AutoTokenizer.from_pretrained(folder)
    return sorted(tok.get_vocab()), tok.special_tokens_map, tok.chat_template


def _by_token(folder: Path) -> dict[str, torch.Tensor]:
    """The checkpoint in ``folder`` with the rows of its token-indexed tensors in sorted-token order."""
    tensors, vocab = state(folder), AutoTokenizer.from_pretrained(folder).get_vocab()
    rows = torch.tensor([vocab[token] for token in sorted(vocab)])
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        tensors[name] = tensors[name][rows]
    return tensors


def _config(folder: Path) -> dict:
    config = json.loads((folder / "config.json").read_text())
    config.pop("transformers_version", None)
    config["dtype"] = config.pop("torch_dtype", config.get("dtype"))
    return config


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_matches_mergekit(name, models, tmp_path, monkeypatch, one_thread):
    if name == "dare_ties":
        force_equal_dare_masks(monkeypatch)
    if name == "della":
        shape_seeded_bernoulli(monkeypatch)
    recipe = _recipe(name, models, tmp_path)
    theirs, ours = _mergekit(recipe, tmp_path / "mergekit"), _ours(recipe, tmp_path / "ours")
    expected, actual = _by_token(theirs), _by_token(ours)
    assert sorted(actual) == sorted(expected)
    for tensor, value in expected.items():
        assert actual[tensor].dtype == value.dtype, tensor
        if value.dtype == torch.bfloat16:  # both cast float32 results: at most one rounding step apart
            assert_expected(actual[tensor].float(), value.float(), rtol=2**-7, atol=1e-6)
        else:
            assert_expected(actual[tensor], value)
    assert _config(ours) == _config(theirs)
    assert _tokenizer(ours) == _tokenizer(theirs)


def test_passthrough_stacks_and_renumbers_layers(models, tmp_path, one_thread):
    """Output layers 0-2 are layers 0-2 of a, output layers 3-5 are layers 1-3 of b (o_proj halved)."""
    out = state(_ours(_recipe("passthrough", models, tmp_path), tmp_path / "ours"))
    a, b = state(Path(models["a"])), state(Path(models["b"]))
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["num_hidden_layers"] == 6
    assert torch.equal(out["model.layers.2.mlp.up_proj.weight"], a["model.layers.2.mlp.up_proj.weight"])
    assert torch.equal(out["model.layers.3.mlp.up_proj.weight"], b["model.layers.1.mlp.up_proj.weight"])
    assert torch.equal(out["model.layers.5.self_attn.o_proj.weight"], 0.5 * b["model.layers.3.self_attn.o_proj.weight"])
    assert torch.equal(out["model.embed_tokens.weight"], a["model.embed_tokens.weight"])
    assert torch.equal(out["lm_head.weight"], b["lm_head.weight"])


def test_gradient_changes_the_merge_layer_by_layer(models, tmp_path, one_thread):
    """A gradient is not a constant: the first and last layers of ``out_dtype``'s linear merge differ in weight."""
    out = state(_ours(_recipe("out_dtype", models, tmp_path), tmp_path / "ours"))
    a, b = state(Path(models["a"])), state(Path(models["b"]))
    name = "model.layers.{}.mlp.down_proj.weight"
    for layer, weight_a in ((0, 0.6), (3, 0.4)):
        expected = weight_a * a[name.format(layer)] + (1 - weight_a) * b[name.format(layer)]
        assert_expected(out[name.format(layer)].float(), expected.to(torch.bfloat16).float(), rtol=2**-7, atol=1e-6)


# Round trip -------------------------------------------------------------------------------------------

NAMES = ["model.embed_tokens.weight", "model.layers.1.self_attn.q_proj.weight", "model.layers.3.mlp.up_proj.weight"]


def _settings(config: MergeConfiguration) -> list[tuple[str, object]]:
    """(where, setting) of every parameter block of a mergekit configuration, in order."""
    blocks = [("parameters", config.parameters or {})]
    blocks += [(f"models/{m.model}", m.parameters or {}) for m in config.models or []]
    for i, piece in enumerate(config.slices or []):
        blocks.append((f"slices[{i}]", piece.parameters or {}))
        blocks += [(f"slices[{i}]/{s.model}", s.parameters or {}) for s in piece.sources]
    return [(f"{where}.{key}", setting) for where, block in blocks for key, setting in block.items()]


def _values(config: MergeConfiguration) -> dict[tuple[str, str, float], object]:
    """Every parameter's value as mergekit evaluates it, for a few tensors and gradient positions."""
    return {
        (where, name, t): evaluate_setting(name, setting, t, validate=lambda v: v)
        for where, setting in _settings(config)
        if not where.endswith("int8_mask")
        for name in NAMES
        for t in (0.0, 0.4, 1.0)
    }


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_round_trip_keeps_the_meaning_for_mergekit(name, models, tmp_path):
    """YAML -> MergeRecipe -> YAML: mergekit validates it and reads the same values; so do we."""
    text = _recipe(name, models, tmp_path).read_text()
    recipe = MergeRecipe.from_yaml(text)
    written = recipe.to_yaml()
    assert MergeRecipe.from_yaml(written) == recipe
    original, again = (MergeConfiguration.model_validate(yaml.safe_load(t)) for t in (text, written))
    assert again.merge_method == original.merge_method and again.out_dtype == original.out_dtype
    assert _values(again) == pytest.approx(_values(original))
    if original.slices:
        ranges = [[(s.model, s.layer_range) for s in piece.sources] for piece in original.slices]
        assert [[(s.model, s.layer_range) for s in piece.sources] for piece in again.slices] == ranges


@pytest.mark.parametrize("name", ["ties", "slerp_slices"])
def test_in_memory_session_merges_gradients_as_the_command_line(name, models, tmp_path, one_thread):
    """The app's path (``MergeSession``) evaluates gradients, filters and slices exactly as the streaming merge."""
    recipe_path = _recipe(name, models, tmp_path)
    recipe = MergeRecipe.load(recipe_path)
    session = MergeSession(recipe.base_model, recipe.input_models())
    merged, streamed = session.merge(recipe), state(_ours(recipe_path, tmp_path / "ours"))
    assert merged.keys() == streamed.keys() and all(torch.equal(merged[n], streamed[n]) for n in merged)


def test_chat_template_without_a_tokenizer_is_refused_before_writing(tmp_path, capsys):
    base = save_tiny_llama(tmp_path / "bare")  # no tokenizer files
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"merge_method: linear\nmodels: [{{model: {base}}}]\nchat_template: auto\n")
    assert explorer_main(["merge", str(recipe), "--out", str(tmp_path / "out")]) == 2
    assert "no tokenizer to carry a chat template" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
