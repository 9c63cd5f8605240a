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

from course_lib.checks import check_arg, is_integer, is_number
from course_lib.decoding.prepare import GenerateOutput, append_and_stop, grow, prepare
from course_lib.decoding.processors import Processor, apply_processors
from course_lib.decoding.steps import forward, last_logits, new_cache
from course_lib.decoding.stopping import Criterion


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
    check_arg("penalty_alpha", penalty_alpha, is_number(penalty_alpha) and 0.0 <= penalty_alpha <= 1.0,
          "a number in [0, 1] (0 is greedy search)")
    check_arg("top_k", top_k, is_integer(top_k) and top_k >= 1, "an integer >= 1 (the candidates compared per step)")


@torch.inference_mode()
def contrastive_search(model, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None, *,
                       max_new_tokens: int, penalty_alpha: float = 0.6, top_k: int = 4,
                       processors: Sequence[Processor] = (), stopping: Sequence[Criterion] = (),
                       eos_token_id=None, pad_token_id=None) -> GenerateOutput:
    """Prompt (B, T) -> (B, T + new) by contrastive search. ``penalty_alpha=0`` (or ``top_k=1``) is greedy.

    Each step runs the model once on all ``top_k`` candidates of every row (k copies of the KV cache), which
    gives both their hidden states for the penalty and, for the chosen one, the next step's logits.
    """
    _check(penalty_alpha, top_k)
    run = prepare(model, input_ids, attention_mask, max_new_tokens, stopping, eos_token_id, pad_token_id)
    ids = run.input_ids
    if max_new_tokens == 0:
        return GenerateOutput(ids)
    B = ids.shape[0]
    rows = torch.arange(B, device=ids.device)
    context_mask = torch.ones_like(ids) if run.attention_mask is None else run.attention_mask  # (B, T): real tokens
    cache = new_cache(model)
    out = forward(model, ids, run.attention_mask, cache, output_hidden_states=True)
    context = out.hidden_states[-1]  # (B, T, H)
    logits = last_logits(out)  # (B, vocab)
    k = min(top_k, logits.shape[-1])
    unfinished = torch.ones(B, dtype=torch.bool, device=ids.device)

    while True:
        scores = apply_processors(processors, ids, logits)  # (B, vocab)
        top_probs, top_ids = torch.softmax(scores, dim=-1).topk(k, dim=-1)  # (B, k)

        # Look one token ahead for every candidate at once: k copies of each row's cache. The mask is always
        # passed here: a candidate may be EOS, which is also the pad id, yet it is a real token.
        cache.reorder_cache(rows.repeat_interleave(k))  # (B*k,) row b's cache k times
        context_mask = grow(context_mask)  # (B, T + 1)
        out = forward(model, top_ids.reshape(-1, 1), context_mask.repeat_interleave(k, dim=0), cache,
                      output_hidden_states=True)
        ahead_hidden = out.hidden_states[-1][:, -1].reshape(B, k, -1)  # (B, k, H)

        penalty = degeneration_penalty(context, ahead_hidden, context_mask[:, :-1])  # (B, k)
        # a candidate the processors ruled out (probability 0) may not win by being unlike the context
        score = contrastive_scores(top_probs, penalty, penalty_alpha).masked_fill(top_probs == 0, -float("inf"))
        choice = score.argmax(dim=-1)  # (B,)
        cache.reorder_cache(rows * k + choice)  # keep the chosen candidate's cache only
        context = torch.cat([context, ahead_hidden[rows, choice][:, None]], dim=1)  # (B, T + 1, H)
        logits = last_logits(out).reshape(B, k, -1)[rows, choice]  # (B, vocab)

        ids, unfinished = append_and_stop(run, ids, top_ids[rows, choice], unfinished, scores)
        if not bool(unfinished.any()):  # one host sync per step
            return GenerateOutput(ids)
