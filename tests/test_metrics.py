"""Diversity, repetition and perplexity helpers on hand-checked cases."""
from __future__ import annotations

import math

import pytest
import torch

from course_lib.decoding import generate
from course_lib.metrics import distinct_n, ngrams, perplexity, repetition_rate
from course_lib.metrics import heldout_loss


def test_ngrams_of_words_ids_and_tensors():
    assert ngrams("a b c", 2) == [("a", "b"), ("b", "c")]
    assert ngrams([1, 2, 3], 2) == ngrams(torch.tensor([1, 2, 3]), 2) == [(1, 2), (2, 3)]
    assert ngrams([1, 2], 3) == []


def test_distinct_n_pools_across_samples():
    assert distinct_n(["a b c", "a b d"], n=2) == 3 / 4  # (a b) occurs twice
    assert distinct_n(["a b c", "a b d"], n=1) == 4 / 6
    assert distinct_n([[1, 2, 3], [4, 5, 6]], n=2) == 1.0
    assert distinct_n([[7, 7], [7, 7]], n=2) == 1 / 2


def test_repetition_rate_within_a_sample():
    assert repetition_rate("a b a b a b", n=2) == pytest.approx(3 / 5)  # ab ba ab ba ab: 3 repeats
    assert repetition_rate([1, 2, 3, 4], n=2) == 0.0
    assert repetition_rate([1, 2], n=3) == 0.0


def test_perplexity_agrees_with_the_training_loss(tiny_gpt2):
    ids = torch.randint(1, tiny_gpt2.config.vocab_size, (12,), generator=torch.Generator().manual_seed(0))
    nats_per_token, _ = heldout_loss(tiny_gpt2, ids, context=11)  # one window over the same 12 tokens
    assert perplexity(tiny_gpt2, ids) == pytest.approx(math.exp(nats_per_token), rel=1e-5)


def test_a_models_greedy_text_has_lower_perplexity_than_random_text(tiny_gpt2):
    prompt = torch.tensor([[5, 17, 42]])
    greedy = generate(tiny_gpt2, prompt, max_new_tokens=15, eos_token_id=[]).sequences[0]
    noise = torch.randint(1, tiny_gpt2.config.vocab_size, (18,), generator=torch.Generator().manual_seed(1))
    assert perplexity(tiny_gpt2, greedy) < perplexity(tiny_gpt2, noise)


@pytest.mark.parametrize("call, match", [
    (lambda: ngrams("a b", 0), "n=0 .*>= 1"),
    (lambda: distinct_n(["a", "b"], n=2), "no 2-grams"),
    (lambda: distinct_n([], n=1), "no 1-grams"),
])
def test_bad_input_raises(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_perplexity_needs_two_tokens(tiny_gpt2):
    with pytest.raises(ValueError, match="at least 2 tokens"):
        perplexity(tiny_gpt2, torch.tensor([3]))
