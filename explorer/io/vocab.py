"""Models whose vocabularies or embedding tying differ, made mergeable row by row.

Views, not copies: ``align_embeddings`` wraps each input in an ``EmbeddingView`` whose ``get`` returns
its token-indexed tensors (input embedding, output embedding and its bias) laid out in one shared
vocabulary, so the streaming executor and the interactive session merge them like any other tensor.

Shared vocabulary, ``tokenizer_source``:
  base   the reference model's tokenizer (the base model, else the first model) and its row count;
         tokens only other models have are dropped.
  union  the reference's tokenizer plus every token another model has and it lacks, appended in model
         order as added tokens (keeping their 'special' flag); the output is written with this tokenizer.
A model's row for a token is found through its own tokenizer (token string -> id). A token a model
lacks takes the base model's row when the base has it, else the mean of the rows of the models that
have it. Rows past the end of a tokenizer (padding to a multiple of 8 or 64) belong to no token: the
reference's padding rows are kept, other models' are dropped. Models with the same number of rows
and identical tokenizers (or no tokenizers at all) are left as they are.

The vocabulary size is set where the config holds it: a composite model's (vision-language, ...)
language sub-config (text_config, ...; ``explorer.io.config_compat``); a config where transformers
would not read it is refused before anything is written.

Tying: a tied model's output embedding is its input embedding. The output is untied (has its own
output embedding) when any input is untied; a tied input then contributes its input embedding there.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch

from explorer.choices import TokenizerSource, parse_choice
from explorer.io.config_compat import vocab_size_of, with_untied, with_vocab_size
from explorer.io.finite import check_finite
from explorer.io.formats.base import (
    TOKENIZER_FILES,
    Checkpoint,
    CheckpointError,
    CheckpointView,
    EmbeddingNames,
    embedding_names,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["EmbeddingNames", "TokenizerSource", "align_embeddings", "embedding_names", "is_tied"]
VOCAB_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model", "added_tokens.json")


def is_tied(checkpoint: Checkpoint, names: EmbeddingNames) -> bool:
    """Whether the output embedding is the input one: config says so, or the checkpoint has no output tensor."""
    return names.output is not None and (checkpoint.tie_word_embeddings or names.output not in checkpoint.files)


@dataclass
class Layout:
    """Where each model's token rows go in the shared vocabulary of ``rows`` rows."""

    rows: int
    sources: list[torch.Tensor]  # per member: (rows,) its own row for each shared row, -1 where it has none
    missing: torch.Tensor  # (M,) shared rows that at least one member lacks, ascending
    tokenizer: Optional[PreTrainedTokenizerBase]  # the union tokenizer; None with tokenizer_source="base"


