"""Config fields that change the computation: refused by default, merged with the recipe's config_source.

Kinds: rope_theta, rope_scaling, max_position_embeddings, rms_norm_eps, hidden_act, sliding_window. The
differences are listed in the compatibility report and, with config_source, in the model card.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, MistralConfig, MistralForCausalLM

from explorer.executor import merge_to_folder
from explorer.io.checkpoint import CheckpointError
from explorer.io.config_compat import changes_maths, config_differences
from explorer.io.inputs import compatibility_report
from explorer.recipe import MergeRecipe
from tests.tiny import TINY_DECODER, save_tiny_llama

# (family, field, the expert's value): each expert differs from its base in this one config.json field
KINDS = [
    ("llama", "rope_theta", 20000000.0),
    ("llama", "rope_scaling", {"rope_type": "linear", "factor": 2.0}),
    ("llama", "max_position_embeddings", 128),
    ("llama", "rms_norm_eps", 1e-5),
    ("llama", "hidden_act", "gelu"),
    ("mistral", "sliding_window", 16),
]
IGNORED = {"dtype", "torch_dtype", "transformers_version"}  # set by the writer, not taken from an input


def _save_mistral(path, seed=0, base=None):
    torch.manual_seed(seed)
    if base is None:
        config = MistralConfig(**TINY_DECODER, sliding_window=32)
        model = MistralForCausalLM(config)
    else:
        model = MistralForCausalLM.from_pretrained(base)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.02 * torch.randn_like(p))
    model.save_pretrained(path)
    return path


def _with_field(path, field, value):
    """Set ``field`` of ``path``'s config.json (rope_scaling: into rope_parameters, as transformers 5 keeps it)."""
    config = json.loads((path / "config.json").read_text())
    if field in ("rope_theta", "rope_scaling") and "rope_parameters" in config:
        rope = dict(config["rope_parameters"])
        rope.update({"rope_theta": value} if field == "rope_theta" else value)
        config["rope_parameters"] = rope
    else:
        config[field] = value
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    """{family: (base, expert a with the base's config)} for a tiny Llama and a tiny Mistral."""
    root = tmp_path_factory.mktemp("families")
    llama = save_tiny_llama(root / "llama")
    mistral = _save_mistral(root / "mistral")
    return {
        "llama": (llama, save_tiny_llama(root / "llama-a", seed=1, base=llama)),
        "mistral": (mistral, _save_mistral(root / "mistral-a", seed=1, base=mistral)),
    }


@pytest.fixture(params=KINDS, ids=[k[1] for k in KINDS])
def differing(request, families, tmp_path):
    """(base, a, b, field): expert b differs from the base and a in ``field``."""
    family, field, value = request.param
    base, a = families[family]
    saver = save_tiny_llama if family == "llama" else _save_mistral
    b = _with_field(saver(tmp_path / f"{field}-b", seed=2, base=base), field, value)
    return base, a, b, field


def _recipe(base, models, **extra) -> MergeRecipe:
    return MergeRecipe(
        merge_method="task_arithmetic", base_model=str(base), models=[{"model": str(m)} for m in models], **extra
    )


def _config(path) -> dict:
    return {k: v for k, v in json.loads((path / "config.json").read_text()).items() if k not in IGNORED}


def test_rule_fields_that_change_the_maths():
    assert all(changes_maths(f) for f in ("rope_parameters.rope_theta", "text_config.rms_norm_eps", "hidden_act"))
    assert not any(changes_maths(f) for f in ("_name_or_path", "text_config.transformers_version", "vocab_size"))
    base = {"model_type": "llama", "hidden_size": 16, "num_attention_heads": 2}
    # a field written out equals its default left out; a float32-rounded eps equals the float64 one
    assert config_differences(base, {**base, "rope_theta": 10000.0, "rms_norm_eps": 1e-6}) == []
    assert config_differences({**base, "rms_norm_eps": 1e-5}, {**base, "rms_norm_eps": 9.999999747378752e-06}) == []
    (diff,) = config_differences(base, {**base, "rope_theta": 5e5})
    assert (diff.field, diff.reference, diff.other, diff.changes_maths) == (
        "rope_parameters.rope_theta",
        10000.0,
        500000.0,
        True,
    )
    nested = {"model_type": "llava", "text_config": {"model_type": "llama", "rope_theta": 2e7}}
    fields = [d.field for d in config_differences({"model_type": "llava"}, nested) if d.changes_maths]
    assert fields == ["text_config.rope_parameters.rope_theta"]


