"""Merge PEFT LoRA adapters of one base into a new LoRA adapter folder (not a full checkpoint).

Each input adapter i adapts module m with A_i (r_i, in) and B_i (out, r_i) at scale s_i
(lora_alpha / r, or / sqrt(r) with use_rslora, per module with rank_pattern/alpha_pattern; see
``explorer.io.formats.lora.lora_scale``); its task vector there is d_i = s_i B_i A_i (out, in).
The new adapter has scale 1 on every module (lora_alpha = r, use_rslora off):

- ``method="cat"`` (exact; task arithmetic with weights w_i, any real numbers):
      A = concat_rows(w_i s_i A_i)   (sum_i r_i, in)
      B = concat_cols(B_i)           (out, sum_i r_i)
  so B A = sum_i w_i s_i B_i A_i, and the folded adapter is base + sum_i w_i d_i exactly. The weight
  and scale go on A, as PEFT does, so the factors equal PEFT's bit for bit.
- any delta-space method of the registry (``task_arithmetic``, ``ties``, ``dare_ties``, ``della``...):
  the task vectors d_i (float32, in the weight's layout) of each module are merged by that method,
  exactly as ``explorer.executor`` merges full checkpoints (same params, same per-tensor seed, the
  method's whole-model pre-pass), then re-factored by a truncated SVD D = U S V^T:
      B = U_r diag(S_r)  (out, r),   A = V_r^T  (r, in)
  with r = ``rank`` (default: the largest input rank), capped at min(out, in) per module. At full rank
  the folded adapter equals the full-checkpoint merge of the folded inputs up to float32 rounding;
  below it, B A is the best rank-r approximation of the merged delta (Eckart-Young).

Reference: PEFT ``LoraModel.add_weighted_adapter`` (src/peft/tuners/lora/model.py), combination types
"cat" and "svd" (= method "task_arithmetic"; PEFT's "ties_svd"/"dare_*_svd" are our "ties"/"dare_*"
with election="unweighted", divisor="count", rescale="inverse_density"). Differences, by choice:
no ``svd_clamp`` (PEFT's default is none too); ranks are exact per module (rank_pattern) where PEFT
pads "cat" with zero rows to the sum of the largest ranks; use_rslora is off in the output, where
PEFT copies the first adapter's flag (which would rescale its "cat" result); adapters must adapt the
same modules, where PEFT treats a missing module as a zero delta (a zero changes TIES votes and
divisors silently; refusing keeps the merge equal to the full-checkpoint one).

Supported inputs: linear and embedding LoRA (lora_embedding_A/B), fan_in_fan_out layers, different
ranks, rsLoRA, rank/alpha patterns, .safetensors or .bin weights. Whole tensors an adapter saves
(modules_to_save, PEFT's copy of an adapted embedding ``*.base_layer.weight``) are copied when every
adapter saves the identical tensor, and refused otherwise. Refused like the folding view refuses
them (``explorer.io.formats.lora``): DoRA, LoRA biases, trainable tokens, target_parameters, non-LoRA.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import reduce
from pathlib import Path

import torch
from safetensors.torch import save_file

from explorer import registry
from explorer.choices import Space
from explorer.executor import merge_stream
from explorer.io.checkpoint import open_checkpoint
from explorer.io.formats.base import DTYPES, CheckpointError
from explorer.io.formats.bin import PickleFile
from explorer.io.formats.hf_cache import hub_snapshot
from explorer.io.formats.lora import (
    LoraCheckpoint,
    adapter_base,
    check_ranks,
    fold_delta,
    index_adapter,
    lora_scale,
    open_adapter,
    read_adapter_config,
)
from explorer.io.formats.refs import ADAPTER_CONFIG
from explorer.io.formats.safetensors_io import SafetensorsFile
from explorer.io.inputs import task_vectors
from explorer.io.writer import check_output_dir, staged_folder
from explorer.recipe import MergeRecipe

ADAPTER_FILE = "adapter_model.safetensors"
FOLD_HINT = "or fold the adapters into the base and merge full checkpoints instead (python -m explorer merge, models given as BASE+ADAPTER)"


@dataclass
class LoraAdapter:
    """One opened, checked input adapter folder."""

    path: Path
    config: dict
    file: SafetensorsFile | PickleFile
    lora: dict[str, dict]  # target weight name -> {"module", "embedding", "A", "B"} (``index_adapter``)
    whole: dict[str, str]  # base tensor name -> adapter key of a whole tensor it saves
    base: str | None  # the base it names: an absolute local path, a hub id, or None

    @classmethod
    def open(cls, path: str | Path) -> LoraAdapter:
        """Read and check ``path``; CheckpointError naming the folder for anything not plain LoRA."""
        path = Path(path).expanduser()
        if not (path / ADAPTER_CONFIG).is_file():
            raise CheckpointError(
                f"{path}: not a LoRA adapter folder (no {ADAPTER_CONFIG}); merge-adapters takes PEFT adapter folders"
            )
        config = read_adapter_config(path)
        file = open_adapter(path)
        lora, whole = index_adapter(path, file)
        if not lora:
            raise CheckpointError(f"{path}: adapter holds no lora_A/lora_B tensors; nothing to merge")
        check_ranks(path, file, lora, config)
        return cls(path, config, file, lora, whole, _base_reference(path, config))

    def rank(self, name: str) -> int:
        """The rank r of module ``name``'s LoRA factors (rows of A)."""
        return self.file.shape(self.lora[name]["A"])[0]

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A (r, in), B (out, r)) of target ``name`` as stored; CheckpointError on NaN/inf."""
        entry = self.lora[name]
        return self._finite(name, self.file.read(entry["A"])), self._finite(name, self.file.read(entry["B"]))

    def weight_shape(self, name: str) -> tuple[int, int]:
        """Shape of the adapted base weight: (out, in), or (in, out) when ``transposed``."""
        entry = self.lora[name]
        shape = (self.file.shape(entry["B"])[0], self.file.shape(entry["A"])[1])
        return shape[::-1] if self.transposed(name) else shape

    def delta(self, name: str) -> torch.Tensor:
        """Task vector s B A of target ``name``, float32, in the base weight's layout (out, in)."""
        return self._finite(name, fold_delta(self.file, self.lora[name], self.config))

    def __getitem__(self, name: str) -> torch.Tensor:
        """``delta(name)``: read by tensor name, an adapter is a model of a source whose base is zero (``_DeltaSource``)."""
        return self.delta(name)

    def _finite(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        if not torch.isfinite(tensor).all():
            raise CheckpointError(
                f"{self.path}: LoRA of {self.lora[name]['module']!r} holds NaN/inf values; this adapter is corrupt or diverged; retrain or drop it"
            )
        return tensor

    def transposed(self, name: str) -> bool:
        """Whether the weight's layout is (B A)^T: embeddings and fan_in_fan_out (GPT-2 Conv1D) layers."""
        return self.lora[name]["embedding"] or bool(self.config.get("fan_in_fan_out"))


def _base_reference(path: Path, config: dict) -> str | None:
    """The base the adapter names: a local folder as its absolute path, else the name as written."""
    ref = config.get("base_model_name_or_path")
    try:
        local = adapter_base(path)
    except CheckpointError:
        return ref
    return ref if local == hub_snapshot(ref) else str(local.resolve())


def open_adapters(paths: Sequence[str | Path], base: str | None = None) -> list[LoraAdapter]:
    """Open the adapters and check that they merge into one adapter; raises CheckpointError naming the fix.

    Checked: one base (the names in adapter_config.json agree, unless ``base`` is given), the same
    adapted modules with the same shapes, the same fan_in_fan_out, whole tensors identical in all;
    with ``base`` given and on this machine, that every adapted module fits its shapes.
    """
    if not paths:
        raise ValueError("merge-adapters needs at least one adapter folder")
    adapters = [LoraAdapter.open(p) for p in paths]
    first = adapters[0]
    for other in adapters[1:]:
        if base is None and other.base != first.base:
            raise CheckpointError(
                f"{other.path}: trained on base {other.base!r}, but {first.path} on {first.base!r}; adapters merge into one adapter only on "
                "one base. If both name the same model, give it explicitly (--base BASE)"
            )
        _check_same_modules(first, other)
        _check_same_whole(first, other)
    if base is not None:
        _check_fits(adapters, base)
    return adapters


def _check_fits(adapters: Sequence[LoraAdapter], base: str) -> None:
    """Check that every adapted module fits the given ``base``, when that base is on this machine.

    A folder or a repo in the HF cache: the check folding does (``LoraCheckpoint``), raising
    CheckpointError naming the fix.
    """
    if not Path(base).expanduser().exists() and hub_snapshot(base) is None:
        return  # a hub name that is not downloaded: nothing to check against
    base_checkpoint = open_checkpoint(base)
    for adapter in adapters:
        LoraCheckpoint(adapter.path, base_checkpoint)


def _check_same_modules(first: LoraAdapter, other: LoraAdapter) -> None:
    fix = f"retrain it with the same target_modules as {first.path}, {FOLD_HINT}"
    differ = sorted(first.lora.keys() ^ other.lora.keys())
    if differ:
        lacking, module = other if differ[0] in first.lora else first, differ[0].removesuffix(".weight")
        raise CheckpointError(
            f"{lacking.path}: does not adapt {module!r} ({len(differ)} modules differ), which another input adapts; adapters merged into one adapter must adapt the same modules: {fix}"
        )
    if bool(first.config.get("fan_in_fan_out")) != bool(other.config.get("fan_in_fan_out")):
        raise CheckpointError(
            f"{other.path}: fan_in_fan_out differs from {first.path}; these adapters were made for different layer types: {fix}"
        )
    for name in sorted(first.lora):
        for part, axis in (("A", 1), ("B", 0)):
            a, b = first.file.shape(first.lora[name][part]), other.file.shape(other.lora[name][part])
            if a[axis] != b[axis] or first.lora[name]["embedding"] != other.lora[name]["embedding"]:
                raise CheckpointError(
                    f"{other.path}: LoRA of {first.lora[name]['module']!r} has lora_{part} shape {list(b)}, {first.path} {list(a)}; these adapters were trained on different base models"
                )


def _check_same_whole(first: LoraAdapter, other: LoraAdapter) -> None:
    names = sorted(first.whole.keys() | other.whole.keys())
    for name in names:
        if (
            name not in first.whole
            or name not in other.whole
            or not torch.equal(first.file.read(first.whole[name]), other.file.read(other.whole[name]))
        ):
            raise CheckpointError(
                f"{other.path}: saves whole tensor {name!r} (modules_to_save or a resized embedding) that is not identical in {first.path}; "
                f"whole tensors cannot be merged as an adapter: train without modules_to_save, {FOLD_HINT}"
            )
    if first.config.get("modules_to_save") != other.config.get("modules_to_save"):
        raise CheckpointError(f"{other.path}: modules_to_save differs from {first.path}; {FOLD_HINT}")


def cat_factors(
    adapters: Sequence[LoraAdapter], name: str, weights: Sequence[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (sum r_i, in), B (out, sum r_i)) float32 with B A = sum_i w_i s_i B_i A_i, for target ``name``."""
    parts = [adapter.factors(name) for adapter in adapters]
    scales = [lora_scale(adapter.config, adapter.lora[name]["module"]) for adapter in adapters]
    a = torch.cat([a.float() * w * s for (a, _), w, s in zip(parts, weights, scales, strict=True)], dim=0)
    b = torch.cat([b.float() for _, b in parts], dim=1)
    return a, b


def svd_factors(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` factors of ``delta`` (out, in) float32: (A = V_r^T (r, in), B = U_r diag(S_r) (out, r)).

    ``rank`` must be in [1, min(out, in)]; at min(out, in), B A == delta up to float32 rounding.
    """
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)  # (out, k), (k,), (k, in); k = min(out, in)
    return vh[:rank].contiguous(), (u[:, :rank] * s[:rank]).contiguous()


@dataclass
class _DeltaSource:
    """The adapters' task vectors B A as an ``explorer.io.inputs.TensorSource`` whose base is zero.

    ``models`` are the adapters (``LoraAdapter[name]`` is its task vector); ``base`` maps every name
    to zeros, so the merge loop's M_i - B is the adapters' own B A.
    """

    adapters: list[LoraAdapter]
    names: list[str]

    @property
    def base(self) -> Mapping[str, torch.Tensor]:
        return _Zeros(self.adapters[0])

    @property
    def models(self) -> list[LoraAdapter]:
        return self.adapters

    @property
    def model_paths(self) -> list[Path]:
        return [a.path for a in self.adapters]

    def read_base(self, name: str) -> torch.Tensor:
        return self.base[name]

    def read_models(self, name: str) -> torch.Tensor:
        return torch.stack([a[name] for a in self.adapters])  # (N, out, in)

    def task_vectors(self, name: str) -> torch.Tensor:
        return task_vectors(self, name)


@dataclass
class _Zeros(Mapping):
    """name -> zeros shaped like the weight ``adapter`` adapts under that name."""

    adapter: LoraAdapter

    def __getitem__(self, name: str) -> torch.Tensor:
        return torch.zeros(self.adapter.weight_shape(name))

    def __iter__(self) -> Iterator[str]:
        return iter(self.adapter.lora)

    def __len__(self) -> int:
        return len(self.adapter.lora)


def merge_adapters(
    adapters: Sequence[str | Path],
    out_dir: str | Path,
    weights: Sequence[float] | None = None,
    method: str = "cat",
    parameters: dict | None = None,
    rank: int | None = None,
    seed: int = 0,
    base: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Merge LoRA adapter folders into a new adapter folder ``out_dir``; returns its resolved path.

    weights: one real number per adapter (default 1 each). method: "cat", or a delta-space registry
    method whose other settings come from ``parameters`` (e.g. {"density": 0.5, "lambda": 1.0}, as in a
    recipe's top-level parameters; applied to every adapter). rank: rank of the output for a registry
    method, >= 1 (default: the largest input rank); "cat" takes no rank and no parameters. seed: for
    random methods (DARE), per tensor as in a full merge. base: the shared base (path or hub id)
    written to the output; given, it skips the check that the inputs name one base.

    Writes adapter_config.json, adapter_model.safetensors (in the inputs' common dtype) and README.md
    to a temporary folder renamed when complete. Raises CheckpointError (bad input, output folder
    overlapping an input or not empty without ``overwrite``) or ValueError (bad settings), before
    anything is written.
    """
    loaded = open_adapters(adapters, base)
    weights = [1.0] * len(loaded) if weights is None else [float(w) for w in weights]
    if len(weights) != len(loaded) or not all(math.isfinite(w) for w in weights):
        raise ValueError(f"give one finite weight per adapter: {len(loaded)} adapters, weights {weights}")
    inputs = [a.path for a in loaded] + [Path(a.base) for a in loaded if a.base and Path(a.base).is_dir()]
    out = check_output_dir(out_dir, inputs, overwrite)
    names = sorted(loaded[0].lora)
    if method == "cat":
        if parameters or rank is not None:
            raise ValueError(
                "method cat takes only weights (its rank is the sum of the input ranks); for density, lambda or a rank use a registry method such as ties"
            )
        factors = {name: cat_factors(loaded, name, weights) for name in names}
    else:
        factors = _merged_factors(loaded, names, weights, method, parameters or {}, rank, seed, base)
    tensors = _adapter_tensors(loaded[0], factors, _common_dtype(loaded))
    ranks = {loaded[0].lora[name]["module"]: a.shape[0] for name, (a, _) in factors.items()}
    config = _adapter_config(loaded[0].config, ranks, base or loaded[0].base)
    with staged_folder(out, overwrite) as tmp:
        save_file(tensors, str(tmp / ADAPTER_FILE), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
        (tmp / "README.md").write_text(_card(loaded, weights, method, parameters, rank, seed, config))
    return out


def _merged_factors(
    loaded, names, weights, method, parameters, rank, seed, base
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Merge each module's task vectors with registry ``method`` (via the executor), then SVD to ``rank``."""
    try:
        spec = registry.get(method)
    except KeyError as e:
        raise ValueError(f"{e.args[0]}; or cat") from None
    if spec.space != Space.delta or spec.needs_fisher:
        deltas = ", ".join(s.name for s in registry.all_methods() if s.space == Space.delta)
        raise ValueError(
            f"method {method} merges whole weights, and an adapter holds only a task vector: use cat or one of {deltas}; {FOLD_HINT}"
        )
    if rank is not None and (isinstance(rank, bool) or int(rank) != rank or rank < 1):
        raise ValueError(f"rank must be a whole number >= 1, got {rank!r}")
    rank = int(rank) if rank is not None else max(a.rank(n) for a in loaded for n in names)
    has_weight = any(p.name == "weight" for p in spec.params)
    recipe = MergeRecipe(
        merge_method=method,
        base_model=base or loaded[0].base or "base",
        parameters=parameters,
        seed=seed,
        models=[
            {"model": str(a.path), "parameters": {"weight": w} if has_weight else {}}
            for a, w in zip(loaded, weights, strict=True)
        ],
    )
    factors = {}
    for name, merged in merge_stream(_DeltaSource(loaded, names), recipe):
        delta = merged.T if loaded[0].transposed(name) else merged  # (out, in) of B A
        factors[name] = svd_factors(delta, min(rank, *delta.shape))
    return factors


def _common_dtype(loaded: Iterable[LoraAdapter]) -> torch.dtype:
    dtypes = [DTYPES[a.file.dtype(e[p])] for a in loaded for e in a.lora.values() for p in ("A", "B")]
    return reduce(torch.promote_types, dtypes)


def _adapter_tensors(first: LoraAdapter, factors: dict, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The output's tensors under the first input's key names, plus the whole tensors all inputs share."""
    tensors = {}
    for name, (a, b) in factors.items():
        entry = first.lora[name]
        tensors[entry["A"]], tensors[entry["B"]] = a.to(dtype).contiguous(), b.to(dtype).contiguous()
    tensors.update({key: first.file.read(key).contiguous() for key in first.whole.values()})
    return tensors


def _adapter_config(first: dict, ranks: dict[str, int], base: str | None) -> dict:
    """The first input's config with scale 1 everywhere: lora_alpha = r, per-module ranks as patterns.

    target_modules lists the adapted modules by full name, so exactly those are adapted on load.
    """
    r = max(ranks.values())
    odd = {module: k for module, k in sorted(ranks.items()) if k != r}
    return dict(
        first,
        r=r,
        lora_alpha=r,
        rank_pattern=odd,
        alpha_pattern=dict(odd),
        use_rslora=False,
        target_modules=sorted(ranks),
        layers_to_transform=None,
        layers_pattern=None,
        exclude_modules=None,
        base_model_name_or_path=base,
        inference_mode=True,
    )


def _card(loaded, weights, method, parameters, rank, seed, config) -> str:
    """README.md: what was merged and how (the CLI line reproduces it when only density was set)."""
    flags = [f"--density {parameters['density']}"] if parameters and "density" in parameters else []
    flags += ([f"--rank {rank}"] if rank else []) + ([f"--seed {seed}"] if seed else [])
    command = [
        "python -m explorer merge-adapters",
        *(str(a.path) for a in loaded),
        "--weights",
        *map(str, weights),
        "--method",
        method,
        *flags,
        "--out DIR",
    ]
    lines = [
        "---",
        "library_name: peft",
        f"base_model: {config['base_model_name_or_path']}",
        "tags:",
        "- lora",
        "- merge",
        "- merge-explorer",
        "---",
        "",
        f"# LoRA adapter merged with Merge Explorer ({method})",
        "",
        f"Inputs: {', '.join(str(a.path) for a in loaded)}. Weights {weights}; parameters {parameters or {}}; output rank {config['r']}; seed {seed}.",
        "",
        f"`{' '.join(command)}`",
        "",
    ]
    return "\n".join(lines)