@dataclass
class Alignment:
    """State shared by the views of one merge's inputs (members: base first when there is one)."""

    members: list[Checkpoint]
    has_base: bool
    names: EmbeddingNames
    tied: list[bool]
    untie: bool
    layout: Optional[Layout]
    _fill: tuple[str, torch.Tensor] = field(default=("", torch.empty(0)), repr=False)

    def source(self, index: int, name: str) -> str:
        """The member's own tensor behind shared tensor ``name`` (a tied member's lm_head is its input embedding)."""
        return self.names.input if name == self.names.output and self.tied[index] else name

    def gather(self, index: int, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """Member ``index``'s ``tensor`` (V_i, *D) laid out in the shared vocabulary: (rows, *D) float32.

        Rows the member lacks take ``fill(name)``.
        """
        out, have = self.place(index, tensor)
        if not bool(have.all()):
            lacking = (~have).nonzero().squeeze(1)
            out[lacking] = self.fill(name)[torch.searchsorted(self.layout.missing, lacking)]
        return out

    def place(self, index: int, tensor: torch.Tensor, value: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        """Member ``index``'s rows of ``tensor`` (V_i, *D) in the shared vocabulary, ``value`` elsewhere.

        Returns ((rows, *D) float32, (rows,) bool: True where the member has the row).
        """
        src = self.layout.sources[index]
        out = torch.full((self.layout.rows, *tensor.shape[1:]), value, dtype=torch.float32)
        have = src >= 0
        out[have] = tensor[src[have]].to(torch.float32)
        return out, have

    def fill(self, name: str) -> torch.Tensor:
        """(M, *D) float32 rows for the shared rows some member lacks.

        The base's row, else the mean of the rows of the models that have it (0 where none has it).
        Cached for the last tensor name.
        """
        if self._fill[0] == name:
            return self._fill[1]
        missing = self.layout.missing
        done = torch.zeros(len(missing), dtype=torch.bool)
        total = torch.zeros((len(missing), *self.members[0].shape(self.source(0, name))[1:]))
        count = torch.zeros(len(missing))
        for i, member in enumerate(self.members):
            idx = self.layout.sources[i][missing]
            use = (idx >= 0) & ~done
            if not bool(use.any()):
                continue
            rows = member.get(self.source(i, name))[idx[use]].to(torch.float32)
            check_finite(member, self.source(i, name), rows)  # blame the model the rows come from
            if i == 0 and self.has_base:
                total[use], count[use], done = rows, 1.0, use
            else:
                total[use] += rows
                count[use] += 1
        filled = total / count.clamp(min=1).reshape(-1, *[1] * (total.dim() - 1))
        self._fill = (name, filled)
        return filled


class EmbeddingView(CheckpointView):
    """Member ``index`` of an ``Alignment``: its tensors, with token-indexed ones in the shared layout."""

    def __init__(self, alignment: Alignment, index: int):
        inner, names = alignment.members[index], alignment.names
        files = dict(inner.files)
        if alignment.untie and alignment.tied[index]:
            files[names.output] = inner.files[names.input]
        config = dict(inner.config)
        if alignment.untie:
            config = with_untied(config)
        if alignment.layout is not None:
            config = with_vocab_size(config, alignment.layout.rows)
        self.alignment, self.index = alignment, index
        super().__init__(inner, config, files)

    def _aligned(self, name: str) -> bool:
        return self.alignment.layout is not None and name in self.alignment.names.vocab

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self.files:
            raise self._missing(name)
        inner = self.inner.shape(self.alignment.source(self.index, name))
        return (self.alignment.layout.rows, *inner[1:]) if self._aligned(name) else inner

    def dtype(self, name: str) -> str:
        return "F32" if self._aligned(name) else self.inner.dtype(self.alignment.source(self.index, name))

    def get(self, name: str) -> torch.Tensor:
        if name not in self.files:
            raise self._missing(name)
        tensor = self.inner.get(self.alignment.source(self.index, name))
        return self.alignment.gather(self.index, name, tensor) if self._aligned(name) else tensor

    def own_name(self, name: str) -> str:
        return self.alignment.source(self.index, name)

    def place_rows(self, name: str, tensor: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        return self.alignment.place(self.index, tensor, fill)[0] if self._aligned(name) else tensor

    def tokenizer(self) -> Optional[PreTrainedTokenizerBase]:
        layout = self.alignment.layout
        return layout.tokenizer if layout is not None and layout.tokenizer is not None else self.inner.tokenizer()

    def save_assets(self, dst: Path) -> None:
        """The inner model's files; with a union vocabulary the union tokenizer replaces its tokenizer files."""
        self.inner.save_assets(dst)
        layout = self.alignment.layout
        if layout is not None and layout.tokenizer is not None:
            for name in TOKENIZER_FILES:
                (dst / name).unlink(missing_ok=True)
            layout.tokenizer.save_pretrained(dst)


def align_embeddings(
    base: Optional[Checkpoint], models: list[Checkpoint], tokenizer_source: TokenizerSource | str = TokenizerSource.base
) -> tuple[Optional[Checkpoint], list[Checkpoint]]:
    """``base`` and ``models`` as views that agree on vocabulary and tying; unchanged when they already do.

    Call after the architectures are checked equal. Raises CheckpointError naming the model when its
    rows differ and there is no tokenizer to align them by, or its tokenizer does not fit its rows;
    ValueError for a tokenizer_source that is not a ``TokenizerSource`` value.
    """
    tokenizer_source = parse_choice(TokenizerSource, tokenizer_source, "tokenizer_source")
    members = ([base] if base else []) + list(models)
    if len(members) == 1:
        return base, list(models)
    names = embedding_names(members[0])
    if any(names.input not in m.files for m in members):
        return base, list(models)  # not a standard embedding layout; check_compatible reports the missing tensor
    tied = [is_tied(m, names) for m in members]
    untie = any(tied) and not all(tied)
    layout = _layout(members, names, tokenizer_source)
    if layout is None and not untie:
        return base, list(models)
    alignment = Alignment(members, base is not None, names, tied, untie, layout)
    views = [EmbeddingView(alignment, i) for i in range(len(members))]
    if layout is not None:
        for view in views:
            _check_vocab_size(view, layout.rows)
    return (views[0], views[1:]) if base else (None, views)


def _layout(members: list[Checkpoint], names: EmbeddingNames, tokenizer_source: TokenizerSource) -> Optional[Layout]:
    """The shared layout, or None when every member already has the same rows for the same tokens."""
    rows = [m.shape(names.input)[0] for m in members]
    if len(set(rows)) == 1 and _same_tokenizer_files(members):
        return None
    tokenizers = [m.tokenizer() for m in members]
    lacking = [m for m, t in zip(members, tokenizers, strict=True) if t is None]
    if lacking:
        if len(set(rows)) == 1:
            return None  # same size and nothing to align by: rows are taken to mean the same tokens
        raise CheckpointError(
            f"{lacking[0].path}: has no tokenizer, and the models' embeddings have different row counts "
            f"({', '.join(f'{m.name}: {r}' for m, r in zip(members, rows, strict=True))}); add the tokenizer files so rows can be aligned by token"
        )
    vocabs = [t.get_vocab() for t in tokenizers]
    for member, vocab, count in zip(members, vocabs, rows, strict=True):
        if max(vocab.values()) >= count:
            raise CheckpointError(
                f"{member.path}: tokenizer has token id {max(vocab.values())} but {names.input!r} has only {count} rows; "
                "the tokenizer files do not belong to these weights"
            )
    if len(set(rows)) == 1 and all(v == vocabs[0] for v in vocabs):
        return None
    union = _union(tokenizers, vocabs) if tokenizer_source == TokenizerSource.union else None
    target = union.get_vocab() if union is not None else vocabs[0]
    size = max(rows[0], max(target.values()) + 1)
    tokens: list[Optional[str]] = [None] * size
    for token, i in target.items():
        tokens[i] = token
    sources = [
        torch.tensor(
            [vocab.get(t, -1) if t is not None else (r if m == 0 and r < rows[0] else -1) for r, t in enumerate(tokens)]
        )
        for m, vocab in enumerate(vocabs)
    ]
    missing = torch.stack(sources).lt(0).any(0).nonzero().squeeze(1)
    return Layout(size, sources, missing, union)


def _union(tokenizers: list[PreTrainedTokenizerBase], vocabs: list[dict[str, int]]) -> PreTrainedTokenizerBase:
    """The first tokenizer with the tokens of the others that it lacks added, in model then id order."""
    union, have = tokenizers[0], set(vocabs[0])
    for tokenizer, vocab in zip(tokenizers[1:], vocabs[1:], strict=True):
        added = tokenizer.added_tokens_decoder
        for token, i in sorted(vocab.items(), key=lambda kv: kv[1]):
            if token not in have:
                special = i in added and added[i].special
                union.add_tokens([added.get(i, token)], special_tokens=special)
                have.add(token)
    return union


def _same_tokenizer_files(members: list[Checkpoint]) -> bool:
    """True when every member's vocabulary files are byte-identical (so no tokenizer needs loading)."""
    dirs = [m.assets_dir for m in members]
    if any(d is None for d in dirs):
        return False

    def fingerprint(folder: Path) -> tuple:
        files = tuple((folder / f).read_bytes() if (folder / f).is_file() else None for f in VOCAB_FILES)
        config = folder / "tokenizer_config.json"
        added = json.loads(config.read_text()).get("added_tokens_decoder") if config.is_file() else None
        return files + (json.dumps(added, sort_keys=True),)

    first = fingerprint(dirs[0])
    return all(fingerprint(d) == first for d in dirs[1:])


def _check_vocab_size(view: EmbeddingView, rows: int) -> None:
    """CheckpointError unless transformers reads ``rows`` as the vocabulary size of ``view``'s config.

    A composite model (vision-language, ...) holds it in its language sub-config
    (``config_compat.with_vocab_size``); a layout where neither that nor the top level is read would
    write a checkpoint transformers refuses to load, so it is refused before anything is written.
    """
    try:
        declared = view.hf_config.get_text_config(decoder=True).vocab_size
    except (CheckpointError, AttributeError, ValueError):
        declared = vocab_size_of(view.config)
    if declared != rows:
        raise CheckpointError(
            f"{view.path}: the vocabularies are aligned to {rows} rows, but its config.json keeps the vocabulary size "
            f"where transformers does not read it (it reads {declared}); merge models with the same vocabulary, or put "
            "vocab_size in the language model's sub-config (text_config) of every model's config.json"
        )
