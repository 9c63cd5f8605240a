"""Seeded sampling built from course_lib processors gives the same token ids as model.generate(do_sample=True)."""
from __future__ import annotations

import pytest
import torch
from transformers import GenerationConfig

from course_lib.decoding import generate
from course_lib.decoding.processors import TopK
from course_lib.decoding.sampling import KeptCounter, next_token_probs, sample, sample_select, sampling_processors

# Each setting is sampled with our loop and with generate from the same seed; top_k defaults to 0 here because
# generate's own default is top_k=50.
SETTINGS = [
    dict(),
    dict(temperature=0.7),
    dict(temperature=2.0),
    dict(top_k=5),
    dict(top_p=0.8),
    dict(temperature=1.5, top_k=20, top_p=0.9),
    dict(min_p=0.1, temperature=1.5),
    dict(typical_p=0.7, temperature=1.5),
    dict(repetition_penalty=1.3, temperature=1.5),
    dict(repetition_penalty=0.8),
    dict(no_repeat_ngram_size=2, temperature=1.5),
    dict(temperature=1.2, top_k=30, top_p=0.95, repetition_penalty=1.2, no_repeat_ngram_size=3),
]


def generate_kwargs(setting: dict) -> dict:
    return {"top_k": 0, **setting}


def prompt(vocab: int, batch: int = 3, length: int = 7, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()) or "plain")
def test_seeded_sampling_matches_generate_on_tiny_models(tiny_model, setting):
    ids = prompt(tiny_model.config.vocab_size)
    torch.manual_seed(11)
    theirs = tiny_model.generate(ids, do_sample=True, max_new_tokens=16, **generate_kwargs(setting))
    ours = sample(tiny_model, ids, max_new_tokens=16, seed=11, **setting).sequences
    assert torch.equal(ours, theirs)


def test_seeded_sampling_matches_generate_with_left_padding_and_eos(tiny_gpt2):
    # Row 1 is left-padded; the repetition penalty must skip its pads as generate does. Rows stop at EOS (id 0)
    # at different steps and then grow with pad.
    ids = prompt(tiny_gpt2.config.vocab_size, length=8, seed=1)
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = 0, 0
    setting = dict(temperature=2.5, repetition_penalty=1.4, top_p=0.95)
    torch.manual_seed(5)
    theirs = tiny_gpt2.generate(ids, attention_mask=mask, do_sample=True, max_new_tokens=30, **generate_kwargs(setting))
    ours = sample(tiny_gpt2, ids, mask, max_new_tokens=30, seed=5, **setting).sequences
    assert torch.equal(ours, theirs)


STORY_SETTINGS = [dict(temperature=0.8), dict(top_k=40, temperature=1.0), dict(top_p=0.9, temperature=0.9),
                  dict(repetition_penalty=1.3, top_p=0.95), dict(min_p=0.05, typical_p=0.9)]


