"""The two steps every decoder is made of, for any model that speaks the causal-LM protocol.

    cache = new_cache(model)
    logits = prefill(model, input_ids, attention_mask, cache=cache)   # (B, vocab): reads the whole prompt
    logits = decode_step(model, next_ids, mask, cache=cache)          # (B, vocab): reads ONE new token

The protocol is transformers': ``model(input_ids=, attention_mask=, position_ids=, cache=, use_cache=,
logits_to_keep=)`` returns an output with ``.logits``, and the cache has ``get_seq_length()``, ``crop(-n)`` and
``reorder_cache(rows)``. transformers models, the from-scratch ``MiniGPT`` (``course_lib.minigpt``, caches in
``course_lib.kv_cache``) and ``course_lib.ensembles.Ensemble`` all speak it.
"""

from __future__ import annotations

import functools
import inspect

import torch
from transformers import DynamicCache

from course_lib.devices import to_model_device


def new_cache(model, kind: str = "dynamic", batch: int = 1, max_len: int | None = None):
    """An empty KV cache for ``model``; ``prefill`` fills it and every ``decode_step`` appends one position.

    "dynamic" grows with every token; "static" (``MiniGPT`` only) is preallocated for ``max_len`` tokens of
    ``batch`` rows and written in place. A model with its own caches (``MiniGPT.make_cache``) makes them.
    """
    if hasattr(model, "make_cache"):
        return model.make_cache(kind, batch, max_len)
    if kind != "dynamic":
        raise ValueError(f"cache kind {kind!r} needs a course model (MiniGPT); transformers models take 'dynamic' "
                         f"here (for theirs: model.generate(..., cache_implementation='static'))")
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


def no_padding_mask(input_ids: torch.Tensor, past_len: int = 0) -> torch.LongTensor:
    """An all-ones attention mask over ``past_len`` cached tokens and the new ``input_ids`` (B, T): (B, past + T).

    It says "no padding" explicitly. Given no mask, transformers guesses padding from the pad id and warns ("We
    strongly recommend passing in an `attention_mask`"), and the bundled models' pad id is also their BOS and EOS,
    so real text holds it. An all-ones mask changes nothing in the computation.
    """
    return torch.ones(input_ids.shape[0], past_len + input_ids.shape[1], dtype=torch.long, device=input_ids.device)


def forward(model, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None, cache, **extra):
    """One forward pass over the tokens not yet in ``cache`` (``None``: no cache, the whole sequence);
    ``attention_mask`` covers cache + new tokens (``None`` = no padding). Returns the model output; the cache
    grows in place."""
    input_ids, attention_mask = to_model_device(model, input_ids, attention_mask)
    past_len = 0 if cache is None else cache.get_seq_length()
    pos = position_ids(attention_mask, input_ids.shape[1], past_len, input_ids.device)
    if attention_mask is None and not hasattr(model, "make_cache"):  # a course model reads None as "no padding"
        attention_mask = no_padding_mask(input_ids, past_len)
    if _keeps_last_logits_only(type(model)):
        extra.setdefault("logits_to_keep", 1)
    return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=pos, cache=cache,
                 use_cache=cache is not None, **extra)


def last_logits(output) -> torch.Tensor:
    """The logits of the last position of a model output as float32: (B, vocab)."""
    # A float32 copy: processors then work in full precision, and the big logits tensor can be freed.
    return output.logits[:, -1].to(copy=True, dtype=torch.float32)  # (B, vocab)


@torch.inference_mode()
def prefill(model, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None, *,
            cache) -> torch.Tensor:
    """Run the whole prompt (B, T) through ``model``, filling ``cache``; logits of the last position (B, vocab)."""
    return last_logits(forward(model, input_ids, attention_mask, cache))


@torch.inference_mode()
def decode_step(model, next_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None, *,
                cache) -> torch.Tensor:
    """Feed one new token per row (B, 1); ``attention_mask`` already includes it. Returns (B, vocab) logits.

    Same computation as ``prefill``, but for one position: it reads every weight and the whole cache to
    produce a single token, which is why decoding is memory-bound.
    """
    if next_ids.ndim != 2 or next_ids.shape[1] != 1:
        raise ValueError(f"decode_step feeds one token per row: next_ids must be (B, 1), got {tuple(next_ids.shape)}")
    return last_logits(forward(model, next_ids, attention_mask, cache))
