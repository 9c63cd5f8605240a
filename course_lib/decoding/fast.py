"""Greedy decoding without a host sync per token (gpt-fast's loop), and the uncached baseline it is measured against.

    out = greedy_no_sync(model, input_ids, max_new_tokens=64, cache="static").sequences   # (B, T + 64)

``generate`` asks the device after every token whether all rows have finished, and waits for the answer. This
loop never asks (no ``.item()``, no EOS check): it writes each token into a preallocated output and makes exactly
``max_new_tokens`` per row, so the device can run ahead of Python; cut the rows at EOS afterwards.
``greedy_without_cache`` re-runs the model over the whole sequence for every new token: the quadratic cost a KV
cache removes.
"""

from __future__ import annotations

import torch

from course_lib.decoding.prepare import GenerateOutput, grow, prepare
from course_lib.decoding.steps import decode_step, forward, last_logits, new_cache, prefill
from course_lib.models import check_fits


@torch.inference_mode()
def greedy_no_sync(model, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None, *,
                   max_new_tokens: int, cache="dynamic") -> GenerateOutput:
    """Greedy generation of exactly ``max_new_tokens`` per row, with no host sync in the loop: (B, T + new).

    ``cache``: "dynamic", "static" (a course model), or a cache that already holds earlier tokens (a shared
    prefix, all real). ``attention_mask`` (B, T) marks the prompt's left padding with 0.
    """
    run = prepare(model, input_ids, attention_mask, max_new_tokens)
    ids, mask = run.input_ids, run.attention_mask
    B, T = ids.shape
    past = 0 if isinstance(cache, str) else cache.get_seq_length()
    check_fits(model, past + T + max_new_tokens, what=f"{past} cached + {T} prompt tokens + max_new_tokens")
    if max_new_tokens == 0:
        return GenerateOutput(ids)
    if isinstance(cache, str):
        cache = new_cache(model, cache, B, T + max_new_tokens)
    out = torch.empty(B, T + max_new_tokens, dtype=ids.dtype, device=ids.device)  # filled in place, no cat
    out[:, :T] = ids
    if mask is not None:  # (B, past + T + new): the cached prefix and every new token are real
        mask = torch.cat([mask.new_ones(B, past), mask, mask.new_ones(B, max_new_tokens)], dim=1)

    def mask_upto(n: int) -> torch.Tensor | None:
        return None if mask is None else mask[:, :n]

    logits = prefill(model, ids, mask_upto(past + T), cache=cache)  # (B, vocab)
    for i in range(max_new_tokens - 1):
        out[:, T + i] = logits.argmax(dim=-1)  # (B,)
        logits = decode_step(model, out[:, T + i : T + i + 1], mask_upto(past + T + i + 1), cache=cache)
    out[:, -1] = logits.argmax(dim=-1)
    return GenerateOutput(out)


@torch.inference_mode()
def greedy_without_cache(model, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None, *,
                         max_new_tokens: int) -> GenerateOutput:
    """Greedy generation of exactly ``max_new_tokens`` per row, re-running the model over the whole sequence for
    every new token: n new tokens cost about n^2 / 2 token-passes instead of n."""
    run = prepare(model, input_ids, attention_mask, max_new_tokens)
    ids, mask = run.input_ids, run.attention_mask
    for _ in range(max_new_tokens):
        logits = last_logits(forward(model, ids, mask, None))  # (B, vocab): the whole sequence again
        ids = torch.cat([ids, logits.argmax(dim=-1)[:, None]], dim=1)  # (B, L + 1)
        mask = grow(mask)
    return GenerateOutput(ids)
