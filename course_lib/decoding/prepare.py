"""What every decoder does before its loop and at the end of each step, written once.

    run = prepare(model, input_ids, attention_mask, max_new_tokens, stopping, eos_token_id, pad_token_id)
    ...                                              # the decoder picks next_ids (B,) from the processed scores
    ids, unfinished = append_and_stop(run, ids, next_ids, unfinished, scores)

``prepare`` checks the arguments (clear errors before anything reaches torch), resolves EOS and pad (``None``:
the model's generation config; ``eos_token_id=[]``: no EOS stop), moves the inputs to the model's device and
builds the stopping criteria; ``append_and_stop`` pads finished rows, appends, and asks the criteria.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from course_lib.checks import check_arg, is_integer
from course_lib.decoding.stopping import Criterion, EosStop, MaxNewTokens, any_stop
from course_lib.devices import to_model_device
from course_lib.models import check_fits, check_token_ids


@dataclass
class GenerateOutput:
    """What every decoder returns; beam search and speculative decoding add their own fields."""

    sequences: torch.LongTensor  # (B, T + new): prompts and their continuations, finished rows padded


@dataclass
class Prepared:
    """A decoder's checked inputs, on the model's device, and its settings."""

    input_ids: torch.LongTensor  # (B, T)
    attention_mask: torch.Tensor | None  # (B, T); None when no row is padded
    eos: list[int]  # [] = no EOS stop
    pad: int | None  # what a finished row grows with
    criteria: list[Criterion]  # max_new_tokens, the caller's criteria, EOS


def special_ids(model, eos_token_id, pad_token_id) -> tuple[list[int], int | None]:
    """EOS ids and pad id; ``None`` means the model's ``generation_config`` (as ``model.generate``). Pass
    ``eos_token_id=[]`` to generate without EOS stopping."""
    config = model.generation_config
    eos = config.eos_token_id if eos_token_id is None else eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else eos
    check_arg("eos_token_id", eos_token_id, isinstance(eos, (list, tuple)) and all(is_integer(e) and e >= 0 for e in eos),
          "a token id, a list of token ids, or [] (no EOS stop)")
    pad = config.pad_token_id if pad_token_id is None else pad_token_id
    check_arg("pad_token_id", pad_token_id, pad is None or is_integer(pad) and pad >= 0, "a token id (an integer >= 0)")
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
    check_arg("max_new_tokens", max_new_tokens, is_integer(max_new_tokens) and max_new_tokens >= 0, "an integer >= 0")
    prompt_len = input_ids.shape[1]
    check_fits(model, prompt_len + max_new_tokens, what=f"the prompt ({prompt_len} tokens) + max_new_tokens")
    if attention_mask is None:
        check_left_padding(input_ids, pad_token_id)


def check_left_padding(input_ids: torch.Tensor, pad_token_id: int | None) -> None:
    """Refuse a batch that is visibly left-padded but comes without its attention mask (one host sync).

    Without the mask the model reads the pads as text and counts positions from the first pad, so a padded row
    silently gets a different continuation than the same prompt alone. The sign looked for: some rows start
    with the pad id and others do not. A row that starts with the pad id proves nothing by itself: the bundled
    models use id 0 as pad, EOS and BOS alike, and ``data.encode_prompt`` starts every prompt with that
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


def prepare(model, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None, max_new_tokens: int,
            stopping: Sequence[Criterion] = (), eos_token_id=None, pad_token_id=None) -> Prepared:
    """Checks, EOS/pad, the inputs on the model's device (the mask dropped when nothing is padded), criteria."""
    eos, pad = special_ids(model, eos_token_id, pad_token_id)
    check_prompt(model, input_ids, attention_mask, max_new_tokens, pad)
    input_ids, attention_mask = to_model_device(model, input_ids, drop_full_mask(attention_mask))
    criteria = [MaxNewTokens(input_ids.shape[1], max_new_tokens), *stopping] + ([EosStop(eos)] if eos else [])
    return Prepared(input_ids, attention_mask, eos, pad, criteria)


def append_and_stop(run: Prepared, input_ids: torch.LongTensor, next_ids: torch.LongTensor,
                    unfinished: torch.BoolTensor, scores: torch.Tensor) -> tuple[torch.LongTensor, torch.BoolTensor]:
    """Append ``next_ids`` (B,) to ``input_ids`` (B, T), pad in rows that had finished, and update which rows
    are still running: a row finishes when any criterion says so, given the step's processed ``scores``."""
    if run.pad is not None:  # a finished row keeps its length in the batch by growing with pad tokens
        next_ids = torch.where(unfinished, next_ids, run.pad)
    input_ids = torch.cat([input_ids, next_ids[:, None]], dim=-1)  # (B, T + 1)
    return input_ids, unfinished & ~any_stop(run.criteria, input_ids, scores)
