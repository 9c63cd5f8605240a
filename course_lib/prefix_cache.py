"""Prefix caching: many requests that share a prompt prefix (a system prompt, a document) compute its KV cache
once, and each request runs only its own suffix on a copy of it."""

from __future__ import annotations

import copy

import torch

from course_lib.decoding import GenerateOutput, greedy_no_sync, new_cache, prefill
from course_lib.devices import to_model_device


def build_prefix_cache(model, prefix_ids: torch.Tensor):
    """Run a shared prefix (1, P) once; its cache then serves any number of continuations."""
    cache = new_cache(model)
    prefill(model, prefix_ids, cache=cache)
    return cache


def first_token_with_prefix_cache(model, prefix_cache, suffix_ids: torch.Tensor) -> torch.Tensor:
    """The first new token (1,) after prefix + suffix, running only the suffix on a copy of the prefix cache."""
    return prefill(model, suffix_ids, cache=copy_of(prefix_cache)).argmax(-1)


def first_token_without_prefix_cache(model, prefix_ids: torch.Tensor, suffix_ids: torch.Tensor) -> torch.Tensor:
    """The same first token, running prefix + suffix from scratch: what every request pays without reuse."""
    ids = torch.cat(to_model_device(model, prefix_ids, suffix_ids), dim=1)  # (1, P + S)
    return prefill(model, ids, cache=new_cache(model)).argmax(-1)


def generate_from_prefix(model, prefix_cache, suffix_ids: torch.Tensor, max_new_tokens: int) -> GenerateOutput:
    """Greedy continuation of prefix + suffix that reuses the prefix cache (left untouched): (1, S + n)."""
    if prefix_cache.get_seq_length() == 0:
        raise ValueError("the prefix cache is empty: build it with build_prefix_cache(model, prefix_ids)")
    return greedy_no_sync(model, suffix_ids, max_new_tokens=max_new_tokens, cache=copy_of(prefix_cache))


def copy_of(cache):
    """An independent copy of a course cache (``clone``) or a transformers cache (``copy.deepcopy``)."""
    return cache.clone() if hasattr(cache, "clone") else copy.deepcopy(cache)
