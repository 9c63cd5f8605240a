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

from course_lib.checks import check, is_integer
from course_lib.decoding.stopping import EosStop, MaxNewTokens, any_stop
from course_lib.devices import to_model_device
from course_lib.models import check_fits, check_token_ids

Processor = Callable[[torch.LongTensor, torch.Tensor], torch.Tensor]
Selector = Callable[[torch.Tensor], torch.LongTensor]
Criterion = Callable[[torch.LongTensor, torch.Tensor], torch.BoolTensor]


def new_cache(model) -> DynamicCache:
    """An empty KV cache for ``model``; ``prefill`` fills it and every ``decode_step`` appends one position."""
    return DynamicCache(config=model.config.get_text_config(decoder=True))


def position_ids(attention_mask: torch.Tensor | None, new_len: int, past_len: int,
                 device: torch.device) -> torch.LongTensor:
    """Positions of the ``new_len`` newest tokens, on ``device``. With left padding a row's first REAL token is
    position 0, so positions count the ones of the mask; pads get 0 (they are masked out anyway), as in
    transformers."""
    if attention_mask is None:
        return torch.arange(past_len, past_len + new_len, device=device).unsqueeze(0)  # (1, new_len)
    positions = attention_mask.long().cumsum(-1) - 1  # (B, past + new)
    return positions.masked_fill(attention_mask == 0, 0)[:, -new_len:]  # (B, new_len)


@functools.cache
def _keeps_last_logits_only(model_class) -> bool:
    # Models that accept logits_to_keep=1 skip the LM head for every position but the last, as in generate().
    return "logits_to_keep" in inspect.signature(model_class.forward).parameters


def forward(model, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None, cache, **extra):
    """One forward pass over the tokens not yet in ``cache``; ``attention_mask`` covers cache + new tokens
    (``None`` = no padding). Returns the model output; the cache grows in place."""
    input_ids, attention_mask = to_model_device(model, input_ids, attention_mask)
    past_len = cache.get_seq_length()
    pos = position_ids(attention_mask, input_ids.shape[1], past_len, input_ids.device)
    if attention_mask is None:
        attention_mask = no_padding_mask(input_ids, past_len)
    if _keeps_last_logits_only(type(model)):
        extra.setdefault("logits_to_keep", 1)
    return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=pos, cache=cache,
                 use_cache=True, **extra)


def no_padding_mask(input_ids: torch.Tensor, past_len: int = 0) -> torch.LongTensor:
    """An all-ones attention mask over ``past_len`` cached tokens and the new ``input_ids`` (B, T): (B, past + T).

    It says "no padding" explicitly. Given no mask, transformers guesses padding from the pad id and warns ("We
    strongly recommend passing in an `attention_mask`"), and the bundled models' pad id is also their BOS and EOS,
    so real text holds it. An all-ones mask changes nothing in the computation.
    """
    return torch.ones(input_ids.shape[0], past_len + input_ids.shape[1], dtype=torch.long, device=input_ids.device)


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
    eos = [] if eos is None else [eos] if isinstance(eos, int) else eos
    check("eos_token_id", eos_token_id, isinstance(eos, (list, tuple)) and all(is_integer(e) and e >= 0 for e in eos),
          "a token id, a list of token ids, or [] (no EOS stop)")
    pad = config.pad_token_id if pad_token_id is None else pad_token_id
    check("pad_token_id", pad_token_id, pad is None or is_integer(pad) and pad >= 0, "a token id (an integer >= 0)")
    return list(eos), (eos[0] if pad is None and eos else pad)


def check_prompt(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, max_new_tokens: int,
                 pad_token_id: int | None = None) -> None:
    """Clear errors, before anything reaches torch, for the mistakes every decoding function must refuse: ids
    that are not a (batch, length) integer tensor of the model's vocabulary, a mask of another shape, a bad
    ``max_new_tokens``, a prompt plus ``max_new_tokens`` longer than the model's context window, and a visibly
    left-padded batch without its mask (see ``check_left_padding``; ``pad_token_id=None``: the model's)."""
    pad_token_id = special_ids(model, None, pad_token_id)[1]
    check_token_ids(model, input_ids)
    if attention_mask is not None and getattr(attention_mask, "shape", None) != input_ids.shape:
        raise ValueError(f"attention_mask shape {tuple(getattr(attention_mask, 'shape', ()))} must equal input_ids "
                         f"shape {tuple(input_ids.shape)}")
    check("max_new_tokens", max_new_tokens, is_integer(max_new_tokens) and max_new_tokens >= 0, "an integer >= 0")
    prompt_len = input_ids.shape[1]
    check_fits(model, prompt_len + max_new_tokens, what=f"the prompt ({prompt_len} tokens) + max_new_tokens")
    if attention_mask is None:
        check_left_padding(input_ids, pad_token_id)


def check_left_padding(input_ids: torch.Tensor, pad_token_id: int | None) -> None:
    """Refuse a batch that is visibly left-padded but comes without its attention mask (one host sync).

    Without the mask the model reads the pads as text and counts positions from the first pad, so a padded row
    silently gets a different continuation than the same prompt alone. The sign looked for: some rows start
    with the pad id and others do not. A row that starts with the pad id proves nothing by itself: the bundled
    models use id 0 as pad, EOS and BOS alike, and ``prompting.encode_prompt`` starts every prompt with that
    BOS. So a batch in which EVERY row starts with the pad id (BOS-prefixed prompts, padded or not) cannot be
    told apart from an unpadded one and is let through; so is a single row.
    """
    if pad_token_id is None or input_ids.shape[0] < 2:
        return
    starts_with_pad = input_ids[:, 0] == pad_token_id  # (B,)
    n_padded = int(starts_with_pad.sum())
    if 0 < n_padded < input_ids.shape[0]:
        row = int(starts_with_pad.int().argmax())
        raise ValueError(
            f"input_ids look left-padded but attention_mask is None: row {row} starts with the pad id "
            f"{pad_token_id} and other rows do not, and without the mask the model reads pads as text. Pass the "
            f"tokenizer's attention_mask (batch = tokenizer(texts, padding=True, return_tensors='pt'), then "
            f"batch.input_ids, batch.attention_mask). If those rows really begin with token {pad_token_id}, "
            f"pass attention_mask=torch.ones_like(input_ids)."
        )


def drop_full_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """Without padding the mask carries no information; transformers drops it. Call it where the mask arrives,
    before ``to_model_device``: a host mask is then checked on the host, and only a device mask costs a sync."""
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
    eos, pad = special_ids(model, eos_token_id, pad_token_id)
    check_prompt(model, input_ids, attention_mask, max_new_tokens, pad)
    input_ids, attention_mask = to_model_device(model, input_ids, drop_full_mask(attention_mask))
    criteria = [MaxNewTokens(input_ids.shape[1], max_new_tokens), *stopping] + ([EosStop(eos)] if eos else [])
    if max_new_tokens == 0:
        return input_ids
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
