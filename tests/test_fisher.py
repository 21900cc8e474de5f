"""Fisher estimation (closed-form bigram case, cache) and the Fisher-weighted merge."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from explorer import registry
from explorer.fisher import (
    FisherSettings,
    default_text,
    estimate_fisher,
    fisher_file,
    load_causal_lm,
    text_chunks,
)
from explorer.methods.fisher_merge import fisher_merge
from tests.helpers import assert_expected
from tests.tiny import save_tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")


class Bigram(torch.nn.Module):
    """logits(next | a) = W E[a]: a causal LM whose per-token Fisher has a closed form."""

    def __init__(self, vocab: int = 4, dim: int = 3):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.emb = torch.nn.Embedding(vocab, dim)
        self.head = torch.nn.Linear(dim, vocab, bias=False)
        with torch.no_grad():
            self.emb.weight.copy_(torch.randn(vocab, dim, generator=g))
            self.head.weight.copy_(torch.randn(vocab, dim, generator=g))

    def forward(self, input_ids, **_):
        return SimpleNamespace(logits=self.head(self.emb(input_ids)))


def _pairs(n: int, vocab: int = 4) -> torch.Tensor:
    return torch.randint(0, vocab, (n, 2), generator=torch.Generator().manual_seed(1))


def _closed_form(model: Bigram, pairs: torch.Tensor, sampled: bool) -> dict[str, torch.Tensor]:
    """Per-token Fisher by hand.

    With r = onehot(b) - p for context a, d log p(b|a)/dW = r e_a^T and d/dE[a] = W^T r; the true
    Fisher replaces r r^T by its expectation diag(p) - p p^T.
    """
    e, w = model.emb.weight.detach()[pairs[:, 0]], model.head.weight.detach()
    p = torch.softmax(e @ w.T, dim=-1)  # (n, V)
    n, vocab = p.shape
    if sampled:
        cov = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]  # (n, V, V)
    else:
        r = torch.nn.functional.one_hot(pairs[:, 1], vocab).float() - p
        cov = r[:, :, None] * r[:, None, :]
    head = torch.diagonal(cov, dim1=1, dim2=2).T @ e**2 / n  # (V, d)
    per_row = torch.einsum("kj,nkl,lj->nj", w, cov, w)  # (n, d): (W^T cov W)_jj
    emb = torch.zeros_like(model.emb.weight).index_add_(0, pairs[:, 0], per_row) / n
    return {"emb.weight": emb, "head.weight": head}


def test_empirical_fisher_one_token_per_backward_is_exact():
    model, pairs = Bigram(), _pairs(200)
    ours = estimate_fisher(model, pairs, FisherSettings(n_examples=200, batch_size=1, max_length=2, labels="empirical"))
    for name, expected in _closed_form(model, pairs, sampled=False).items():
        assert_expected(ours[name], expected, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("batch_size, length", [(1, 2), (2, 5)])
def test_true_fisher_matches_the_closed_form_in_expectation(batch_size, length):
    """Sampled labels (and random signs when batched), 3000 tokens: within 15% of the true Fisher.

    Each block's total; over 10 seeds the ratio's standard deviation was at most 3.8%.
    """
    model = Bigram()
    ids = torch.randint(0, 4, (3000 // (length - 1), length), generator=torch.Generator().manual_seed(2))
    pairs = torch.stack([ids[:, :-1].reshape(-1), ids[:, 1:].reshape(-1)], dim=1)
    ours = estimate_fisher(model, ids, FisherSettings(ids.shape[0], batch_size, length, "sampled", seed=3))
    for name, expected in _closed_form(model, pairs, sampled=True).items():
        assert (ours[name] >= 0).all()
        assert abs(float(ours[name].sum() / expected.sum()) - 1) < 0.15, name
        assert_expected(ours[name], expected, rtol=0.5, atol=0.05 * float(expected.max()))


def test_progress_is_reported_and_bad_labels_are_refused():
    seen = []
    estimate_fisher(Bigram(), _pairs(6), FisherSettings(6, 4, 2), progress=lambda f, msg: seen.append(f))
    assert seen == [4 / 6, 1.0]
    with pytest.raises(ValueError, match="labels"):
        estimate_fisher(Bigram(), _pairs(2), FisherSettings(2, 1, 2, labels="gold"))


def test_text_chunks_use_pydoc_topics_and_refuse_too_little_text():
    def tokenizer(text, add_special_tokens=False):
        return {"input_ids": [ord(c) % 64 for c in text]}

    ids = text_chunks(tokenizer, 3, 10)
    assert ids.shape == (3, 10) and ids.dtype == torch.long
    assert ids.reshape(-1).tolist() == tokenizer(default_text())["input_ids"][:30]  # the first 30 tokens, in order
    with pytest.raises(ValueError, match="Lower fisher_examples"):
        text_chunks(tokenizer, 5, 10, text="too short")


def _save_char_tokenizer(path):
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {chr(i): i - 32 for i in range(32, 95)} | {"[UNK]": 63}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(path)


def test_fisher_file_caches_by_model_files_and_settings(tmp_path):
    model_dir = save_tiny_llama(tmp_path / "model")
    _save_char_tokenizer(model_dir)
    loads = []

    def load(path):
        loads.append(path)
        return load_causal_lm(path)

    settings = FisherSettings(n_examples=4, batch_size=2, max_length=12)
    cache = tmp_path / "cache"
    first = fisher_file(model_dir, settings, cache, load=load)
    assert fisher_file(model_dir, settings, cache, load=load) == first and len(loads) == 1
    fisher = load_file(first)
    model, _ = load_causal_lm(model_dir)
    assert set(fisher) == set(model.state_dict())
    assert all(torch.isfinite(f).all() and (f >= 0).all() for f in fisher.values())
    assert fisher["model.layers.0.mlp.up_proj.weight"].sum() > 0
    assert fisher_file(model_dir, FisherSettings(4, 2, 12, "empirical"), cache, load=load) != first
    os.utime(model_dir / "config.json", ns=(1, 1))
    assert fisher_file(model_dir, settings, cache, load=load) != first and len(loads) == 3
    with pytest.raises(ValueError, match="inside the input folder"):
        fisher_file(model_dir, settings, model_dir / "fisher_cache")


def test_fisher_merge_by_hand():
    x = torch.tensor([[1.0, 2.0], [5.0, 6.0]])
    f = torch.tensor([[1.0, 0.0], [3.0, 0.0]])
    out = fisher_merge(x, base=None, generator=None, weight=torch.tensor([1.0, 1.0]), epsilon=1e-6, fisher=f)
    assert_expected(out, torch.tensor([(1 * 1 + 3 * 5) / 4, 4.0]), rtol=1e-5)  # no Fisher: the plain average
    weighted = fisher_merge(x, base=None, generator=None, weight=torch.tensor([3.0, 1.0]), epsilon=0.0, fisher=f + 1)
    assert_expected(weighted, torch.tensor([(3 * 2 * 1 + 4 * 5) / 10, (3 * 2 + 6) / 4]))


def test_fisher_merge_identities_and_normalization():
    x = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(4))
    f = torch.rand(3, 5, 4, generator=torch.Generator().manual_seed(5))
    ones = torch.ones(3)
    assert torch.equal(fisher_merge(x[:1], base=None, generator=None, weight=ones[:1], fisher=f[:1]), x[0])
    average = x.mean(dim=0)
    assert_expected(fisher_merge(x, base=None, generator=None, weight=ones, fisher=None), average)
    assert_expected(fisher_merge(x, base=None, generator=None, weight=ones, fisher=f[:1].expand(3, 5, 4)), average)
    scaled = f * torch.tensor([1.0, 10.0, 100.0]).reshape(3, 1, 1)
    assert_expected(
        fisher_merge(x, base=None, generator=None, weight=ones, normalize_fisher=True, fisher=scaled),
        fisher_merge(x, base=None, generator=None, weight=ones, normalize_fisher=True, fisher=f),
    )


def test_fisher_merge_errors():
    x, ones = torch.randn(2, 3), torch.ones(2)
    with pytest.raises(ValueError, match="sum to zero"):
        fisher_merge(x, base=None, generator=None, weight=torch.zeros(2), fisher=torch.ones(2, 3))
    with pytest.raises(ValueError, match="sum to zero"):
        fisher_merge(x, base=None, generator=None, weight=ones, epsilon=0.0, fisher=torch.zeros(2, 3))
    with pytest.raises(ValueError, match="negative"):
        fisher_merge(x, base=None, generator=None, weight=ones, fisher=-torch.ones(2, 3))
    with pytest.raises(ValueError, match="shape"):
        fisher_merge(x, base=None, generator=None, weight=ones, fisher=torch.ones(2, 4))


def test_fisher_method_takes_fisher_as_extra_and_keeps_setup_params_out():
    spec = registry.get("fisher")
    assert spec.needs_fisher and {p.name for p in spec.params if p.setup} == {
        "fisher_examples",
        "fisher_batch_size",
        "fisher_max_length",
        "fisher_labels",
    }
    params = {p.name: p.default for p in spec.params} | {"weight": torch.ones(2)}
    x, f = torch.randn(2, 3), torch.rand(2, 3)
    out = registry.call(spec, x, None, torch.Generator(), params, extra={"fisher": f})
    assert_expected(out, fisher_merge(x, base=None, generator=None, weight=torch.ones(2), fisher=f))
    assert FisherSettings.from_params(params) == FisherSettings()
