"""Numbers for the diversity-vs-quality trade-off of decoding settings.

- ``distinct_n``: diversity ACROSS samples, unique n-grams / all n-grams (Li et al. 2016, arXiv:1510.03055).
- ``repetition_rate``: repetition WITHIN one sample, the share of n-grams that already occurred earlier in it.
- ``perplexity``: quality as a judge model sees it, exp(mean next-token loss). Judge with a different model
  than the one that sampled (e.g. the bundled llama judging the storyteller): a model always likes its own
  most likely text, so self-scores reward dull, greedy-like output.

A sample is a sequence of tokens: a list or 1-D tensor of ids, or a string (split into words).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from course_lib.devices import to_model_device

Sample = Sequence | str | torch.Tensor


def _tokens(sample: Sample) -> list:
    if isinstance(sample, str):
        return sample.split()
    if isinstance(sample, torch.Tensor):
        return sample.tolist()
    return list(sample)


def ngrams(sample: Sample, n: int) -> list[tuple]:
    """All n-grams of one sample, in order (overlapping)."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n={n!r} is not allowed; n must be an integer >= 1")
    tokens = _tokens(sample)
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(samples: Sequence[Sample], n: int = 2) -> float:
    """Unique n-grams over all n-grams, pooled across ``samples``: 1.0 = nothing repeats, near 0 = all alike."""
    grams = [g for s in samples for g in ngrams(s, n)]
    if not grams:
        raise ValueError(f"the samples hold no {n}-grams (all shorter than {n} tokens)")
    return len(set(grams)) / len(grams)


def repetition_rate(sample: Sample, n: int = 3) -> float:
    """Share of the sample's n-grams that are repeats of an earlier n-gram in the same sample (0.0 = none)."""
    grams = ngrams(sample, n)
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


@torch.no_grad()
def perplexity(model, ids: torch.Tensor) -> float:
    """exp(mean loss) of ``model`` predicting each token of ``ids`` (1-D, >= 2 tokens) from the ones before it."""
    ids = torch.as_tensor(ids).flatten()  # (T,)
    if len(ids) < 2:
        raise ValueError(f"perplexity needs at least 2 tokens (one to predict), got {len(ids)}")
    ids = to_model_device(model, ids)
    # An explicit all-ones mask: an EOS inside a sample (id 0, also the pad id) is text here, not padding.
    logits = model(input_ids=ids[None], attention_mask=torch.ones_like(ids[None])).logits[0, :-1].float()  # (T-1, V)
    return math.exp(F.cross_entropy(logits, ids[1:]).item())
