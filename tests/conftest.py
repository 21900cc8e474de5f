"""Shared pytest fixtures and hooks. Keep each section small and say what it builds and how long."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def model_facts(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Facts read off model classes (``explorer.io.model_facts``) kept in this run's temp folder, not ~/.cache.

    Unless ``MERGE_EXPLORER_FACTS_CACHE`` is set already; CLI subprocesses inherit it.
    """
    os.environ.setdefault("MERGE_EXPLORER_FACTS_CACHE", str(tmp_path_factory.mktemp("model_facts")))


# Demo zoo ------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def zoo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo zoo (tiny Llama base, three experts, lm-eval tasks), built once per session.

    Building takes about 2 CPU minutes. Set ``MERGE_EXPLORER_ZOO=/some/folder`` to keep it between
    sessions: the zoo there is reused when complete and built with today's ``ZooConfig``, and built
    there otherwise.
    """
    from explorer.zoo.tiny import build_zoo, zoo_is_built

    prebuilt = os.environ.get("MERGE_EXPLORER_ZOO")
    if not prebuilt:
        return build_zoo(tmp_path_factory.mktemp("zoo"))
    path = Path(prebuilt).expanduser().resolve()
    return path if zoo_is_built(path) else build_zoo(path)


# SmolLM2 expert set --------------------------------------------------------------------------


@pytest.fixture(scope="session")
def smollm2_experts_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The SmolLM2 expert set (base, expert-say, expert-rev, expert-add, tasks), built once.

    About 8 minutes on 2 idle cores. Set ``MERGE_EXPLORER_SMOLLM2=/some/folder`` to keep it
    between sessions: a finished set there is reused, otherwise it is built (or finished) there.
    """
    from explorer.zoo.experts import build_smollm2_experts

    prebuilt = os.environ.get("MERGE_EXPLORER_SMOLLM2")
    out = Path(prebuilt).expanduser().resolve() if prebuilt else tmp_path_factory.mktemp("smollm2")
    return build_smollm2_experts(out)


# Threads ---------------------------------------------------------------------------------------


@pytest.fixture()
def one_thread():
    """Tiny tensors: a second intra-op thread only adds synchronisation (10x slower on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
