"""Sampling: shape the distribution with processors, then draw the next token from it.

    out = sample(model, input_ids, max_new_tokens=40, temperature=0.8, top_p=0.9, seed=0)

gives the same tokens as ``torch.manual_seed(0); model.generate(input_ids, do_sample=True, max_new_tokens=40,
temperature=0.8, top_p=0.9, top_k=0)``: the processors run in the order ``generate`` uses and the draw uses the
global torch RNG exactly as ``generate`` does. Note ``top_k=0``: ``generate`` applies top_k=50 unless told otherwise,
``sample`` applies no top-k unless asked. Randomness has one source in every course decoder: the global torch RNG,
seeded by ``seed=`` when given.
"""

from __future__ import annotations

from typing import Sequence

import torch

from course_lib.checks import check_arg, is_integer
from course_lib.decoding.loop import generate
from course_lib.decoding.prepare import GenerateOutput, check_prompt
from course_lib.decoding.processors import (
    FrequencyPresencePenalty,
    MinP,
    NoRepeatNGram,
    Processor,
    RepetitionPenalty,
    Temperature,
    TopK,
    TopP,
    TypicalP,
    apply_processors,
)
from course_lib.decoding.steps import new_cache, prefill
from course_lib.decoding.stopping import Criterion
from course_lib.devices import to_model_device


def sample_select(scores: torch.Tensor) -> torch.LongTensor:
    """Draw one token per row from softmax(scores): (B, vocab) -> (B,). Uses the global torch RNG."""
    probs = torch.softmax(scores, dim=-1)  # (B, vocab); filtered tokens (-inf) get probability 0
    return torch.multinomial(probs, num_samples=1).squeeze(1)


def sampling_processors(input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                        temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, min_p: float | None = None,
                        typical_p: float = 1.0, repetition_penalty: float = 1.0, no_repeat_ngram_size: int = 0,
                        frequency_penalty: float = 0.0, presence_penalty: float = 0.0) -> list[Processor]:
    """The processors for a prompt (B, T), in ``generate``'s order: penalties first, then the warpers
    temperature -> top-k -> top-p -> min-p -> typical-p. Settings that change nothing are left out; any other
    value builds its processor, whose constructor rejects values out of range (generate ignores top_p > 1)."""
    processors: list[Processor] = []
    if repetition_penalty != 1.0:
        # Like generate: left padding (the zeros before each row's first real token) is not penalised.
        pad_lengths = 0 if attention_mask is None else (attention_mask != 0).int().argmax(dim=1)  # (B,)
        processors.append(RepetitionPenalty(repetition_penalty, ignore_first=pad_lengths))
    if no_repeat_ngram_size != 0:
        processors.append(NoRepeatNGram(no_repeat_ngram_size))
    if frequency_penalty != 0.0 or presence_penalty != 0.0:  # not in generate; counts generated tokens only
        processors.append(FrequencyPresencePenalty(frequency_penalty, presence_penalty, ignore_first=input_ids.shape[1]))
    if temperature != 1.0:
        processors.append(Temperature(temperature))
    if top_k != 0:
        processors.append(TopK(top_k))
    if top_p != 1.0:
        processors.append(TopP(top_p))
    if min_p is not None:
        processors.append(MinP(min_p))
    if typical_p != 1.0:
        processors.append(TypicalP(typical_p))
    return processors


def seed_rng(seed: int | None) -> None:
    """Seed the global torch RNG (the one source of randomness of every course decoder); ``None`` leaves it."""
    check_arg("seed", seed, seed is None or is_integer(seed) and 0 <= seed < 2**64, "an integer in [0, 2**64) or None")
    if seed is not None:
        torch.manual_seed(seed)


def sample(model, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None, *, max_new_tokens: int,
           processors: Sequence[Processor] = (), temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           min_p: float | None = None, typical_p: float = 1.0, repetition_penalty: float = 1.0,
           no_repeat_ngram_size: int = 0, frequency_penalty: float = 0.0, presence_penalty: float = 0.0,
           seed: int | None = None, stopping: Sequence[Criterion] = (), eos_token_id=None,
           pad_token_id=None) -> GenerateOutput:
    """Sample up to ``max_new_tokens`` per row: prompt (B, T) -> (B, T + new).

    The settings build ``sampling_processors``; ``processors`` run after them (your own rules). ``seed`` (if
    given) seeds the global torch RNG first, so the same call gives the same text. EOS and pad default to the
    model's generation config, as in ``generate``.
    """
    input_ids, attention_mask = to_model_device(model, input_ids, attention_mask)
    built = sampling_processors(
        input_ids, attention_mask, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
        typical_p=typical_p, repetition_penalty=repetition_penalty, no_repeat_ngram_size=no_repeat_ngram_size,
        frequency_penalty=frequency_penalty, presence_penalty=presence_penalty)
    seed_rng(seed)
    return generate(model, input_ids, attention_mask, max_new_tokens=max_new_tokens,
                    processors=[*built, *processors], select=sample_select, stopping=stopping,
                    eos_token_id=eos_token_id, pad_token_id=pad_token_id)


def next_token_probs(model, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None, *,
                     processors: Sequence[Processor] = ()) -> torch.Tensor:
    """The next-token distribution after ``processors``: (B, T) prompt -> (B, vocab) probabilities."""
    check_prompt(model, input_ids, attention_mask, max_new_tokens=0)
    input_ids, attention_mask = to_model_device(model, input_ids, attention_mask)
    logits = prefill(model, input_ids, attention_mask, cache=new_cache(model))  # (B, vocab)
    return torch.softmax(apply_processors(processors, input_ids, logits), dim=-1)


class KeptCounter:
    """A processor that changes nothing and records how many tokens each row still allows (finite scores).

    Put it last in a processor list to watch a truncation rule work over a generation: ``counts`` holds one
    (B,) tensor per step.
    """

    def __init__(self):
        self.counts: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.counts.append(torch.isfinite(scores).sum(dim=-1))  # (B,)
        return scores
