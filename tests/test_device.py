"""Where a session keeps its tensors (``explorer.device``): the choice, its reason, and where it is shown.

This machine has no GPU: the CUDA side of the choice is checked with torch.cuda's queries replaced by a
fake device of known free memory; the kernels' CUDA path is checked on CPU tensors in test_torch_kernels.
"""

from __future__ import annotations

import importlib

import pandas as pd
import pytest
import torch

from explorer import registry
from explorer.cli import main
from explorer.device import GiB, choose_device
from explorer.inspect import scan_kernel
from explorer.inspect.scan import scan
from explorer.methods import kernels
from explorer.session import MergeSession
from explorer.workbench import Workbench
from tests.tiny import tiny_family


@pytest.fixture
def fake_gpu(monkeypatch):
    """torch sees one CUDA device, "Test GPU", with 10 of 16 GiB free."""
    monkeypatch.delenv("MERGE_EXPLORER_DEVICE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda index=0: (10 * GiB, 16 * GiB))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: "Test GPU")


def test_without_cuda_the_tensors_stay_in_ram_and_the_reason_says_so(monkeypatch):
    monkeypatch.delenv("MERGE_EXPLORER_DEVICE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    choice = choose_device(GiB)
    assert choice.device == torch.device("cpu")
    assert choice.describe() == f"tensors in RAM (torch {torch.__version__} sees no CUDA device)"


def test_auto_takes_the_gpu_when_its_free_memory_holds_the_session(fake_gpu):
    choice = choose_device(4 * GiB)
    assert choice.device == torch.device("cuda:0")
    assert choice.describe() == "tensors on cuda:0 (Test GPU has 10.0 GiB free, 4.0 GiB needed)"


def test_auto_keeps_the_tensors_in_ram_when_the_gpu_lacks_room(fake_gpu):
    choice = choose_device(12 * GiB)
    assert choice.device == torch.device("cpu")
    assert choice.describe() == "tensors in RAM (Test GPU has 10.0 GiB free, 12.0 GiB needed)"


def test_an_asked_device_wins_and_a_missing_one_is_refused_with_the_fix(fake_gpu, monkeypatch):
    assert choose_device(GiB, "cpu").describe() == "tensors in RAM (asked for)"
    tight = choose_device(12 * GiB, "cuda")  # asked: taken even when tight
    assert tight.describe() == "tensors on cuda:0 (asked for; Test GPU has 10.0 GiB free, 12.0 GiB needed)"
    assert choose_device(GiB, None, default="cpu").device == torch.device("cpu")  # the CLI's default
    monkeypatch.setenv("MERGE_EXPLORER_DEVICE", "cpu")
    assert choose_device(GiB).device == torch.device("cpu")
    with pytest.raises(ValueError, match="torch sees 1 CUDA device"):
        choose_device(GiB, "cuda:3")
    for wrong in ("tpu", "cudax", "cuda:a"):
        with pytest.raises(ValueError, match="not one of auto, cpu, cuda, cuda:N"):
            choose_device(GiB, wrong)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="sees no CUDA device: install a CUDA build of torch"):
        choose_device(GiB, "cuda")


def test_a_gpu_that_cannot_be_queried_leaves_auto_in_ram_and_refuses_an_explicit_ask(fake_gpu, monkeypatch):
    def busy(index=0):
        raise RuntimeError("CUDA error: all CUDA-capable devices are busy or unavailable")

    monkeypatch.setattr(torch.cuda, "mem_get_info", busy)
    assert choose_device(GiB).describe() == (
        "tensors in RAM (cuda:0 cannot be queried (CUDA error: all CUDA-capable devices are busy or unavailable))"
    )
    with pytest.raises(ValueError, match="device 'cuda' cannot be used .*busy.*use device auto or cpu"):
        choose_device(GiB, "cuda")


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return tiny_family(tmp_path_factory.mktemp("device"))


def test_a_session_on_the_asked_cpu_merges_as_the_automatic_one(family):
    base, experts = family
    auto, asked = MergeSession(base, experts), MergeSession(base, experts, device="cpu")
    assert asked.device_choice.reason == "asked for" and asked.device == torch.device("cpu")
    assert all(t.device == torch.device("cpu") for t in asked.base.values())
    recipe = asked.recipe("ties", {"lambda": 1.0}, [{"weight": 1.0, "density": 0.5}] * len(experts))
    ours, theirs = asked.merge(recipe), auto.merge(recipe)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k].cpu()) for k in ours)


