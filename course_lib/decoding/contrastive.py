"""Contrastive search (Su et al. 2022, "A Contrastive Framework for Neural Text Generation", arXiv:2202.06417).

Greedy search loops because the most likely next token is often one that repeats the context. Contrastive
search stays deterministic but, among the ``top_k`` most likely tokens, prefers one whose hidden state is
unlike every earlier token's:

    score(v) = (1 - alpha) * p(v | context) - alpha * max_j cos(h_v, h_j)      (the "degeneration penalty")

transformers 5.x moved it to a hub repository that needs ``trust_remote_code=True`` and the internet; this is
an offline version for decoder-only models.
"""

from __future__ import annotations

from typing import Sequence

import torch

from course_lib.checks import check, is_integer, is_number
from course_lib.decoding.loop import (
    Criterion, Processor, check_prompt, drop_full_mask, forward, grow, last_logits, new_cache, special_ids,
)
from course_lib.decoding.stopping import EosStop, MaxNewTokens, any_stop
from course_lib.devices import to_model_device


def degeneration_penalty(context: torch.Tensor, candidates: torch.Tensor,
                         context_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Max cosine similarity of each candidate's hidden state to any context token's: (B, k).

    ``context`` (B, T, H) last-layer hidden states so far, ``candidates`` (B, k, H), ``context_mask`` (B, T)
    with 0 on padding (padding never counts as similar).
    """
    context = context / context.norm(dim=-1, keepdim=True)
    candidates = candidates / candidates.norm(dim=-1, keepdim=True)
    cosine = candidates @ context.transpose(1, 2)  # (B, k, T)
    if context_mask is not None:
        cosine = cosine.masked_fill(context_mask[:, None, :] == 0, -1.0)
    return cosine.max(dim=-1).values  # (B, k)


def contrastive_scores(top_probs: torch.Tensor, penalty: torch.Tensor, alpha: float) -> torch.Tensor:
    """Model confidence minus degeneration penalty, weighted by ``alpha``: (B, k) -> (B, k)."""
    return (1.0 - alpha) * top_probs - alpha * penalty


def _check(penalty_alpha, top_k) -> None:
    check("penalty_alpha", penalty_alpha, is_number(penalty_alpha) and 0.0 <= penalty_alpha <= 1.0,
          "a number in [0, 1] (0 is greedy search)")
    check("top_k", top_k, is_integer(top_k) and top_k >= 1, "an integer >= 1 (the candidates compared per step)")


@torch.inference_mode()
def contrastive_search(model, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None, *,
                       max_new_tokens: int, penalty_alpha: float = 0.6, top_k: int = 4,
                       processors: Sequence[Processor] = (), stopping: Sequence[Criterion] = (),
                       eos_token_id=None, pad_token_id=None) -> torch.LongTensor:
    """Prompt (B, T) -> (B, T + new) by contrastive search. ``penalty_alpha=0`` (or ``top_k=1``) is greedy.

    Each step runs the model once on all ``top_k`` candidates of every row (k copies of the KV cache), which
    gives both their hidden states for the penalty and, for the chosen one, the next step's logits.
    """
    eos, pad = special_ids(model, eos_token_id, pad_token_id)
    check_prompt(model, input_ids, attention_mask, max_new_tokens, pad)
    _check(penalty_alpha, top_k)
    padded = drop_full_mask(attention_mask) is not None  # decided where the mask arrives (no sync for a host mask)
    input_ids, attention_mask = to_model_device(model, input_ids, attention_mask)
    criteria = [MaxNewTokens(input_ids.shape[1], max_new_tokens), *stopping] + ([EosStop(eos)] if eos else [])
    if max_new_tokens == 0:
        return input_ids
    B, k = input_ids.shape[0], min(top_k, model.config.get_text_config().vocab_size)
    rows = torch.arange(B, device=input_ids.device)
    context_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask  # (B, T): real tokens
    cache = new_cache(model)
    out = forward(model, input_ids, attention_mask if padded else None, cache, output_hidden_states=True)
    context = out.hidden_states[-1]  # (B, T, H)
    logits = last_logits(out)  # (B, vocab)
    unfinished = torch.ones(B, dtype=torch.bool, device=input_ids.device)

    while True:
        scores = logits
        for process in processors:
            scores = process(input_ids, scores)
        top_probs, top_ids = torch.softmax(scores, dim=-1).topk(k, dim=-1)  # (B, k)

        # Look one token ahead for every candidate at once: k copies of each row's cache. The mask is always
        # passed here: a candidate may be EOS, which is also the pad id, yet it is a real token.
        cache.batch_repeat_interleave(k)
        context_mask = grow(context_mask)  # (B, T + 1)
        out = forward(model, top_ids.reshape(-1, 1), context_mask.repeat_interleave(k, dim=0), cache,
                      output_hidden_states=True)
        ahead_hidden = out.hidden_states[-1][:, -1].reshape(B, k, -1)  # (B, k, H)

        penalty = degeneration_penalty(context, ahead_hidden, context_mask[:, :-1])  # (B, k)
        choice = contrastive_scores(top_probs, penalty, penalty_alpha).argmax(dim=-1)  # (B,)
        cache.batch_select_indices(rows * k + choice)  # keep the chosen candidate's cache only
        context = torch.cat([context, ahead_hidden[rows, choice][:, None]], dim=1)  # (B, T + 1, H)
        logits = last_logits(out).reshape(B, k, -1)[rows, choice]  # (B, vocab)

        next_ids = top_ids[rows, choice]  # (B,)
        if pad is not None:
            next_ids = torch.where(unfinished, next_ids, pad)
        input_ids = torch.cat([input_ids, next_ids[:, None]], dim=-1)
        unfinished &= ~any_stop(criteria, input_ids, scores)
        if not bool(unfinished.any()):  # one host sync per step
            return input_ids
