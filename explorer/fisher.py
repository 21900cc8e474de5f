"""Diagonal Fisher information of a causal LM on local text, cached as safetensors.

Per token t of a text chunk, with g_t = d/d(theta) log p_theta(y_t | x_<t):

    F = (1 / T) sum_t g_t * g_t          (element-wise; T tokens in all)
    y_t ~ p_theta(. | x_<t)   labels="sampled"    the true Fisher (Matena & Raffel, arXiv:2111.09832)
    y_t = x_t                 labels="empirical"  the empirical Fisher

One backward pass per batch instead of one per token: each batch backpropagates
sum_t s_t log p(y_t | x_<t) with independent random signs s_t = +/-1, whose squared gradient has
expectation sum_t g_t^2 (the cross terms s_t s_u g_t g_u average to zero). The estimate is unbiased;
its noise falls with the number of batches, and it is exact when a batch holds one token
(batch_size 1, max_length 2). The text is Python's own ``pydoc_data.topics`` unless given.

``fisher_file`` caches the result under ``cache_dir`` (never inside the model's folder), keyed by the
model path, its files' mtimes and sizes, the settings and the text: one float32 tensor per state-dict
key of every trainable parameter (tied weights are stored under each of their names).

``fisher_extras`` is the setup a Fisher merge needs before its first tensor: it estimates (or finds
cached) each model's Fisher and returns what the executor passes to the method per tensor.
``fisher_inputs`` does the same with one text per model (e.g. each expert's own task data). This
module loads models (transformers) and writes a cache, so it belongs with the input side: the
executor may import it, the methods never do (``explorer.methods.fisher_merge`` only receives the
tensors).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from explorer.choices import FisherLabels, parse_choice
from explorer.io.formats.base import Checkpoint
from explorer.progress import Progress

DEFAULT_CACHE = Path("~/.cache/merge_explorer/fisher")


@dataclass(frozen=True)
class FisherSettings:
    """How a Fisher is estimated; every field is part of the cache key."""

    n_examples: int = 64  # text chunks (sequences) used
    batch_size: int = 4  # chunks per backward pass
    max_length: int = 128  # tokens per chunk (max_length - 1 predictions each)
    labels: FisherLabels = FisherLabels.sampled  # "sampled" (true Fisher) | "empirical"
    seed: int = 0  # labels and signs are drawn from torch.Generator(seed)

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", parse_choice(FisherLabels, self.labels, "Fisher labels"))

    @classmethod
    def from_params(cls, params: dict, seed: int = 0) -> FisherSettings:
        """Settings from the ``fisher`` method's setup params (fisher_examples, ...)."""
        return cls(
            int(params["fisher_examples"]),
            int(params["fisher_batch_size"]),
            int(params["fisher_max_length"]),
            params["fisher_labels"],
            seed,
        )