@pytest.mark.parametrize("setting", STORY_SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_seeded_sampling_matches_generate_on_storyteller(storyteller, setting):
    model, tokenizer = storyteller
    batch = tokenizer(["Once upon a time", "The little dog was very"], return_tensors="pt", padding=True)
    torch.manual_seed(3)
    theirs = model.generate(**batch, do_sample=True, max_new_tokens=24, **generate_kwargs(setting))
    ours = sample(model, batch.input_ids, batch.attention_mask, max_new_tokens=24, seed=3, **setting).sequences
    assert torch.equal(ours, theirs)


def test_seed_changes_the_sample_and_repeats_it(tiny_gpt2):
    ids = prompt(tiny_gpt2.config.vocab_size)
    first = sample(tiny_gpt2, ids, max_new_tokens=12, temperature=2.0, seed=0).sequences
    again = sample(tiny_gpt2, ids, max_new_tokens=12, temperature=2.0, seed=0).sequences
    other = sample(tiny_gpt2, ids, max_new_tokens=12, temperature=2.0, seed=1).sequences
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_processor_order_is_generates_order(tiny_gpt2):
    ids = prompt(tiny_gpt2.config.vocab_size, batch=1)
    controls = dict(temperature=0.7, top_k=5, top_p=0.9, min_p=0.1, typical_p=0.8, repetition_penalty=1.2,
                    no_repeat_ngram_size=3)
    theirs = tiny_gpt2._get_logits_processor(generation_config=GenerationConfig(do_sample=True, **controls),
                                             input_ids_seq_length=ids.shape[1])
    ours = sampling_processors(ids, **controls)
    hf_names = {"RepetitionPenalty": "RepetitionPenaltyLogitsProcessor", "NoRepeatNGram": "NoRepeatNGramLogitsProcessor",
                "Temperature": "TemperatureLogitsWarper", "TopK": "TopKLogitsWarper", "TopP": "TopPLogitsWarper",
                "MinP": "MinPLogitsWarper", "TypicalP": "TypicalLogitsWarper"}
    assert [hf_names[type(p).__name__] for p in ours] == [type(p).__name__ for p in theirs]


def test_neutral_settings_add_no_processors():
    assert sampling_processors(torch.ones(1, 3, dtype=torch.long)) == []


def test_tiny_temperature_equals_greedy(tiny_model):
    ids = prompt(tiny_model.config.vocab_size)
    greedy = generate(tiny_model, ids, max_new_tokens=12).sequences
    assert torch.equal(sample(tiny_model, ids, max_new_tokens=12, temperature=1e-3, seed=0).sequences, greedy)


def test_sample_select_follows_the_distribution():
    scores = torch.tensor([0.7, 0.2, 0.1, 0.0]).log().expand(4000, 4)
    torch.manual_seed(0)
    counts = torch.bincount(sample_select(scores), minlength=4) / 4000
    torch.testing.assert_close(counts, torch.tensor([0.7, 0.2, 0.1, 0.0]), atol=0.03, rtol=0)
    assert counts[3] == 0  # a filtered token (-inf, probability 0) is never drawn


def test_next_token_probs_and_kept_counter(tiny_gpt2):
    ids = prompt(tiny_gpt2.config.vocab_size, batch=2)
    counter = KeptCounter()
    probs = next_token_probs(tiny_gpt2, ids, processors=[TopK(5), counter])
    torch.testing.assert_close(probs.sum(-1), torch.ones(2))
    assert (probs > 0).sum(-1).tolist() == [5, 5] and counter.counts[0].tolist() == [5, 5]


def test_bad_controls_raise(tiny_gpt2):
    ids = prompt(tiny_gpt2.config.vocab_size)
    with pytest.raises(ValueError, match="temperature=0"):
        sample(tiny_gpt2, ids, max_new_tokens=4, temperature=0).sequences
    with pytest.raises(ValueError, match="top_p=1.5"):
        sample(tiny_gpt2, ids, max_new_tokens=4, top_p=1.5).sequences


def test_playground_static_output_is_the_seeded_sample(tiny_gpt2, capsys, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    from course_lib.widgets import playground

    monkeypatch.setenv("COURSE_STATIC", "1")

    class CharTokenizer:  # ids 1..96 as printable characters, 0 the start token: enough for the tiny model
        bos_token_id = 0

        def __call__(self, text):
            return {"input_ids": [ord(c) - 31 for c in text]}

        def decode(self, ids, skip_special_tokens=False):
            return "".join(chr(int(i) + 31) for i in ids if int(i) > 0)

    tokenizer = CharTokenizer()
    playground(tiny_gpt2, tokenizer, "Hello", temperature=1.5, top_k=8, seed=4, max_new_tokens=6)
    printed = capsys.readouterr().out
    prompt = torch.tensor([[0] + tokenizer("Hello")["input_ids"]])  # (1, 6): the start token first, as every prompt
    expected = sample(tiny_gpt2, prompt, max_new_tokens=6, temperature=1.5, top_k=8, seed=4).sequences
    assert "T=1.50 top_k=8" in printed and tokenizer.decode(expected[0]) in printed