def test_refused_by_default_before_writing(differing, tmp_path):
    base, a, b, field = differing
    out = tmp_path / "out"
    with pytest.raises(CheckpointError) as refusal:
        merge_to_folder(_recipe(base, [a, b]), out)
    message = str(refusal.value)
    (diff,) = [d for d in config_differences(_config(base), _config(b)) if d.changes_maths][:1]
    assert str(b) in message and str(base) in message and diff.field in message
    assert repr(diff.other) in message and repr(diff.reference) in message and "config_source" in message
    assert not out.exists() and not list(tmp_path.glob(".out*"))
    report = compatibility_report([a, b], base=base)
    assert report.status.tolist() == ["ok", "ok", "incompatible"] and diff.field in report.message[2]


def test_config_source_keeps_the_chosen_config(differing, tmp_path):
    base, a, b, field = differing
    out = merge_to_folder(_recipe(base, [a, b], config_source=str(b)), tmp_path / "from-b")
    assert _config(out) == _config(b) != _config(base)
    card = (out / "README.md").read_text()
    assert "## Config" in card and f"config.json is {b}'s" in card and f"config_source: {b}" in card
    assert any(d.field in card for d in config_differences(_config(base), _config(b)))
    report = compatibility_report([a, b], base=base, config_source=str(b))
    assert report.status.tolist() == ["ok", "ok", "ok"] and "config differs" in report.message[2]
    # by index among the merged models, and "base": the base's config
    assert _config(merge_to_folder(_recipe(base, [a, b], config_source=1), tmp_path / "one")) == _config(b)
    assert _config(merge_to_folder(_recipe(base, [a, b], config_source="base"), tmp_path / "base")) == _config(base)


def test_transformers_reads_the_chosen_rope(families, tmp_path):
    base, a = families["llama"]
    b = _with_field(save_tiny_llama(tmp_path / "b", seed=2, base=base), "rope_theta", 5e5)
    out = merge_to_folder(_recipe(base, [a, b], config_source=str(b)), tmp_path / "out")
    assert AutoConfig.from_pretrained(out).rope_parameters["rope_theta"] == 5e5


def test_neutral_fields_merge_and_are_listed(families, tmp_path):
    base, a = families["llama"]
    b = _with_field(save_tiny_llama(tmp_path / "b", seed=2, base=base), "use_cache", False)
    merge_to_folder(_recipe(base, [a, b]), tmp_path / "out")
    report = compatibility_report([a, b], base=base)
    assert report.status.tolist() == ["ok", "ok", "ok"] and "use_cache" in report.message[2]


def test_recipe_key(families):
    base, a = families["llama"]
    recipe = _recipe(base, [a], config_source=str(a))
    assert MergeRecipe.from_yaml(recipe.to_yaml()).config_source == str(a)
    assert "config_source" not in _recipe(base, [a]).to_yaml()  # not set: not written
    assert MergeRecipe.from_yaml(_recipe(base, [a], config_source=0).to_yaml()).config_source == 0
    with pytest.raises(ValueError, match="config_source: 'elsewhere' is not a model of this recipe"):
        _recipe(base, [a], config_source="elsewhere")
    with pytest.raises(ValueError, match="config_source: 3 is not the index"):
        _recipe(base, [a], config_source=3)
