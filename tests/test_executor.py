"""Streaming executor, writer and session on tiny real Llama checkpoints."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from explorer import registry
from explorer.executor import merge_to_folder, warm_up
from explorer.io.checkpoint import CheckpointError, open_checkpoint
from explorer.io.writer import write_checkpoint
from explorer.recipe import MergeRecipe
from explorer.session import MergeSession
from tests.helpers import assert_expected
from tests.tiny import save_tiny_gpt2, save_tiny_llama, tiny_family
from tests.tiny_formats import save_lora


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return tiny_family(tmp_path_factory.mktemp("family"), n_experts=2)


def _recipe(base, experts, method="ties", **params):
    return MergeRecipe(
        merge_method=method, base_model=str(base), models=[{"model": str(e)} for e in experts], parameters=params
    )


def _state(path):
    files = sorted(path.glob("*.safetensors"))
    return {k: v for f in files for k, v in load_file(f).items()}


def test_streaming_merge_loads_in_transformers(family, tmp_path):
    base, experts = family
    out = merge_to_folder(_recipe(base, experts, density=0.5), tmp_path / "merged")
    model = AutoModelForCausalLM.from_pretrained(out)
    loaded, written = model.state_dict(), _state(out)
    assert sorted(written) == sorted(loaded) and all(torch.equal(loaded[n], t) for n, t in written.items())
    ids = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False)
    assert ids.shape == (1, 7) and ids[0, :3].tolist() == [1, 2, 3]
    assert "merge_method: ties" in (out / "README.md").read_text()
    assert MergeRecipe.load(out / "merge_recipe.yaml") == _recipe(base, experts, density=0.5)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_one_expert_task_arithmetic_weight_one_returns_expert(family, tmp_path):
    base, experts = family
    out = merge_to_folder(_recipe(base, experts[:1], "task_arithmetic"), tmp_path / "m")
    merged, expert = _state(out), _state(experts[0])
    assert merged.keys() == expert.keys()
    for name in expert:
        assert_expected(merged[name], expert[name])


def test_session_export_equals_cli_merge(family, tmp_path):
    base, experts = family
    recipe_file = tmp_path / "r.yaml"
    recipe = _recipe(base, experts, density=0.3)
    recipe_file.write_text(recipe.to_yaml())
    cli = subprocess.run(
        [sys.executable, "-m", "explorer", "merge", str(recipe_file), "--out", str(tmp_path / "cli")],
        capture_output=True,
        text=True,
    )
    assert cli.returncode == 0, cli.stderr
    session = MergeSession(base, experts)
    session.export(recipe, session.merge(recipe), tmp_path / "ui")
    a, b = _state(tmp_path / "cli"), _state(tmp_path / "ui")
    assert all(torch.equal(a[k], b[k]) for k in a) and a.keys() == b.keys()


def test_session_export_equals_cli_merge_with_parallel_reductions(tmp_path):
    """Same bytes for dare_ties on a tensor large enough that a reduction is split over threads.

    On a 4096 x 16 embedding torch splits a sum by its thread count, so a session whose merge workers
    ran torch with other threads than the CLI's gave other bits in the L1 rescale (a per-worker share
    of the threads did). The rescale's norms are now ``kernels.l1_norm``'s serial sums; this keeps
    session and CLI equal on such tensors whatever computes them.
    """
    base = save_tiny_llama(tmp_path / "base", vocab_size=4096)
    experts = [save_tiny_llama(tmp_path / f"e{i}", seed=i + 1, base=base) for i in range(2)]
    session = MergeSession(base, experts)
    recipe = session.recipe("dare_ties", {}, [{"weight": 0.6, "density": 0.4}, {"weight": 0.4, "density": 0.7}])
    session.export(recipe, session.merge(recipe), tmp_path / "ui")
    cli = merge_to_folder(MergeRecipe.load(tmp_path / "ui" / "merge_recipe.yaml"), tmp_path / "cli")
    a, b = _state(tmp_path / "ui"), _state(cli)
    assert a.keys() == b.keys() and all(torch.equal(a[k].view(torch.int32), b[k].view(torch.int32)) for k in a)


def test_session_builds_model_in_memory(family):
    base, experts = family
    session = MergeSession(base, experts)
    recipe = session.recipe("linear", {}, [{"weight": 1.0}, {"weight": 1.0}])
    model = session.build_model(session.merge(recipe))
    expected = (_state(experts[0])["model.norm.weight"] + _state(experts[1])["model.norm.weight"]) / 2
    assert_expected(model.state_dict()["model.norm.weight"], expected)


def test_session_recipe_names_an_adapter_with_its_base_and_replays(family, tmp_path):
    """A LoRA adapter given as BASE+ADAPTER stays BASE+ADAPTER in the session's recipe.

    Its config names no reachable base; the CLI replays the export exactly, even with a '+' in the
    folder name.
    """
    base, experts = family
    save_lora(base, tmp_path / "lora+v2")
    config = tmp_path / "lora+v2" / "adapter_config.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | {"base_model_name_or_path": "someone/not-here"}))
    session = MergeSession(base, [f"{base}+{tmp_path / 'lora+v2'}", experts[0]])
    recipe = session.recipe("task_arithmetic", {}, [{"weight": 0.7}, {"weight": 0.3}])
    assert recipe.models[0].model == f"{base}+{tmp_path / 'lora+v2'}"
    session.export(recipe, session.merge(recipe), tmp_path / "ui")
    replayed = merge_to_folder(MergeRecipe.load(tmp_path / "ui" / "merge_recipe.yaml"), tmp_path / "cli")
    a, b = _state(tmp_path / "ui"), _state(replayed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_session_refuses_a_recipe_for_other_inputs_or_vocabulary(family):
    base, experts = family
    session = MergeSession(base, experts)
    recipe = session.recipe("linear", {}, [{}, {}])
    with pytest.raises(ValueError, match="tokenizer_source='base', the recipe asks for 'union'; start a new session"):
        session.merge(recipe.model_copy(update={"tokenizer_source": "union"}))
    for other in (
        recipe.model_copy(update={"base_model": str(experts[0])}),
        recipe.model_copy(update={"models": recipe.models[::-1]}),
    ):
        assert not session.same_inputs(other)
        with pytest.raises(
            ValueError,
            match="the recipe names other models or another base than the loaded ones; load its models first",
        ):
            session.merge(other)
    assert session.same_inputs(recipe)


def test_sharded_output_and_input(family, tmp_path):
    base, experts = family
    out = write_checkpoint(
        tmp_path / "sharded", ((n, t) for n, t in _state(base).items()), base, _recipe(base, experts), shard_bytes=4096
    )
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert open_checkpoint(out).names() and _state(out).keys() == _state(base).keys()
    merged = merge_to_folder(_recipe(out, experts, "task_arithmetic"), tmp_path / "from-sharded")
    b, e0, e1, loaded = (
        _state(base),
        _state(experts[0]),
        _state(experts[1]),
        AutoModelForCausalLM.from_pretrained(merged).state_dict(),
    )
    for name in b:
        assert_expected(loaded[name], b[name] + (e0[name] - b[name]) + (e1[name] - b[name]))


def test_float16_output_dtype(family, tmp_path):
    base, experts = family
    recipe = _recipe(base, experts).model_copy(update={"dtype": "float16"})
    out = merge_to_folder(recipe, tmp_path / "fp16")
    assert all(t.dtype == torch.float16 for t in _state(out).values())
    assert (
        json.loads((out / "config.json").read_text()).get(
            "dtype", json.loads((out / "config.json").read_text()).get("torch_dtype")
        )
        == "float16"
    )


# Bad input: a clear error naming the model/tensor, and nothing written.


def _assert_refused(recipe, out, match):
    with pytest.raises((CheckpointError, ValueError), match=match):
        merge_to_folder(recipe, out)
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]


def test_refuses_different_architectures(family, tmp_path):
    base, experts = family
    gpt2 = save_tiny_gpt2(tmp_path / "gpt2")
    _assert_refused(_recipe(base, [experts[0], gpt2]), tmp_path / "out", "architecture GPT2LMHeadModel differs")


def test_refuses_different_depth(family, tmp_path):
    base, experts = family
    deep = save_tiny_llama(tmp_path / "deep", num_hidden_layers=3)
    _assert_refused(_recipe(base, [experts[0], deep]), tmp_path / "out", "3 layers")


def test_refuses_missing_folder(family, tmp_path):
    base, experts = family
    _assert_refused(_recipe(base, [experts[0], tmp_path / "nope"]), tmp_path / "out", "folder not found")


def test_refuses_output_equal_to_or_inside_input(family, tmp_path):
    base, experts = family
    before = _state(experts[0])
    for out in (experts[0], experts[0] / "sub"):
        with pytest.raises(CheckpointError, match="overlaps input"):
            merge_to_folder(_recipe(base, experts), out)
    assert not (experts[0] / "sub").exists()
    after = _state(experts[0])
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_refuses_nan_naming_model_and_tensor(family, tmp_path):
    base, experts = family
    bad = save_tiny_llama(tmp_path / "bad", seed=9, base=base)
    state = _state(bad)
    state["model.norm.weight"][0] = float("nan")
    from safetensors.torch import save_file

    save_file(state, str(bad / "model.safetensors"), metadata={"format": "pt"})
    _assert_refused(_recipe(base, [experts[0], bad]), tmp_path / "out", r"bad: tensor 'model.norm.weight' has 1 NaN")


def test_failed_merge_leaves_no_folder(family, tmp_path, monkeypatch):
    base, experts = family
    import explorer.executor as ex

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ex, "cast_output", boom)
    with pytest.raises(RuntimeError):
        merge_to_folder(_recipe(base, experts), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_cli_reports_bad_input_without_traceback(family, tmp_path):
    base, experts = family
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(_recipe(base, [experts[0], tmp_path / "missing"]).to_yaml())
    run = subprocess.run(
        [sys.executable, "-m", "explorer", "merge", str(recipe_file), "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 2
    assert "folder not found" in run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / "o").exists()


WARMED_METHODS = [spec.name for spec in registry.all_methods() if not spec.needs_fisher]  # fisher: no warm-up


@pytest.mark.parametrize("method", WARMED_METHODS)
def test_the_warm_up_merges_its_synthetic_stack_with_every_method(family, method):
    """``merge_stream`` warms every method but fisher up before the first tensor: none may fail on it."""
    base, experts = family
    spec = registry.get(method)
    experts = experts[: spec.max_models or len(experts)]
    known = {p.name for p in spec.params}
    per_model = [{k: v for k, v in {"weight": 0.6, "density": 0.5}.items() if k in known} for _ in experts]
    session = MergeSession(base, experts)
    recipe = session.recipe(method, {}, per_model)
    params = recipe.params_at(recipe.layout(session.names)[0])
    warm_up(spec, params, len(experts), True, recipe.seed, {})


def test_the_warm_up_loads_the_compiled_kernels_of_the_method():
    """In a fresh process TIES's kernels are not loaded; one warm-up loads those its merges call."""
    code = (
        "from explorer import registry\n"
        "from explorer.executor import warm_up\n"
        "from explorer.methods import kernels\n"
        "used = (kernels._high_counts, kernels._low_counts, kernels._select, kernels._ties_range)\n"
        "assert not any(k.signatures for k in used)\n"
        "from explorer.recipe import MergeRecipe\n"
        "models = [{'model': m, 'parameters': {'weight': 0.5, 'density': 0.2}} for m in ('a', 'b')]\n"
        "params = MergeRecipe(merge_method='ties', base_model='base', models=models).resolved_params()\n"
        "warm_up(registry.get('ties'), params, 2, True, 0, {})\n"
        "print([len(k.signatures) for k in used])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[1, 1, 1, 1]"


def test_a_failed_warm_up_fails_the_merge_before_anything_is_written(family, tmp_path, monkeypatch):
    base, experts = family
    import explorer.executor as ex

    def boom(*a, **k):
        raise RuntimeError("kernel cache unreadable")

    monkeypatch.setattr(ex, "warm_up", boom)
    with pytest.raises(RuntimeError, match="kernel cache unreadable"):
        merge_to_folder(_recipe(base, experts), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