def default_text() -> str:
    """About 465,000 characters of the Python language reference, shipped with Python (offline)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def text_chunks(tokenizer: Any, n_examples: int, max_length: int, text: Optional[str] = None) -> torch.Tensor:
    """(n_examples, max_length) int64 token ids: consecutive chunks of the tokenized text.

    tokenizer: called as tokenizer(text, add_special_tokens=False)["input_ids"]. Raises ValueError when
    the text has fewer than n_examples * max_length tokens (lower either setting).
    """
    ids = tokenizer(default_text() if text is None else text, add_special_tokens=False)["input_ids"]
    need = n_examples * max_length
    if len(ids) < need or max_length < 2:
        raise ValueError(
            f"Fisher text has {len(ids)} tokens; {n_examples} chunks of {max_length} (>= 2) need {need}. "
            "Lower fisher_examples or fisher_max_length"
        )
    return torch.tensor(ids[:need], dtype=torch.long).reshape(n_examples, max_length)


def estimate_fisher(
    model: torch.nn.Module, input_ids: torch.Tensor, settings: FisherSettings, progress: Optional[Progress] = None
) -> dict[str, torch.Tensor]:
    """Diagonal Fisher of ``model`` on ``input_ids`` (n, L): {parameter name: float32 tensor}.

    model: returns ``.logits`` (B, L, V) from ``model(input_ids=...)``; it runs on the device of its
    parameters, is put in eval mode (no dropout) and its gradients are overwritten. Values are per token, >= 0, in squared
    log-probability units per unit of the parameter. progress(fraction in [0, 1], message) per batch.
    """
    model.eval()
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    sums = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
    device = next(iter(params.values())).device
    generator = torch.Generator().manual_seed(settings.seed)  # on the CPU: same draws on every device
    tokens, n = 0, input_ids.shape[0]
    for start in range(0, n, settings.batch_size):
        ids = input_ids[start : start + settings.batch_size].to(device)
        logp = torch.log_softmax(model(input_ids=ids).logits[:, :-1].float(), dim=-1)  # (B, L-1, V)
        if settings.labels == FisherLabels.sampled:
            probs = logp.detach().exp().reshape(-1, logp.shape[-1]).cpu()
            labels = torch.multinomial(probs, 1, generator=generator).reshape(logp.shape[:-1]).to(device)
        else:
            labels = ids[:, 1:]
        picked = logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)  # (B, L-1)
        signs = (torch.randint(0, 2, picked.shape, generator=generator) * 2 - 1).to(device, picked.dtype)
        model.zero_grad(set_to_none=True)
        (signs * picked).sum().backward()
        for name, p in params.items():
            if p.grad is not None:
                sums[name] += p.grad.float() ** 2
        tokens += picked.numel()
        done = min(start + settings.batch_size, n)
        if progress:
            progress(done / n, f"Fisher: {done}/{n} chunks")
    model.zero_grad(set_to_none=True)
    return {name: (s / tokens).cpu() for name, s in sums.items()}


def fisher_file(
    model_path: str | os.PathLike,
    settings: FisherSettings,
    cache_dir: Optional[str | os.PathLike] = None,
    progress: Optional[Progress] = None,
    load: Optional[Callable[[Path], tuple[Any, Any]]] = None,
    text: Optional[str] = None,
    device: Optional[str] = None,
) -> Path:
    """Path of the cached Fisher safetensors of the model at ``model_path``, estimating it if needed.

    model_path: a checkpoint folder, or a .gguf file. cache_dir: default ~/.cache/merge_explorer/fisher.
    load(path) -> (model, tokenizer): default ``load_causal_lm``. device: where to run ("cuda"); default
    where ``load`` puts the model. progress(fraction, message) per batch. Raises ValueError when
    cache_dir lies inside the model's folder (inputs are never written to). The file is written under
    a temporary name and renamed when complete.
    """
    path = Path(model_path).expanduser().resolve()
    folder = path if path.is_dir() else path.parent
    cache = Path(cache_dir or DEFAULT_CACHE).expanduser().resolve()
    if cache == folder or folder in cache.parents:
        raise ValueError(f"Fisher cache {cache} is inside the input folder {folder}; choose a cache_dir outside it")
    out = cache / f"{cache_key(path, settings, text)}.safetensors"
    if out.exists():
        return out
    model, tokenizer = (load or load_causal_lm)(path)
    if device is not None:
        model.to(device)
    ids = text_chunks(tokenizer, settings.n_examples, settings.max_length, text)
    fisher = estimate_fisher(model, ids, settings, progress)
    named = {key: fisher[name] for key, name in _state_dict_names(model).items() if name in fisher}
    cache.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".tmp{os.getpid()}")
    try:
        save_file(
            {k: v.contiguous().clone() for k, v in named.items()},
            str(tmp),
            metadata={"settings": json.dumps(asdict(settings))},
        )
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def cache_key(path: Path, settings: FisherSettings, text: Optional[str] = None) -> str:
    """sha256 (24 hex digits) of the path, every file's relative name, size and mtime, settings and text."""
    files = sorted(p for p in (path.rglob("*") if path.is_dir() else [path]) if p.is_file())
    stamp = [
        (str(p.relative_to(path) if path.is_dir() else p.name), p.stat().st_size, p.stat().st_mtime_ns) for p in files
    ]
    text_hash = hashlib.sha256(text.encode()).hexdigest() if text is not None else "pydoc_data.topics"
    blob = json.dumps([str(path), stamp, asdict(settings), text_hash, 1])
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def load_causal_lm(path: Path) -> tuple[Any, Any]:
    """A transformers causal LM (float32) and its tokenizer from a folder or a .gguf file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": path.name} if path.suffix == ".gguf" else {}
    where = path.parent if path.suffix == ".gguf" else path
    model = AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32, **kwargs)
    return model, AutoTokenizer.from_pretrained(where, **kwargs)


def _state_dict_names(model: torch.nn.Module) -> dict[str, str]:
    """{state-dict key: parameter name} for every key that holds a parameter (tied keys included)."""
    by_id = {id(p): name for name, p in model.named_parameters()}
    return {key: by_id[id(t)] for key, t in model.state_dict(keep_vars=True).items() if id(t) in by_id}


class FisherInputs:
    """The cached diagonal Fisher of each model of a merge, read one tensor name at a time.

    Calling it with a tensor name gives the method's extra keyword inputs for that tensor:
    ``{"fisher": (N, *S) float32}`` laid out as the models' (possibly vocabulary-aligned) tensors are,
    or ``{"fisher": None}`` when a model has no Fisher for the name (a buffer), which the Fisher merge
    treats as the plain weighted average. Token rows a model lacks in an aligned vocabulary get
    Fisher 0: that model knows nothing about the token (``explorer.io.vocab``).
    """

    def __init__(self, models: Sequence[Checkpoint], files: Sequence[Path]):
        self.models = list(models)
        self.paths = list(files)
        self.files = [safe_open(str(f), framework="pt") for f in files]

    def __call__(self, name: str) -> dict[str, Optional[torch.Tensor]]:
        """{"fisher": (N, *S) float32 Fisher of tensor ``name``, or None when a model has none for it}."""
        keys = [model.own_name(name) for model in self.models]
        if not all(key in f.keys() for key, f in zip(keys, self.files, strict=True)):
            return {"fisher": None}
        placed = []
        for model, key, file, path in zip(self.models, keys, self.files, self.paths, strict=True):
            fisher = model.place_rows(name, file.get_tensor(key).float())
            if tuple(fisher.shape) != tuple(model.shape(name)):
                raise ValueError(
                    f"{model.path}: its Fisher of {name!r} has shape {list(fisher.shape)}, the tensor {list(model.shape(name))}; "
                    f"delete the cached Fisher {path} and merge again"
                )
            placed.append(fisher)
        return {"fisher": torch.stack(placed)}


def fisher_extras(
    spec: Any,
    params: dict,
    models: Sequence[Checkpoint],
    seed: int = 0,
    cache_dir: Optional[str | os.PathLike] = None,
    progress: Optional[Progress] = None,
) -> Optional[FisherInputs]:
    """The per-tensor Fisher inputs of a merge with method ``spec``, or None when it needs none.

    spec: a ``MethodSpec`` (only ``needs_fisher`` is read); params: its resolved params (the
    ``fisher_*`` setup params give the ``FisherSettings``); models: the opened (and aligned) models,
    in recipe order, as the merge reads them. Estimates each model's Fisher on the default text
    unless cached (``fisher_inputs``). Raises ValueError as ``fisher_file`` does.
    """
    if not spec.needs_fisher:
        return None
    return fisher_inputs(models, FisherSettings.from_params(params, seed=seed), None, cache_dir, progress)


def fisher_inputs(
    models: Sequence[Checkpoint],
    settings: FisherSettings,
    texts: Optional[Sequence[Optional[str]]] = None,
    cache_dir: Optional[str | os.PathLike] = None,
    progress: Optional[Progress] = None,
) -> FisherInputs:
    """Each model's Fisher (estimated, or found in the cache) as the per-tensor inputs of a Fisher merge.

    Args:
        models: the opened (and aligned) models, in recipe order, as the merge reads them
            (``MergeSession.model_ckpts``).
        settings: how every Fisher is estimated.
        texts: the text each model's Fisher is estimated on, one per model (``None`` in the list:
            the default text). Matena & Raffel estimate each model's Fisher on its own task's
            data: pass, e.g., that task's training prompts and answers joined into one string.
            ``None``: the default text for every model.
        cache_dir: folder of cached estimates (default ~/.cache/merge_explorer/fisher).
        progress: progress(fraction over all models, message) per batch.

    Returns:
        ``FisherInputs``: pass it as ``extras`` to ``explorer.executor.merge_stream``.

    Raises:
        ValueError: ``texts`` does not hold one entry per model, or as ``fisher_file`` does.
    """
    texts = [None] * len(models) if texts is None else list(texts)
    if len(texts) != len(models):
        raise ValueError(f"Fisher texts: {len(texts)} given for {len(models)} models; give one per model")
    files = []
    for i, (model, text) in enumerate(zip(models, texts, strict=True)):
        step = None
        if progress:

            def step(f: float, m: str, i: int = i, path: Path = Path(model.path)) -> None:
                progress((i + f) / len(models), f"Fisher of {path.name}: {m}")

        files.append(fisher_file(model.path, settings, cache_dir, step, text=text))
    return FisherInputs(models, files)
