"""Ensembles of language models: combine next-token distributions at every step.

Two rules, for members that share one vocabulary (the same token id means the same text everywhere):

* ``"mixture"``: p(x) = sum_i w_i p_i(x), a weighted average of probabilities. A token that any member finds
  likely stays likely. Per token, its loss is at most the weighted average of the members' losses (log is
  concave: Jensen's inequality).
* ``"product"``: p(x) ~ prod_i p_i(x)^w_i, a weighted average of log-probabilities, renormalised: a product
  of experts (Hinton 2002). A token survives only if every member allows it: sharper, more "agreeing".

``Ensemble`` behaves like one causal LM whose ``.logits`` are the combined log-probabilities (valid logits:
softmax leaves them unchanged), so the course's tools take it as they take a model::

    ens = Ensemble([storyteller, llama], weights=[0.5, 0.5], method="mixture")
    heldout_loss(ens, ids)                                               # course_lib.metrics
    generate(ens, input_ids, max_new_tokens=40, processors=[...])       # course_lib.decoding, KV-cached
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutput

from course_lib.decoding.steps import new_cache, no_padding_mask
from course_lib.devices import to_model_device
from course_lib.metrics import nll, target_logprobs

METHODS = ("mixture", "product")


class VocabularyMismatchError(ValueError):
    """Members do not share one vocabulary, so their score vectors cannot be combined position by position."""


def check_weights(weights: Sequence[float], n_members: int) -> torch.Tensor:
    """Validate mixing weights: one per member, each >= 0, summing to 1. Returns them as a float tensor."""
    if len(weights) != n_members:
        raise ValueError(f"got {len(weights)} weights for {n_members} members; give one weight per member")
    w = torch.tensor([float(x) for x in weights], dtype=torch.float32)
    if (w < 0).any() or not torch.isfinite(w).all():
        raise ValueError(f"weights must be finite and >= 0, got {list(weights)}")
    if abs(w.sum().item() - 1.0) > 1e-6:
        raise ValueError(f"weights must sum to 1, got {list(weights)} (sum {w.sum().item():.6g})")
    return w


def combine_log_probs(member_log_probs: Sequence[torch.Tensor], weights: Sequence[float],
                      method: str = "mixture") -> torch.Tensor:
    """Combine the members' log-probabilities (each (..., vocab)) into the ensemble's log-probabilities."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; allowed: {', '.join(map(repr, METHODS))}")
    w = check_weights(weights, len(member_log_probs))
    shapes = {tuple(lp.shape) for lp in member_log_probs}
    if len(shapes) != 1:
        raise VocabularyMismatchError(f"members' score tensors differ in shape: {sorted(shapes)}; "
                                      "ensembles need one shared vocabulary (the same tokenizer)")
    stacked = torch.stack([lp.float() for lp in member_log_probs])  # (M, ..., vocab)
    w = w.to(stacked.device).view(-1, *[1] * (stacked.dim() - 1))  # (M, 1, ..., 1)
    if method == "mixture":
        # log sum_i w_i p_i, computed in log space; a zero weight gives log 0 = -inf, which logsumexp ignores
        return torch.logsumexp(stacked + w.log(), dim=0)  # (..., vocab)
    # weighted sum of log-probs is an unnormalised log-probability: renormalise over the vocabulary.
    # where() keeps 0 * (-inf) (a zero-weight member that rules a token out) from becoming NaN
    weighted = torch.where(w > 0, w * stacked, torch.zeros_like(stacked)).sum(dim=0)  # (..., vocab)
    return weighted.log_softmax(dim=-1)


def vocab_size(model) -> int:
    """Rows of the output layer: the length of the model's score vector."""
    return model.get_output_embeddings().weight.shape[0]


def check_same_tokenizer(*tokenizers) -> None:
    """Raise ``VocabularyMismatchError`` unless all tokenizers map the same strings to the same ids."""
    reference = tokenizers[0].get_vocab()
    for i, tok in enumerate(tokenizers[1:], start=1):
        vocab = tok.get_vocab()
        differ = sorted({s for s in reference if vocab.get(s) != reference[s]} | vocab.keys() - reference.keys())
        if differ:
            raise VocabularyMismatchError(
                f"tokenizer {i} differs from tokenizer 0 on {len(differ)} entries (e.g. {differ[:3]}): vocab sizes "
                f"{len(reference)} vs {len(vocab)}; the same id means different text, so per-token scores cannot be combined"
            )


