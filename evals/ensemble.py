"""The output ensemble of the experts: the average of their predictive distributions, as one model.

Merging papers measure a weight-space merge against the ensemble that averages the members'
next-token distributions, ``p(y | x) = sum_i w_i p_i(y | x)`` (the Bayesian-model-averaging reference
of "Merging Models with Fisher-Weighted Averaging", Matena & Raffel 2022, and of model soups, Wortsman
et al. 2022): it costs N forward passes per token where a merge costs one. ``OutputEnsemble`` is a
transformers causal LM whose logits are ``log sum_i w_i softmax(logits_i)``, so lm-eval (``HFLM``) and
``generate`` score it like any model.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput


class OutputEnsemble(PreTrainedModel, GenerationMixin):
    """Average of the members' next-token distributions (members share one tokenizer and vocabulary).

    Args:
        members: causal LMs with the same vocabulary (e.g. the experts of one merge session).
        weights: one non-negative weight per member (normalized to sum 1); default uniform.

    Raises:
        ValueError: no members, a weight count that differs from the member count, negative or all-zero
            weights, or members whose vocabulary sizes differ.
    """

    _supports_sdpa = True  # the members attend with their own implementation; the ensemble has no attention
    _supports_flash_attn = True

    def __init__(self, members: Sequence[PreTrainedModel], weights: Sequence[float] | None = None):
        if not members:
            raise ValueError("an output ensemble needs at least one model")
        weights = [1.0] * len(members) if weights is None else list(weights)
        if len(weights) != len(members) or min(weights) < 0 or sum(weights) <= 0:
            raise ValueError(f"need one non-negative weight per model, not all zero; got {weights} for {len(members)}")
        sizes = {m.get_output_embeddings().weight.shape[0] for m in members}
        if len(sizes) > 1:
            raise ValueError(f"ensemble members must share one vocabulary; their output sizes are {sorted(sizes)}")
        super().__init__(copy.deepcopy(members[0].config))  # transformers sets attention fields on it
        self.members = nn.ModuleList(members)
        self.register_buffer(
            "log_weights", torch.tensor([math.log(w / sum(weights)) if w else -math.inf for w in weights])
        )

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, logits_to_keep: int = 0, **_
    ) -> CausalLMOutput:
        """``(B, T)`` token ids -> logits ``(B, T, V)`` = log of the weighted mean of the members' probabilities.

        The logits are normalized log-probabilities (``logsumexp`` over V is 0). ``logits_to_keep`` > 0
        keeps only the last positions (``generate`` asks for 1: the vocabulary projection of the prefix is
        skipped). Members run without a key/value cache, so generation recomputes the prefix each step.
        """
        log_probs = torch.stack(
            [
                m(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=logits_to_keep)
                .logits.float()
                .log_softmax(-1)
                for m in self.members
            ]
        )
        weights = self.log_weights.to(log_probs.device).view(-1, *([1] * (log_probs.dim() - 1)))
        return CausalLMOutput(logits=torch.logsumexp(log_probs + weights, dim=0))

    def prepare_inputs_for_generation(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, logits_to_keep: int = 0, **_
    ) -> dict:
        """The whole sequence every step: the ensemble keeps no cache (``generate`` calls this)."""
        return {"input_ids": input_ids, "attention_mask": attention_mask, "logits_to_keep": logits_to_keep}

    def get_output_embeddings(self) -> nn.Module:
        """The first member's output layer (all members share its vocabulary)."""
        return self.members[0].get_output_embeddings()
