"""Serving many prompts at once: left-padded batches, decoded in one loop.

Batching is the cheapest speed-up there is: a decode step reads every weight once whether it serves 1 row or
16, so rows 2..16 ride almost for free until compute, not memory, becomes the limit. Left padding keeps the
last real token of every row in the same column, and the attention mask keeps padding invisible, so each row
gets exactly the tokens it would get alone.
"""

from __future__ import annotations

from typing import Sequence

from course_lib.checks import check_arg, is_integer
from course_lib.data import encode_prompts, text_list
from course_lib.decoding import greedy_no_sync


def generate_batch(model, tokenizer, prompts: Sequence[str], max_new_tokens: int, batch_size: int | None = None,
                   cache: str = "dynamic") -> list[list[int]]:
    """Greedy continuations of ``prompts``, ``batch_size`` at a time (default: all at once).

    Returns the ``max_new_tokens`` new token ids of each prompt, in order (cut them at EOS with ``completions``).
    """
    check_arg("batch_size", batch_size, batch_size is None or is_integer(batch_size) and batch_size >= 1,
          "a positive integer, or None (all prompts in one batch)")
    prompts = text_list(prompts, "prompts")
    batch_size = batch_size or len(prompts)
    new_tokens = []
    for start in range(0, len(prompts), batch_size):
        ids, mask = encode_prompts(tokenizer, prompts[start : start + batch_size])  # (b, T) each
        out = greedy_no_sync(model, ids, mask, max_new_tokens=max_new_tokens, cache=cache).sequences
        new_tokens += out[:, ids.shape[1] :].tolist()  # one host sync per batch, after the loop
    return new_tokens


def completions(tokenizer, new_tokens: Sequence[Sequence[int]], eos_token_id: int | None = None) -> list[str]:
    """Decode each row of new token ids, cut at its first EOS (the no-sync loop itself never checks for EOS)."""
    eos = tokenizer.eos_token_id if eos_token_id is None else eos_token_id
    return [tokenizer.decode(row[: row.index(eos)] if eos in row else row) for row in new_tokens]
