"""Stopping criteria: EOS per row, max_new_tokens, stop strings, time limits, user-defined criteria, and the
errors for bad ones; where transformers has the same feature, the tokens must match ``model.generate``."""

from __future__ import annotations

import pytest
import torch
from transformers import StoppingCriteriaList

from course_lib.decoding import EosStop, MaxNewTokens, StopStrings, TimeLimit, generate, greedy_search
from course_lib.decoding.stopping import any_stop
from course_lib.models import load_tokenizer
from tiny_models import make_tiny_model

PAD = 1


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="module")
def wide_gpt2():
    """A tiny random GPT-2 with the course tokenizer's vocabulary, so its ids decode to text."""
    return make_tiny_model("gpt2", vocab_size=4096)


def test_eos_stop_judges_each_row_on_its_newest_token():
    ids = torch.tensor([[5, 7], [7, 5], [5, 9]])
    assert EosStop(7)(ids).tolist() == [True, False, False]
    assert EosStop([7, 9])(ids).tolist() == [True, False, True]


def test_max_new_tokens_counts_only_new_tokens():
    stop = MaxNewTokens(prompt_len=3, max_new_tokens=2)
    assert stop(torch.zeros(2, 4, dtype=torch.long)).tolist() == [False, False]
    assert stop(torch.zeros(2, 5, dtype=torch.long)).tolist() == [True, True]


def test_rows_finish_at_different_steps_and_match_generate(tiny_llama):
    prompt = torch.tensor([[0, 0, 11, 12], [21, 22, 23, 24]])
    mask = (prompt != 0).long()
    free = greedy_search(tiny_llama, prompt, mask, max_new_tokens=8, eos_token_id=[]).sequences
    eos = int(free[0, 5])  # row 0 produces this token as its second new token
    ours = greedy_search(tiny_llama, prompt, mask, max_new_tokens=8, eos_token_id=eos, pad_token_id=PAD).sequences
    theirs = tiny_llama.generate(prompt, attention_mask=mask, max_new_tokens=8, do_sample=False, eos_token_id=eos,
                                 pad_token_id=PAD)
    assert torch.equal(ours, theirs)
    ended = (ours[:, 4:] == eos).int().argmax(-1)
    assert ours[0, 6:].eq(PAD).all() and ended[0] == 1  # row 0 ended at step 2 and was padded since
    assert not ours[1, 4:].eq(eos).any() or ended[1] != 1  # row 1 did not end at the same step


def test_max_new_tokens_zero_returns_the_prompt(tiny_gpt2):
    prompt = torch.tensor([[5, 6, 7]])
    assert torch.equal(generate(tiny_gpt2, prompt, max_new_tokens=0).sequences, prompt)


def test_user_criterion_one_bool_per_row_matches_generate(tiny_gpt2):
    prompt = torch.tensor([[0, 11, 12], [21, 22, 23]])
    mask = (prompt != 0).long()
    free = greedy_search(tiny_gpt2, prompt, mask, max_new_tokens=6, eos_token_id=[]).sequences
    target = int(free[1, 4])  # "stop once this token appears", true for row 1 after two tokens

    def saw_target(input_ids, scores):
        return (input_ids[:, 3:] == target).any(dim=-1)

    kw = dict(max_new_tokens=6, eos_token_id=97 - 1, pad_token_id=PAD)
    ours = greedy_search(tiny_gpt2, prompt, mask, stopping=[saw_target], **kw).sequences
    theirs = tiny_gpt2.generate(prompt, attention_mask=mask, do_sample=False,
                                stopping_criteria=StoppingCriteriaList([saw_target]), **kw)
    assert torch.equal(ours, theirs)
    assert ours[1, -1] == PAD  # row 1 stopped early, and kept being padded


def test_a_criterion_with_the_wrong_shape_is_refused():
    with pytest.raises(ValueError, match="one bool per sequence"):
        any_stop([lambda ids, scores: torch.tensor(True)], torch.zeros(3, 2, dtype=torch.long), None)


def test_time_limit_stops_every_row_once_time_is_up(tiny_gpt2):
    fresh = TimeLimit(60.0)
    assert fresh(torch.zeros(2, 3, dtype=torch.long)).tolist() == [False, False]
    expired = TimeLimit(0.5)
    expired.start -= 1.0  # as if the limit had been set one second ago
    assert expired(torch.zeros(2, 3, dtype=torch.long)).tolist() == [True, True]
    out = greedy_search(tiny_gpt2, torch.tensor([[5, 6]]), max_new_tokens=20, stopping=[expired], eos_token_id=[]).sequences
    assert out.shape == (1, 3)  # checked after each token: exactly one token got through


def test_stop_strings_match_only_when_the_newest_token_completes_them(tokenizer):
    ids = tokenizer(["The dog ran. The end"], return_tensors="pt").input_ids
    stop = StopStrings(tokenizer, ["The end", "xyz"])
    assert stop(ids).tolist() == [True]
    assert stop(ids[:, :-1]).tolist() == [False]  # "The" alone is not "The end"
    prompt_only = StopStrings(tokenizer, ["dog"])
    assert prompt_only(ids).tolist() == [False]  # "dog" is earlier in the text: it ended nothing now
    overhang = StopStrings(tokenizer, ["e en"])  # ends in the middle of the newest token " end"
    assert overhang(ids).tolist() == [True]


def test_stop_strings_match_generate(wide_gpt2, tokenizer):
    batch = tokenizer(["Once upon a time", "The cat sat on the"], return_tensors="pt", padding=True)
    ids, mask = batch.input_ids, batch.attention_mask
    free = greedy_search(wide_gpt2, ids, mask, max_new_tokens=10, eos_token_id=[]).sequences
    text = tokenizer.decode(free[0, ids.shape[1] + 2: ids.shape[1] + 5])
    stop_string = text[1:-1] if len(text) > 3 else text  # spans token boundaries, with overhangs
    kw = dict(max_new_tokens=10, eos_token_id=tokenizer.eos_token_id, pad_token_id=PAD)
    ours = greedy_search(wide_gpt2, ids, mask, stopping=[StopStrings(tokenizer, stop_string)], **kw).sequences
    theirs = wide_gpt2.generate(ids, attention_mask=mask, do_sample=False, stop_strings=stop_string,
                                tokenizer=tokenizer, **kw)
    assert torch.equal(ours, theirs)
    assert ours[0, -1] == PAD  # the stop string did stop row 0 early


@pytest.mark.parametrize("make, message", [
    (lambda tok: StopStrings(tok, ""), "non-empty"),
    (lambda tok: StopStrings(tok, ["ok", ""]), "non-empty"),
    (lambda tok: StopStrings(tok, []), "at least one"),
    (lambda tok: TimeLimit(0), "seconds must be a number > 0"),
    (lambda tok: EosStop([]), "at least one"),
    (lambda tok: MaxNewTokens(3, -1), "max_new_tokens"),
])
def test_bad_criteria_are_refused(tokenizer, make, message):
    with pytest.raises(ValueError, match=message):
        make(tokenizer)


def test_negative_max_new_tokens_is_refused(tiny_gpt2):
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(tiny_gpt2, torch.tensor([[5, 6]]), max_new_tokens=-1).sequences
