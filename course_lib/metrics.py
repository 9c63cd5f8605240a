"""How good is a model, and how diverse is its text: every likelihood number of the course, computed once.

Likelihood: ``target_logprobs`` (log p of given tokens under given log-probabilities) is the one primitive;
``next_token_logprobs`` (a model's log p of each next token), ``nll``, ``heldout_loss`` (nats/token over
windows of a token stream, as in the model cards) and ``perplexity`` are built on it.

Diversity:
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

from course_lib.data import eval_windows
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


def target_logprobs(log_probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) at every position: ``log_probs`` (..., vocab), ``targets`` (...) of ids -> (...).

    ``targets`` follow ``log_probs`` to the device the model computed them on.
    """
    return log_probs.gather(-1, targets.to(log_probs.device)[..., None]).squeeze(-1)


def nll(log_probs: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean negative log-likelihood (nats/token) of ``targets`` (B, T) under ``log_probs`` (B, T, vocab)."""
    return -target_logprobs(log_probs, targets).mean().item()


@torch.no_grad()
def next_token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """log p(token t+1 | tokens up to t) for every position of ``input_ids`` (B, T): (B, T - 1), float32.

    ``attention_mask`` None means no padding, said with an explicit all-ones mask: an EOS inside the text
    (id 0, also the pad id) is text here. Pad on the right: padding after the text changes nothing before it.
    """
    input_ids, attention_mask = to_model_device(model, input_ids, attention_mask)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()  # (B, T-1, vocab)
    return target_logprobs(logits.log_softmax(dim=-1), input_ids[:, 1:])


@torch.no_grad()
def heldout_loss(model, ids: torch.Tensor, context: int = 256, batch_size: int = 16) -> tuple[float, int]:
    """Mean next-token loss (nats/token) over non-overlapping windows of the stream ``ids``; also the token count."""
    ids = to_model_device(model, ids)
    model.eval()
    x_all, y_all = eval_windows(ids, context)  # (N, T) each
    total, count = 0.0, 0
    for i in range(0, len(x_all), batch_size):
        x, y = x_all[i : i + batch_size], y_all[i : i + batch_size]
        logits = model(input_ids=x, attention_mask=torch.ones_like(x)).logits.float()  # (B, T, vocab)
        total -= target_logprobs(logits.log_softmax(dim=-1), y).sum().item()
        count += y.numel()
    return total / count, count


def perplexity(model, ids: torch.Tensor) -> float:
    """exp(mean loss) of ``model`` predicting each token of ``ids`` (1-D, >= 2 tokens) from the ones before it."""
    ids = torch.as_tensor(ids).flatten()  # (T,)
    if len(ids) < 2:
        raise ValueError(f"perplexity needs at least 2 tokens (one to predict), got {len(ids)}")
    return math.exp(-next_token_logprobs(model, ids[None]).mean().item())
