"""Each from-scratch logits processor against its transformers counterpart, plus validation and purity."""
from __future__ import annotations

import pytest
import torch
from transformers import (
    LogitsProcessorList,
    MinPLogitsWarper,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from course_lib.decoding.processors import (
    FrequencyPresencePenalty,
    MinP,
    NoRepeatNGram,
    RepetitionPenalty,
    Temperature,
    TopK,
    TopP,
    TypicalP,
    apply_processors,
    token_counts,
)

VOCAB = 53

# (ours, transformers) pairs: every setting is checked on random and on real logits.
PAIRS = {
    "temperature-0.5": (Temperature(0.5), TemperatureLogitsWarper(0.5)),
    "temperature-1.7": (Temperature(1.7), TemperatureLogitsWarper(1.7)),
    "top_k-1": (TopK(1), TopKLogitsWarper(1)),
    "top_k-7": (TopK(7), TopKLogitsWarper(7)),
    "top_k-2-keep-4": (TopK(2, min_tokens_to_keep=4), TopKLogitsWarper(2, min_tokens_to_keep=4)),
    "top_k-above-vocab": (TopK(10_000), TopKLogitsWarper(10_000)),
    "top_p-0.1": (TopP(0.1), TopPLogitsWarper(0.1)),
    "top_p-0.5": (TopP(0.5), TopPLogitsWarper(0.5)),
    "top_p-0.92": (TopP(0.92), TopPLogitsWarper(0.92)),
    "top_p-1.0": (TopP(1.0), TopPLogitsWarper(1.0)),
    "top_p-0.3-keep-3": (TopP(0.3, min_tokens_to_keep=3), TopPLogitsWarper(0.3, min_tokens_to_keep=3)),
    "min_p-0.05": (MinP(0.05), MinPLogitsWarper(0.05)),
    "min_p-0.4": (MinP(0.4), MinPLogitsWarper(0.4)),
    "min_p-0.9-keep-2": (MinP(0.9, min_tokens_to_keep=2), MinPLogitsWarper(0.9, min_tokens_to_keep=2)),
    "typical_p-0.2": (TypicalP(0.2), TypicalLogitsWarper(0.2)),
    "typical_p-0.9": (TypicalP(0.9), TypicalLogitsWarper(0.9)),
    "typical_p-0.5-keep-3": (TypicalP(0.5, min_tokens_to_keep=3), TypicalLogitsWarper(0.5, min_tokens_to_keep=3)),
    "repetition-1.3": (RepetitionPenalty(1.3), RepetitionPenaltyLogitsProcessor(1.3)),
    "repetition-0.7": (RepetitionPenalty(0.7), RepetitionPenaltyLogitsProcessor(0.7)),
    "no_repeat-1": (NoRepeatNGram(1), NoRepeatNGramLogitsProcessor(1)),
    "no_repeat-2": (NoRepeatNGram(2), NoRepeatNGramLogitsProcessor(2)),
    "no_repeat-3": (NoRepeatNGram(3), NoRepeatNGramLogitsProcessor(3)),
}


def random_case(seed: int, vocab: int = VOCAB, batch: int = 4, length: int = 24):
    """Logits at three sharpness levels (plus a row already cut by an earlier warper) and repetitive ids."""
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(batch, vocab, generator=gen) * torch.tensor([0.3, 1.0, 4.0, 2.0])[:batch, None]
    scores[-1, : vocab // 2] = -float("inf")
    # Few distinct ids, so that tokens and n-grams repeat and the penalties have work to do.
    input_ids = torch.randint(0, 6, (batch, length), generator=gen)
    input_ids[:, -2:] = input_ids[:, 3:5]  # the last bigram occurred before: a 3-gram ban applies
    return input_ids, scores


def assert_same_scores(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
    assert torch.equal(torch.isneginf(ours), torch.isneginf(theirs)), "different tokens were filtered"
    finite = torch.isfinite(theirs)
    torch.testing.assert_close(ours[finite], theirs[finite], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", PAIRS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_transformers_on_random_logits(name, seed):
    ours, theirs = PAIRS[name]
    input_ids, scores = random_case(seed)
    assert_same_scores(ours(input_ids, scores), theirs(input_ids, scores.clone()))


@pytest.fixture(scope="module")
def real_case(tiny_gpt2, storyteller):
    """Next-token logits of the tiny model and of the bundled storyteller, with their contexts."""
    gen = torch.Generator().manual_seed(3)
    tiny_ids = torch.randint(0, tiny_gpt2.config.vocab_size, (3, 20), generator=gen)
    model, tokenizer = storyteller
    story_ids = tokenizer(["Once upon a time, there was a little girl. The little girl",
                           "The dog said: I want to play. I want to"], return_tensors="pt", padding=True).input_ids
    with torch.no_grad():
        return [(ids, m(input_ids=ids).logits[:, -1].float()) for m, ids in ((tiny_gpt2, tiny_ids), (model, story_ids))]


@pytest.mark.parametrize("name", PAIRS)
def test_matches_transformers_on_real_logits(name, real_case):
    ours, theirs = PAIRS[name]
    for input_ids, scores in real_case:
        assert_same_scores(ours(input_ids, scores), theirs(input_ids, scores.clone()))


@pytest.mark.parametrize("name", PAIRS)
def test_inputs_are_not_modified(name):
    ours, _ = PAIRS[name]
    input_ids, scores = random_case(4)
    ids_before, scores_before = input_ids.clone(), scores.clone()
    out = ours(input_ids, scores)
    assert torch.equal(input_ids, ids_before) and torch.equal(scores, scores_before)
    assert out.shape == scores.shape


def test_top_k_zero_disables():
    input_ids, scores = random_case(5)
    assert torch.equal(TopK(0)(input_ids, scores), scores)


def test_top_k_keeps_ties_with_the_kth():
    scores = torch.tensor([[3.0, 1.0, 1.0, 0.0]])
    kept = torch.isfinite(TopK(2)(None, scores))
    assert kept.tolist() == [[True, True, True, False]]


def test_top_p_keeps_the_token_that_crosses_the_threshold():
    scores = torch.tensor([[0.5, 0.3, 0.2]]).log()
    assert torch.isfinite(TopP(0.7)(None, scores)).tolist() == [[True, True, False]]  # 0.5 < 0.7 <= 0.5 + 0.3
    assert torch.isfinite(TopP(0.4)(None, scores)).tolist() == [[True, False, False]]


def test_min_p_scales_with_the_top_probability():
    confident = torch.tensor([[0.90, 0.06, 0.04]]).log()
    unsure = torch.tensor([[0.40, 0.35, 0.25]]).log()
    assert torch.isfinite(MinP(0.1)(None, confident)).tolist() == [[True, False, False]]  # cut at 0.09
    assert torch.isfinite(MinP(0.1)(None, unsure)).tolist() == [[True, True, True]]  # cut at 0.04


def test_typical_p_can_drop_the_most_likely_token():
    # One dominant token and many tiny ones: the dominant token's surprisal is far below the entropy.
    probs = torch.tensor([[0.4] + [0.6 / 30] * 30])
    kept = torch.isfinite(TypicalP(0.5)(None, probs.log()))
    assert not kept[0, 0] and kept[0, 1:].any()


def test_repetition_penalty_asymmetry():
    scores = torch.tensor([[2.0, -2.0, 2.0, -2.0]])
    out = RepetitionPenalty(2.0)(torch.tensor([[0, 1]]), scores)
    assert out.tolist() == [[1.0, -4.0, 2.0, -2.0]]  # positive halved, negative doubled, unseen untouched


def test_repetition_penalty_ignores_left_padding_like_generate():
    input_ids, scores = random_case(6)
    pad_lengths = torch.tensor([0, 3, 10, 24])
    ours = RepetitionPenalty(1.5, ignore_first=pad_lengths)(input_ids, scores)
    theirs = RepetitionPenaltyLogitsProcessor(1.5, prompt_ignore_length=pad_lengths)(input_ids, scores.clone())
    assert_same_scores(ours, theirs)


def test_token_counts():
    ids = torch.tensor([[1, 1, 2, 1], [3, 3, 3, 0]])
    counts = token_counts(ids, vocab_size=4, ignore_first=torch.tensor([0, 2]))
    assert counts.tolist() == [[0, 3, 1, 0], [1, 0, 0, 1]]


def test_frequency_presence_penalty_formula():
    ids = torch.tensor([[5, 1, 1, 2, 1]])  # after the prompt token 5: token 1 three times, token 2 once
    scores = torch.zeros(1, 6)
    out = FrequencyPresencePenalty(frequency=0.5, presence=1.0, ignore_first=1)(ids, scores)
    expected = [[0.0, -(0.5 * 3 + 1.0), -(0.5 * 1 + 1.0), 0.0, 0.0, 0.0]]
    assert out.tolist() == expected
    # Negative values reward repeats; both zero leave the scores as they were.
    assert FrequencyPresencePenalty(frequency=-1.0)(ids, scores)[0, 1].item() == 3.0  # 3 occurrences
    assert torch.equal(FrequencyPresencePenalty()(ids, scores), scores)


def test_frequency_penalty_grows_with_repeats_but_repetition_penalty_does_not():
    once, thrice = torch.tensor([[1, 0, 0]]), torch.tensor([[1, 1, 1]])
    scores = torch.full((1, 3), 2.0)
    rep = RepetitionPenalty(2.0)
    freq = FrequencyPresencePenalty(frequency=0.5)
    assert rep(once, scores)[0, 1] == rep(thrice, scores)[0, 1]
    assert freq(thrice, scores)[0, 1] < freq(once, scores)[0, 1]


def test_apply_processors_matches_logits_processor_list():
    input_ids, scores = random_case(7)
    ours = [RepetitionPenalty(1.2), Temperature(0.8), TopK(9), TopP(0.8)]
    theirs = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.2), TemperatureLogitsWarper(0.8),
                                  TopKLogitsWarper(9), TopPLogitsWarper(0.8)])
    assert_same_scores(apply_processors(ours, input_ids, scores), theirs(input_ids, scores.clone()))
    assert apply_processors([], input_ids, scores) is scores


def test_order_of_top_k_and_top_p_matters():
    scores = torch.tensor([[0.30, 0.25, 0.20, 0.15, 0.10]]).log()
    k_then_p = apply_processors([TopK(2), TopP(0.5)], None, scores)  # top-p sees 0.30/0.55 and 0.25/0.55
    p_then_k = apply_processors([TopP(0.5), TopK(2)], None, scores)  # top-p keeps 3 of 5, top-k 2 of them
    assert torch.isfinite(k_then_p).sum() == 1 and torch.isfinite(p_then_k).sum() == 2


@pytest.mark.parametrize("make, match", [
    (lambda: Temperature(0), "temperature=0 .*> 0"),
    (lambda: Temperature(-1.0), "temperature=-1.0"),
    (lambda: Temperature(float("nan")), "temperature=nan"),
    (lambda: TopK(-1), r"top_k=-1 .*>= 0"),
    (lambda: TopK(2.5), "top_k=2.5 .*integer"),
    (lambda: TopK(True), "top_k=True"),
    (lambda: TopK(5, min_tokens_to_keep=0), "min_tokens_to_keep=0"),
    (lambda: TopP(0), r"top_p=0 .*\(0, 1\]"),
    (lambda: TopP(1.2), r"top_p=1.2 .*\(0, 1\]"),
    (lambda: TopP(0.9, min_tokens_to_keep=-1), "min_tokens_to_keep=-1"),
    (lambda: MinP(-0.1), r"min_p=-0.1 .*\[0, 1\]"),
    (lambda: MinP(1.5), r"min_p=1.5"),
    (lambda: TypicalP(1.0), r"typical_p=1.0 .*\(0, 1\)"),
    (lambda: TypicalP(0), r"typical_p=0"),
    (lambda: RepetitionPenalty(0), "penalty=0 .*> 0"),
    (lambda: RepetitionPenalty(-1.2), "penalty=-1.2"),
    (lambda: FrequencyPresencePenalty(frequency=3), r"frequency_penalty=3 .*\[-2, 2\]"),
    (lambda: FrequencyPresencePenalty(presence=-2.5), r"presence_penalty=-2.5"),
    (lambda: NoRepeatNGram(0), "ngram_size=0 .*>= 1"),
    (lambda: NoRepeatNGram(2.0), "ngram_size=2.0"),
])
def test_bad_arguments_raise_clear_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()
