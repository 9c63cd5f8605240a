"""The decode loop, one small step at a time: prefill, one-token decode step, select, stop.

    cache = new_cache(model)
    logits = prefill(model, input_ids, attention_mask, cache)         # (B, vocab): reads the whole prompt
    next_ids = greedy_select(logits)                                  # (B,)
    logits = decode_step(model, next_ids[:, None], mask, cache)       # (B, vocab): reads ONE new token

``generate`` strings these together the way ``transformers``' ``model.generate`` does (same position ids,
same float32 copy of the last logits, same padding of finished rows), so a seeded run gives the same tokens.
"""

from __future__ import annotations

import functools
import inspect
from typing import Callable, Sequence

import torch
from transformers import DynamicCache

from course_lib.decoding.stopping import EosStop, MaxNewTokens, any_stop

Processor = Callable[[torch.LongTensor, torch.Tensor], torch.Tensor]
Selector = Callable[[torch.Tensor], torch.LongTensor]
Criterion = Callable[[torch.LongTensor, torch.Tensor], torch.BoolTensor]


def new_cache(model) -> DynamicCache:
    """An empty KV cache for ``model``; ``prefill`` fills it and every ``decode_step`` appends one position."""
    return DynamicCache(config=model.config.get_text_config(decoder=True))


def position_ids(attention_mask: torch.Tensor | None, new_len: int, past_len: int) -> torch.LongTensor:
    """Positions of the ``new_len`` newest tokens. With left padding a row's first REAL token is position 0,
    so positions count the ones of the mask; pads get 0 (they are masked out anyway), as in transformers."""
    if attention_mask is None:
        return torch.arange(past_len, past_len + new_len).unsqueeze(0)  # (1, new_len)
    positions = attention_mask.long().cumsum(-1) - 1  # (B, past + new)
    return positions.masked_fill(attention_mask == 0, 0)[:, -new_len:]  # (B, new_len)


@functools.cache
def _keeps_last_logits_only(model_class) -> bool:
    # Models that accept logits_to_keep=1 skip the LM head for every position but the last, as in generate().
    return "logits_to_keep" in inspect.signature(model_class.forward).parameters


def forward(model, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None, cache, **extra):
    """One forward pass over the tokens not yet in ``cache``; ``attention_mask`` covers cache + new tokens
    (``None`` = no padding). Returns the model output; the cache grows in place."""
    past_len = cache.get_seq_length()
    pos = position_ids(attention_mask, input_ids.shape[1], past_len).to(input_ids.device)
    if _keeps_last_logits_only(type(model)):
        extra.setdefault("logits_to_keep", 1)
    return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=pos, cache=cache,
                 use_cache=True, **extra)


def last_logits(output) -> torch.Tensor:
    """The logits of the last position of a model output as float32: (B, vocab)."""
    # A float32 copy: processors then work in full precision, and the big logits tensor can be freed.
    return output.logits[:, -1].to(copy=True, dtype=torch.float32)  # (B, vocab)


@torch.inference_mode()
def prefill(model, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None, cache) -> torch.Tensor:
    """Run the whole prompt (B, T) through ``model``, filling ``cache``; logits of the last position (B, vocab)."""
    return last_logits(forward(model, input_ids, attention_mask, cache))


@torch.inference_mode()
def decode_step(model, next_ids: torch.LongTensor, attention_mask: torch.Tensor | None, cache) -> torch.Tensor:
    """Feed one new token per row (B, 1); ``attention_mask`` already includes it. Returns (B, vocab) logits.

    Same computation as ``prefill``, but for one position: it reads every weight and the whole cache to
    produce a single token, which is why decoding is memory-bound.
    """
    if next_ids.ndim != 2 or next_ids.shape[1] != 1:
        raise ValueError(f"decode_step feeds one token per row: next_ids must be (B, 1), got {tuple(next_ids.shape)}")
    return last_logits(forward(model, next_ids, attention_mask, cache))


def greedy_select(scores: torch.Tensor) -> torch.LongTensor:
    """The most likely token of each row: (B, vocab) -> (B,)."""
    return torch.argmax(scores, dim=-1)


def special_ids(model, eos_token_id, pad_token_id) -> tuple[list[int], int | None]:
    """EOS ids and pad id; ``None`` means the model's ``generation_config`` (as ``model.generate``). Pass
    ``eos_token_id=[]`` to generate without EOS stopping."""
    config = model.generation_config
    eos = config.eos_token_id if eos_token_id is None else eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else [int(e) for e in eos]
    pad = config.pad_token_id if pad_token_id is None else pad_token_id
    return eos, (eos[0] if pad is None and eos else pad)


def check_prompt(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, max_new_tokens: int) -> None:
    """Clear errors for the mistakes every decoding function must refuse."""
    if input_ids.ndim != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be (batch, length) with length >= 1, got shape {tuple(input_ids.shape)}")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} must equal input_ids shape "
                         f"{tuple(input_ids.shape)}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")


def drop_full_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """Without padding the mask carries no information; transformers drops it (one host sync, once)."""
    if attention_mask is not None and bool((attention_mask == 1).all()):
        return None
    return attention_mask


def grow(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """The mask after appending one real token to every row."""
    if attention_mask is None:
        return None
    return torch.cat([attention_mask, attention_mask.new_ones(attention_mask.shape[0], 1)], dim=-1)


@torch.inference_mode()
def generate(model, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None, *,
             max_new_tokens: int, processors: Sequence[Processor] = (), select: Selector = greedy_select,
             stopping: Sequence[Criterion] = (), eos_token_id=None, pad_token_id=None) -> torch.LongTensor:
    """Prompt (B, T) -> prompt + new tokens (B, T + new): process scores, select, stop; finished rows get pad.

    ``processors`` reshape the scores in order, ``select`` picks one id per row, and a row finishes when any
    criterion in ``stopping`` (or EOS, or ``max_new_tokens``) says so. The loop ends when every row is done.
    """
    check_prompt(input_ids, attention_mask, max_new_tokens)
    eos, pad = special_ids(model, eos_token_id, pad_token_id)
    criteria = [MaxNewTokens(input_ids.shape[1], max_new_tokens), *stopping] + ([EosStop(eos)] if eos else [])
    if max_new_tokens == 0:
        return input_ids
    attention_mask = drop_full_mask(attention_mask)
    cache = new_cache(model)
    unfinished = torch.ones(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)  # (B,)

    logits = prefill(model, input_ids, attention_mask, cache)  # (B, vocab)
    while True:
        scores = logits
        for process in processors:
            scores = process(input_ids, scores)
        next_ids = select(scores)  # (B,)
        if pad is not None:  # a finished row keeps its length in the batch by growing with pad tokens
            next_ids = torch.where(unfinished, next_ids, pad)
        input_ids = torch.cat([input_ids, next_ids[:, None]], dim=-1)  # (B, T + 1)
        unfinished &= ~any_stop(criteria, input_ids, scores)
        if not bool(unfinished.any()):  # the one host sync per step: has every row finished?
            return input_ids
        attention_mask = grow(attention_mask)
        logits = decode_step(model, next_ids[:, None], attention_mask, cache)