def test_the_app_and_explorer_info_show_where_the_tensors_are_and_why(family, capsys, monkeypatch):
    base, experts = family
    monkeypatch.delenv("MERGE_EXPLORER_DEVICE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on this machine, also on one with a GPU
    reason = f"tensors in RAM (torch {torch.__version__} sees no CUDA device)"
    report = Workbench(base.parent).load(str(base), [str(e) for e in experts])
    assert report.endswith(f"all compatible; {reason}.")
    assert main(["info", str(base), *map(str, experts)]) == 0
    said = capsys.readouterr().out
    assert "a session (3 checkpoint(s), " in said and reason in said and "stage cache budget: " in said


def force_the_torch_path(monkeypatch) -> None:
    """Every kernel takes its torch path (the one CUDA tensors take) for CPU tensors too."""
    forced = lambda _x, module: importlib.import_module(module)  # noqa: E731
    monkeypatch.setattr(kernels, "torch_path", forced)
    monkeypatch.setattr(scan_kernel, "torch_path", forced)


L1_RESCALED = {"dare_linear", "dare_ties", "della", "della_linear"}  # float64 norms summed in another order
# fisher estimates its Fisher with the model's tokenizer, which the tiny models lack; it calls no kernel
METHODS = [spec.name for spec in registry.all_methods() if not spec.needs_fisher]


@pytest.mark.parametrize("method", METHODS)
def test_a_session_merge_down_the_gpu_path_equals_the_compiled_one(family, method, monkeypatch):
    """Every method's merge the way a GPU runs it against the compiled CPU merge of the same recipe.

    On a CUDA machine the session lives on the GPU (equal within 1e-5: a GPU's own reductions); on a
    CPU-only one every kernel is sent down its torch path with CPU tensors (bit for bit, but for the
    L1 rescale of DARE and DELLA: within 1e-6).
    """
    base, experts = family
    experts = experts[: registry.get(method).max_models or len(experts)]
    known = {p.name for p in registry.get(method).params}
    settings = ({"weight": 0.7, "density": 0.6}, {"weight": 0.4, "density": 0.8})
    per_model = [{k: v for k, v in pm.items() if k in known} for pm in settings[: len(experts)]]
    theirs_session = MergeSession(base, experts, device="cpu")
    recipe = theirs_session.recipe(method, {}, per_model)
    theirs = theirs_session.merge(recipe)
    if torch.cuda.is_available():
        ours = {k: v.cpu() for k, v in MergeSession(base, experts, device="cuda").merge(recipe).items()}
    else:
        force_the_torch_path(monkeypatch)
        ours = MergeSession(base, experts, device="cpu").merge(recipe)
    for name, tensor in ours.items():
        if torch.cuda.is_available() or method in L1_RESCALED:
            tolerance = 1e-5 if torch.cuda.is_available() else 1e-6
            torch.testing.assert_close(tensor, theirs[name], rtol=tolerance, atol=tolerance)
        else:
            assert torch.equal(tensor, theirs[name]), name


def test_inspect_on_the_torch_kernels_measures_what_the_compiled_scan_does(family, monkeypatch):
    """The Inspect scan of a merge with the GPU's code path (run on the CPU) equals the compiled one's tables."""
    base, experts = family
    session = MergeSession(base, experts, device="cpu")
    merged = session.merge(session.recipe("ties", {}, [{"weight": 1.0, "density": 0.5}] * 2))
    theirs = scan(session, 0.5, merged)
    force_the_torch_path(monkeypatch)
    ours = scan(session, 0.5, merged)
    for table in ("experts", "entries", "pairs", "distances"):
        pd.testing.assert_frame_equal(getattr(ours, table), getattr(theirs, table), rtol=1e-6)
    assert torch.equal(ours.samples, theirs.samples)


def test_a_streamed_merge_on_the_torch_kernels_writes_the_compiled_bytes(family, tmp_path, monkeypatch):
    """``python -m explorer merge --device``: the GPU's code path (run on the CPU) writes what the compiled one does."""
    base, experts = family
    recipe = tmp_path / "ties.yaml"
    models = "".join(f"  - model: {e}\n    parameters: {{weight: 0.6, density: 0.4}}\n" for e in experts)
    recipe.write_text(f"merge_method: ties\nbase_model: {base}\nmodels:\n{models}dtype: bfloat16\n")
    for path, route in (("torch", lambda _x, module: importlib.import_module(module)), ("compiled", lambda *_: None)):
        monkeypatch.setattr(kernels, "torch_path", route)
        assert main(["merge", str(recipe), "--out", str(tmp_path / path), "--device", "cpu"]) == 0
    written = [(tmp_path / out / "model.safetensors").read_bytes() for out in ("torch", "compiled")]
    assert written[0] == written[1]


def test_the_cli_merges_on_the_cpu_unless_asked_for_a_gpu(family, tmp_path, fake_gpu):
    """A streaming merge pays a copy to the GPU and back per tensor: the CLI takes one only when asked.

    torch here only pretends to see a GPU, so a merge that tried to use it would fail.
    """
    base, experts = family
    recipe = tmp_path / "linear.yaml"
    recipe.write_text("merge_method: linear\nmodels:\n" + "".join(f"  - model: {e}\n" for e in experts))
    assert main(["merge", str(recipe), "--out", str(tmp_path / "out")]) == 0


def test_a_merge_on_a_device_that_is_not_there_is_refused_before_anything_is_written(family, tmp_path, capsys):
    base, experts = family
    recipe = tmp_path / "linear.yaml"
    recipe.write_text("merge_method: linear\nmodels:\n" + "".join(f"  - model: {e}\n" for e in experts))
    assert main(["merge", str(recipe), "--out", str(tmp_path / "out"), "--device", "cuda:7"]) == 2
    assert "device 'cuda:7'" in capsys.readouterr().err and not (tmp_path / "out").exists()
