"""The fast path: lean steps on a static cache, several tokens per call, compiled; always transformers' greedy tokens."""
from __future__ import annotations

import pytest
import torch

from course_lib.fastpath import fast_greedy, fast_speculative, lean_forward, lean_weights
from course_lib.kv_cache import StaticKVCache
from course_lib.minigpt import MiniGPT
from course_lib.models import load_model
from tiny_models import make_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    hf = make_tiny_model("gpt2")
    return hf, MiniGPT.from_hf(hf)


def reference(hf, ids, n):
    """transformers' greedy tokens, exactly n of them: with eos_token_id=None generate() knows no EOS, so it
    neither stops at one nor suppresses it (as min_new_tokens would), like the fast path."""
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False, eos_token_id=None)
    assert out.shape[1] == ids.shape[1] + n
    return out


@pytest.mark.parametrize("tokens_per_call", [1, 3, 8])
def test_lean_steps_give_transformers_greedy_tokens(tiny, tokens_per_call):
    hf, mini = tiny
    ids = torch.tensor([[5, 6, 9, 11], [3, 4, 5, 6]])  # two unpadded rows
    out = fast_greedy(mini, ids, max_new_tokens=21, tokens_per_call=tokens_per_call).sequences
    assert torch.equal(out, reference(hf, ids, 21))  # 21 = 1 from the prefill + 20, not a multiple of 3 or 8


def test_storyteller_fast_path_gives_generates_tokens(storyteller):
    hf, tokenizer = storyteller
    ids = tokenizer("Once upon a time, a little fox", return_tensors="pt").input_ids
    out = fast_greedy(MiniGPT.from_hf(hf), ids, max_new_tokens=240, tokens_per_call=8).sequences
    assert torch.equal(out, reference(hf, ids, 240))


def test_compiled_steps_give_the_same_tokens(tiny):
    hf, mini = tiny
    ids = torch.tensor([[5, 6, 9, 11]])
    out = fast_greedy(mini, ids, max_new_tokens=9, compile=True, tokens_per_call=4).sequences
    assert torch.equal(out, reference(hf, ids, 9))


def test_one_step_writes_its_keys_in_place_and_matches_the_model(tiny):
    _, mini = tiny
    w = lean_weights(mini)
    ids = torch.tensor([[5, 6, 9, 11]])
    cache = StaticKVCache(2, 1, 4, 8, max_len=8)
    mini(ids[:, :3], cache=cache)  # the first three tokens, through the model
    keys_before = cache.keys.clone()
    logits = lean_forward(w, cache.keys, cache.values, ids[:, 3:], torch.tensor([3]))  # (1, 1, vocab)
    assert torch.allclose(logits, mini(ids).logits[:, -1:], atol=1e-5)
    assert torch.equal(cache.keys[:, :, :, :3], keys_before[:, :, :, :3])  # the past is not touched
    assert not torch.equal(cache.keys[:, :, :, 3], keys_before[:, :, :, 3])  # slot 3 was written
    assert torch.equal(cache.keys[:, :, :, 4:], keys_before[:, :, :, 4:])


def test_nothing_to_generate_returns_the_prompt(tiny):
    _, mini = tiny
    ids = torch.tensor([[5, 6, 9]])
    assert torch.equal(fast_greedy(mini, ids, max_new_tokens=0).sequences, ids)


def test_bad_input_gets_a_clear_error(tiny):
    hf, mini = tiny
    ids = torch.tensor([[5, 6, 9]])
    with pytest.raises(ValueError, match="tokens_per_call=0 is not allowed; tokens_per_call must be an integer >= 1"):
        fast_greedy(mini, ids, max_new_tokens=4, tokens_per_call=0)
    with pytest.raises(ValueError, match="unpadded prompts"):
        fast_greedy(mini, ids, torch.tensor([[0, 1, 1]]), max_new_tokens=4)
    with pytest.raises(TypeError, match="MiniGPT.from_hf"):
        fast_greedy(hf, ids, max_new_tokens=4)
    with pytest.raises(ValueError, match="tokens_per_call=64"):  # whole calls would run past the context of 128
        fast_greedy(mini, ids, max_new_tokens=100, tokens_per_call=64)


@pytest.fixture(scope="module")
def story_pair(storyteller):
    hf, tokenizer = storyteller
    draft, _ = load_model("draft", device="cpu")
    ids = tokenizer("Once upon a time, a little fox", return_tensors="pt").input_ids
    return hf, MiniGPT.from_hf(hf), MiniGPT.from_hf(draft), ids


@pytest.mark.parametrize("k", [1, 3, 6])
def test_fast_speculative_gives_the_targets_greedy_tokens(story_pair, k):
    hf, target, draft, ids = story_pair
    out = fast_speculative(target, ids, draft=draft, k=k, max_new_tokens=100)
    assert torch.equal(out.sequences, reference(hf, ids, 100))
    assert out.rejected > 0 and out.accepted > 0  # the bundled draft agrees often, not always
    assert out.proposed == k * out.target_calls and out.rejected <= out.target_calls
    assert out.accepted + out.target_calls >= 99  # each round keeps its accepted guesses plus one token of its own


@pytest.mark.parametrize("k", [1, 2, 4])
def test_a_draft_that_always_agrees_is_always_accepted(tiny, k):
    hf, mini = tiny
    ids = torch.tensor([[5, 6, 9, 11]])
    out = fast_speculative(mini, ids, draft=mini, k=k, max_new_tokens=30)
    assert torch.equal(out.sequences, reference(hf, ids, 30))
    assert out.rejected == 0 and out.acceptance_rate == 1.0
    assert out.target_calls == -(-29 // (k + 1))  # k + 1 tokens per round after the prefill's first


def test_fast_speculative_refuses_batches_and_padding(tiny):
    _, mini = tiny
    with pytest.raises(ValueError, match="one unpadded sequence"):
        fast_speculative(mini, torch.tensor([[5, 6], [7, 8]]), draft=mini, max_new_tokens=4)
    with pytest.raises(ValueError, match="k=0 is not allowed"):
        fast_speculative(mini, torch.tensor([[5, 6]]), draft=mini, k=0, max_new_tokens=4)
