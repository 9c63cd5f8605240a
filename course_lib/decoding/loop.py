"""The decode loop, one small step at a time: prefill, process the scores, select, append and stop, decode.

``generate`` strings the steps together the way ``transformers``' ``model.generate`` does (same position ids,
same float32 copy of the last logits, same padding of finished rows), so a seeded run gives the same tokens.
Greedy search and sampling are this loop with a different ``select``.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from course_lib.decoding.prepare import GenerateOutput, append_and_stop, grow, prepare
from course_lib.decoding.processors import Processor, apply_processors
from course_lib.decoding.steps import decode_step, new_cache, prefill
from course_lib.decoding.stopping import Criterion

Selector = Callable[[torch.Tensor], torch.LongTensor]  # processed scores (B, vocab) -> one token id per row (B,)


def greedy_select(scores: torch.Tensor) -> torch.LongTensor:
    """The most likely token of each row: (B, vocab) -> (B,)."""
    return torch.argmax(scores, dim=-1)


@torch.inference_mode()
def generate(model, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None, *,
             max_new_tokens: int, processors: Sequence[Processor] = (), select: Selector = greedy_select,
             stopping: Sequence[Criterion] = (), eos_token_id=None, pad_token_id=None) -> GenerateOutput:
    """Prompt (B, T) -> prompt + new tokens (B, T + new): process scores, select, stop; finished rows get pad.

    ``processors`` reshape the scores in order, ``select`` picks one id per row, and a row finishes when any
    criterion in ``stopping`` (or EOS, or ``max_new_tokens``) says so. The loop ends when every row is done.
    """
    run = prepare(model, input_ids, attention_mask, max_new_tokens, stopping, eos_token_id, pad_token_id)
    ids, mask = run.input_ids, run.attention_mask
    if max_new_tokens == 0:
        return GenerateOutput(ids)
    cache = new_cache(model)
    unfinished = torch.ones(ids.shape[0], dtype=torch.bool, device=ids.device)  # (B,)

    logits = prefill(model, ids, mask, cache=cache)  # (B, vocab)
    while True:
        scores = apply_processors(processors, ids, logits)  # (B, vocab)
        next_ids = select(scores)  # (B,)
        ids, unfinished = append_and_stop(run, ids, next_ids, unfinished, scores)
        if not bool(unfinished.any()):  # the one host sync per step: has every row finished?
            return GenerateOutput(ids)
        mask = grow(mask)
        logits = decode_step(model, ids[:, -1:], mask, cache=cache)
