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
    assert choice.describe() == "tensors on cuda:0 (Test GPU has 10.0 GiB free, the session needs 4.0 GiB)"


def test_auto_keeps_the_tensors_in_ram_when_the_gpu_lacks_room(fake_gpu):
    choice = choose_device(12 * GiB)
    assert choice.device == torch.device("cpu")
    assert choice.describe() == "tensors in RAM (Test GPU has 10.0 GiB free, the session needs 12.0 GiB)"


def test_an_asked_device_wins_and_a_missing_one_is_refused_with_the_fix(fake_gpu, monkeypatch):
    assert choose_device(GiB, "cpu").describe() == "tensors in RAM (asked for)"
    assert choose_device(12 * GiB, "cuda").device == torch.device("cuda:0")  # asked: taken even when tight
    monkeypatch.setenv("MERGE_EXPLORER_DEVICE", "cpu")
    assert choose_device(GiB).device == torch.device("cpu")
    with pytest.raises(ValueError, match="torch sees 1 CUDA device"):
        choose_device(GiB, "cuda:3")
    with pytest.raises(ValueError, match="not one of auto, cpu, cuda, cuda:N"):
        choose_device(GiB, "tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="sees no CUDA device: install a CUDA build of torch"):
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


@pytest.fixture
def torch_kernels_on_the_cpu(monkeypatch):
    """Every kernel takes its torch path (the one CUDA tensors take) for CPU tensors too."""
    forced = lambda _x, module: importlib.import_module(module)  # noqa: E731
    monkeypatch.setattr(kernels, "torch_path", forced)
    monkeypatch.setattr(scan_kernel, "torch_path", forced)


EXACT = ["linear", "task_arithmetic", "ties", "breadcrumbs_ties"]


@pytest.mark.parametrize("method", [*EXACT, "dare_ties", "dare_linear", "della"])
def test_a_session_merge_on_the_torch_kernels_equals_the_compiled_one(
    family, method, torch_kernels_on_the_cpu, monkeypatch
):
    """The GPU's code path, run on the CPU: the same merge as the compiled kernels give, bit for bit.

    DARE and DELLA rescale by L1 norms summed in float64 in another order (``torch_kernels.l1_norm``):
    equal within 1e-6 there.
    """
    base, experts = family
    session = MergeSession(base, experts, device="cpu")
    known = {p.name for p in registry.get(method).params}
    per_model = [
        {k: v for k, v in pm.items() if k in known}
        for pm in ({"weight": 0.7, "density": 0.6}, {"weight": 0.4, "density": 0.8})
    ]
    recipe = session.recipe(method, {}, per_model)
    ours = session.merge(recipe)
    monkeypatch.setattr(kernels, "torch_path", lambda _x, _module: None)  # the compiled kernels
    session.clear_cache()
    theirs = session.merge(recipe)
    for name, tensor in ours.items():
        if method in EXACT:
            assert torch.equal(tensor, theirs[name]), name
        else:
            torch.testing.assert_close(tensor, theirs[name], rtol=1e-6, atol=1e-7)


def test_inspect_on_the_torch_kernels_measures_what_the_compiled_scan_does(family, monkeypatch):
    """The Inspect scan of a merge with the GPU's code path (run on the CPU) equals the compiled one's tables."""
    base, experts = family
    session = MergeSession(base, experts, device="cpu")
    merged = session.merge(session.recipe("ties", {}, [{"weight": 1.0, "density": 0.5}] * 2))
    theirs = scan(session, 0.5, merged)
    forced = lambda _x, module: importlib.import_module(module)  # noqa: E731
    monkeypatch.setattr(kernels, "torch_path", forced)
    monkeypatch.setattr(scan_kernel, "torch_path", forced)
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


def test_a_merge_on_a_device_that_is_not_there_is_refused_before_anything_is_written(family, tmp_path, capsys):
    base, experts = family
    recipe = tmp_path / "linear.yaml"
    recipe.write_text("merge_method: linear\nmodels:\n" + "".join(f"  - model: {e}\n" for e in experts))
    assert main(["merge", str(recipe), "--out", str(tmp_path / "out"), "--device", "cuda:7"]) == 2
    assert "device 'cuda:7'" in capsys.readouterr().err and not (tmp_path / "out").exists()