class Ensemble(nn.Module):
    """Models with one shared vocabulary, combined per step; ``forward(...).logits`` holds log-probabilities.

    Used by a decoding loop, every member keeps its own KV cache: member 0 uses the cache the loop passes in
    (so the loop's ``cache.get_seq_length()`` stays right), the others get caches of their own, made afresh
    whenever the loop starts a new cache (a new generation).
    """

    def __init__(self, models: Sequence[nn.Module], weights: Sequence[float] | None = None,
                 method: str = "mixture"):
        super().__init__()
        if not models:
            raise ValueError("an ensemble needs at least one model")
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; allowed: {', '.join(map(repr, METHODS))}")
        sizes = [vocab_size(m) for m in models]
        if len(set(sizes)) != 1:
            raise VocabularyMismatchError(f"members have vocabularies of sizes {sizes}; an ensemble needs one "
                                          "shared tokenizer (same ids for the same text)")
        weights = [1 / len(models)] * len(models) if weights is None else list(weights)
        check_weights(weights, len(models))
        self.members = nn.ModuleList(models)
        self.weights = weights
        self.method = method
        self._loop_cache, self._own_caches = None, []

    @property
    def config(self):
        """Member 0's config: a decoding loop sizes its KV cache from it."""
        return self.members[0].config

    @property
    def generation_config(self):
        """Member 0's generation settings (EOS and pad ids): the members share one tokenizer."""
        return self.members[0].generation_config

    def _caches(self, cache) -> list:
        if cache is None:
            return [None] * len(self.members)
        if cache is not self._loop_cache:  # a new generation started: fresh caches for the other members
            self._loop_cache = cache
            self._own_caches = [new_cache(m) for m in self.members[1:]]
        return [cache, *self._own_caches]

    def member_log_probs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                         position_ids: torch.Tensor | None = None, cache=None,
                         logits_to_keep: int = 0) -> list[torch.Tensor]:
        """Each member's log-probabilities: a list of (B, T, vocab) (T = 1 with ``logits_to_keep=1``).

        Inputs follow member 0 (the ensemble's device); the members share one device.
        """
        input_ids, attention_mask, position_ids = to_model_device(self, input_ids, attention_mask, position_ids)
        if attention_mask is not None and position_ids is None:
            # a plain forward numbers positions 0..T-1 even under left padding: count real tokens instead
            position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        if attention_mask is None:  # no padding, said explicitly; the members number positions on from the cache
            attention_mask = no_padding_mask(input_ids, 0 if cache is None else cache.get_seq_length())
        return [m(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=c,
                  use_cache=c is not None, logits_to_keep=logits_to_keep).logits.float().log_softmax(dim=-1)
                for m, c in zip(self.members, self._caches(cache))]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache=None, logits_to_keep: int = 0,
                **unused) -> CausalLMOutput:
        members = self.member_log_probs(input_ids, attention_mask, position_ids, cache, logits_to_keep)
        return CausalLMOutput(logits=combine_log_probs(members, self.weights, self.method))  # (B, T, vocab)


def weight_sweep(member_log_probs: Sequence[torch.Tensor], targets: torch.Tensor, grid: Sequence[float],
                 method: str = "mixture") -> list[float]:
    """Held-out loss of a two-member ensemble for each weight ``w`` of member 0 (member 1 gets ``1 - w``).

    Reuses the members' log-probs: one forward per member, then each weight costs only the combination.
    ``targets`` follow the log-probs to the device the models computed them on.
    """
    if len(member_log_probs) != 2:
        raise ValueError(f"weight_sweep mixes exactly two members, got {len(member_log_probs)}")
    targets = targets.to(member_log_probs[0].device)
    if method == "mixture":
        # the mixture's probability of the target needs only each member's probability OF THE TARGET:
        # gather first and combine (N, T, 1) instead of (N, T, vocab). The product needs the whole
        # vocabulary for its normaliser.
        member_log_probs = [target_logprobs(lp, targets)[..., None] for lp in member_log_probs]  # (N, T, 1) each
        return [-combine_log_probs(member_log_probs, [w, 1 - w], method).mean().item() for w in grid]
    return [nll(combine_log_probs(member_log_probs, [w, 1 - w], method), targets) for w in grid]
