"""Federated clients of one task: the training split in shards of unequal size, one fine-tune per shard.

``client_shards`` splits a task's training examples into disjoint shards (e.g. 60% / 30% / 10%) after
one seeded shuffle. ``train_clients`` fine-tunes the testbed's base on each shard
(``explorer.zoo.testbed.fine_tune``: the experts' learning rate, batch size, schedule and loss) for
a number of steps proportional to the shard's size, so every client makes about the same number of
passes over its own data, as FedAvg's clients run E local epochs (McMahan et al. 2017,
arXiv:1602.05629: u_k = E n_k / B local updates), and the clients together take the steps of the
one centralized expert. Each client is saved with a ``zoo_info.json`` whose ``n_train_examples`` is
its shard size n_k: the per-model ``examples`` of the ``fedavg`` method (``client_examples``).

Caching: each client is written to a hidden temporary folder and renamed when complete
(``explorer.zoo.train.save_checkpoint``), and reused when its ``zoo_info.json`` records the same
settings.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from explorer.zoo.tasks import Example
from explorer.zoo.testbed import Testbed, fine_tune, load_model
from explorer.zoo.train import save_checkpoint

INFO = "zoo_info.json"


def client_shards(examples: Sequence[Example], shares: Sequence[float], seed: int) -> list[list[Example]]:
    """Disjoint shards of ``examples`` with sizes ``round(share * len(examples))``, after a seeded shuffle.

    Args:
        examples: a task's training examples.
        shares: the clients' shares, each in (0, 1], summing to at most 1 (any rest is left out).
        seed: fixes the shuffle.

    Returns:
        One list of examples per share, in ``shares`` order.

    Raises:
        ValueError: a share outside (0, 1], shares summing to more than 1, or an empty shard.
    """
    if any(not 0 < s <= 1 for s in shares) or sum(shares) > 1 + 1e-9:
        raise ValueError(f"client shares {list(shares)} must be in (0, 1] and sum to at most 1")
    sizes = [round(s * len(examples)) for s in shares]
    if min(sizes) < 1:
        raise ValueError(f"client shares {list(shares)} of {len(examples)} examples leave a client without data")
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return [[examples[j] for j in order[a : a + n]] for a, n in zip(starts, sizes, strict=True)]


def client_steps(total_steps: int, shard_sizes: Sequence[int]) -> list[int]:
    """Local steps of each client: ``total_steps`` shared in proportion to the shard sizes (at least 1 each)."""
    total = sum(shard_sizes)
    return [max(1, round(total_steps * n / total)) for n in shard_sizes]


def train_clients(
    bed: Testbed,
    task: str,
    out_dir: str | Path,
    shares: Sequence[float],
    log: Callable[[str], None] = print,
) -> list[Path]:
    """Fine-tune ``bed.base`` once per shard of ``task``'s training split; return the client folders.

    Client k gets shard k (``client_shards``) and ``client_steps(bed.finetune.steps[task], sizes)[k]``
    steps, seeded with the set's seed (batch order). Folders are ``out_dir/client-K`` (K from 1), each a float32
    checkpoint with a ``zoo_info.json`` holding ``n_train_examples`` (the shard size), ``steps``,
    ``examples_seen`` and the settings; a finished client with the same settings is reused.
    """
    settings = bed.finetune
    shards = client_shards(bed.splits[task].train, shares, settings.seed)
    steps = client_steps(settings.steps[task], [len(s) for s in shards])
    folders = []
    for k, (shard, n_steps) in enumerate(zip(shards, steps, strict=True), start=1):
        out = Path(out_dir) / f"client-{k}"
        info = {
            "task": task,
            "client": k,
            "share": shares[k - 1],
            "n_train_examples": len(shard),
            "steps": n_steps,
            "examples_seen": n_steps * settings.batch_size,
            "batch_size": settings.batch_size,
            "learning_rate": settings.lr,
            "seed": settings.seed,
            "base": str(bed.base),
        }
        if not _finished(out, info):
            log(f"fedavg: client {k}: {len(shard)} examples, {n_steps} steps")
            model, tokenizer = load_model(bed.base)
            loss = fine_tune(bed, model, tokenizer, shard, n_steps)
            save_checkpoint(model, tokenizer, out, {**info, "final_train_loss": round(loss, 6)})
        folders.append(out)
    return folders


def client_examples(folder: str | Path) -> int:
    """n_k of a client: ``n_train_examples`` in its ``zoo_info.json`` (FedAvg's per-model ``examples``).

    Raises:
        FileNotFoundError: no ``zoo_info.json`` in ``folder``.
        KeyError: it records no ``n_train_examples``.
    """
    return int(json.loads((Path(folder) / INFO).read_text())["n_train_examples"])


def _finished(folder: Path, info: dict) -> bool:
    """Whether ``folder`` is a finished client whose ``zoo_info.json`` records ``info``."""
    path = folder / INFO
    if not (path.is_file() and (folder / "model.safetensors").is_file()):
        return False
    saved = json.loads(path.read_text())
    saved.pop("final_train_loss", None)
    return saved == info
