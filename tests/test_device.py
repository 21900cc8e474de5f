"""Where a session keeps its tensors (``explorer.device``): the choice, its reason, and where it is shown.

This machine has no GPU: the CUDA side of the choice is checked with torch.cuda's queries replaced by a
fake device of known free memory; the kernels' CUDA path is checked on CPU tensors in test_torch_kernels.
"""

from __future__ import annotations

import pytest
import torch

from explorer.cli import main
from explorer.device import GiB, choose_device
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
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_the_app_and_explorer_info_show_where_the_tensors_are_and_why(family, capsys, monkeypatch):
    base, experts = family
    monkeypatch.delenv("MERGE_EXPLORER_DEVICE", raising=False)
    reason = f"tensors in RAM (torch {torch.__version__} sees no CUDA device)"
    report = Workbench(base.parent).load(str(base), [str(e) for e in experts])
    assert report.endswith(f"all compatible; {reason}.")
    assert main(["info", str(base), *map(str, experts)]) == 0
    said = capsys.readouterr().out
    assert "a session (3 checkpoint(s), " in said and reason in said and "stage cache budget: " in said
