"""The from-scratch GPT-2 gives the transformers model's logits and tokens, with and without a KV cache."""
import pytest
import torch

from tiny_models import make_tiny_model
from course_lib.decoding import decode_step, greedy_no_sync, greedy_search, greedy_without_cache, new_cache, prefill
from course_lib.minigpt import GPTConfig, MiniGPT


@pytest.fixture(scope="module")
def tiny_pair():
    hf = make_tiny_model("gpt2")
    return hf, MiniGPT.from_hf(hf)


def hf_greedy(hf, ids, n, attention_mask=None):
    """transformers' greedy generate of exactly n tokens (EOS disabled, as in the course's own loop)."""
    eos, hf.generation_config.eos_token_id = hf.generation_config.eos_token_id, None
    try:
        mask = torch.ones_like(ids) if attention_mask is None else attention_mask
        return hf.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False)
    finally:
        hf.generation_config.eos_token_id = eos


def random_ids(vocab, shape, seed=0):
    return torch.randint(1, vocab, shape, generator=torch.Generator().manual_seed(seed))


def test_logits_match_transformers(tiny_pair):
    hf, ours = tiny_pair
    ids = random_ids(97, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf(ids).logits, atol=1e-4, rtol=1e-4)


def test_hidden_states_and_last_logits_match_transformers(tiny_pair):
    hf, ours = tiny_pair
    ids = random_ids(97, (2, 7))
    with torch.no_grad():
        expected = hf(ids, output_hidden_states=True)
        got = ours(ids, output_hidden_states=True, logits_to_keep=1)
    assert len(got.hidden_states) == len(expected.hidden_states) == hf.config.n_layer + 1
    for g, e in zip(got.hidden_states, expected.hidden_states):
        torch.testing.assert_close(g, e, atol=1e-4, rtol=1e-4)
    assert got.logits.shape == (2, 1, 97)
    torch.testing.assert_close(got.logits, expected.logits[:, -1:], atol=1e-4, rtol=1e-4)
    assert ours(ids).hidden_states is None


def test_logits_match_transformers_with_left_padding(tiny_pair):
    hf, ours = tiny_pair
    ids, mask = random_ids(97, (2, 10)), torch.ones(2, 10, dtype=torch.long)
    mask[0, :4] = 0
    # transformers' generate derives positions from the mask; pass the same to its forward
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = hf(ids, attention_mask=mask, position_ids=positions).logits
        got = ours(ids, attention_mask=mask).logits
        given = ours(ids, attention_mask=mask, position_ids=positions).logits  # the positions the loop passes
    torch.testing.assert_close(given, got)
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-4, rtol=1e-4)


def test_prefill_then_decode_steps_match_full_forward(tiny_pair):
    _, ours = tiny_pair
    ids = random_ids(97, (2, 9))
    full = ours(ids).logits  # (B, T, vocab) without a cache
    for kind in ("dynamic", "static"):
        cache = new_cache(ours, kind, batch=2, max_len=16)
        steps = [prefill(ours, ids[:, :5], cache=cache)]
        steps += [decode_step(ours, ids[:, t : t + 1], cache=cache) for t in range(5, 9)]
        torch.testing.assert_close(torch.stack(steps, dim=1), full[:, 4:], atol=1e-5, rtol=1e-5)
        assert cache.get_seq_length() == 9


def greedy(model, ids, n, cache, attention_mask=None):
    """The no-sync loop with a "dynamic" or "static" cache, or (None) the uncached baseline."""
    if cache is None:
        return greedy_without_cache(model, ids, attention_mask, max_new_tokens=n).sequences
    return greedy_no_sync(model, ids, attention_mask, max_new_tokens=n, cache=cache).sequences


@pytest.mark.parametrize("cache", ["dynamic", "static", None])
def test_greedy_tokens_equal_transformers_generate(tiny_pair, cache):
    hf, ours = tiny_pair
    ids = random_ids(97, (3, 7), seed=1)
    assert torch.equal(greedy(ours, ids, 20, cache), hf_greedy(hf, ids, 20))


@pytest.mark.parametrize("cache", ["dynamic", "static", None])
def test_left_padded_rows_get_their_unpadded_tokens(tiny_pair, cache):
    hf, ours = tiny_pair
    ids, mask = random_ids(97, (2, 8), seed=2), torch.ones(2, 8, dtype=torch.long)
    mask[1, :3] = 0
    ids[1, :3] = 0
    out = greedy(ours, ids, 12, cache, attention_mask=mask)
    assert torch.equal(out, hf_greedy(hf, ids, 12, mask))
    alone = greedy(ours, ids[1:, 3:], 12, cache)  # row 1 without its padding
    assert torch.equal(out[1, 8:], alone[0, 5:])


def test_a_prefix_cache_continues_like_the_whole_prompt(tiny_pair):
    _, ours = tiny_pair
    ids = random_ids(97, (1, 10), seed=4)
    prefix = new_cache(ours)
    prefill(ours, ids[:, :6], cache=prefix)
    got = greedy_no_sync(ours, ids[:, 6:], max_new_tokens=8, cache=prefix).sequences  # (1, 4 + 8)
    assert torch.equal(got[:, 4:], greedy(ours, ids, 8, "dynamic")[:, 10:])


def test_from_pretrained_folder_loads_the_same_weights(tiny_pair, tmp_path):
    hf, ours = tiny_pair
    hf.save_pretrained(tmp_path)
    loaded = MiniGPT.from_pretrained(tmp_path)
    ids = random_ids(97, (1, 6))
    torch.testing.assert_close(loaded(ids).logits, ours(ids).logits)
    assert loaded.wte.weight is not ours.wte.weight
    assert loaded.generation_config.eos_token_id == hf.generation_config.eos_token_id


def test_storyteller_matches_transformers(storyteller):
    hf, tokenizer = storyteller
    ours = MiniGPT.from_hf(hf)
    ids = tokenizer(["Once upon a time there was a little dog"], return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf(ids).logits, atol=1e-4, rtol=1e-4)
    expected = hf_greedy(hf, ids, 24)
    for cache in ("dynamic", "static", None):
        assert torch.equal(greedy(ours, ids, 24, cache), expected)
    # the course's full decoder (EOS, processors, stopping) runs on MiniGPT too, with the model's own EOS
    assert torch.equal(greedy_search(ours, ids, max_new_tokens=24).sequences,
                       hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False))


def test_bad_input_is_refused(tiny_pair, tiny_llama):
    _, ours = tiny_pair
    ids = random_ids(97, (1, 5))
    with pytest.raises(ValueError, match="batch, tokens"):
        ours(ids[0])
    with pytest.raises(ValueError, match="context window of 128"):
        greedy_no_sync(ours, ids, max_new_tokens=124)
    with pytest.raises(ValueError, match="max_new_tokens"):
        greedy_no_sync(ours, ids, max_new_tokens=-1)
    with pytest.raises(ValueError, match="attention_mask"):
        ours(ids, attention_mask=torch.ones(1, 4))
    with pytest.raises(ValueError, match="cache kind"):
        new_cache(ours, "paged")
    with pytest.raises(ValueError, match="'static' needs a course model|cache kind 'static'"):
        new_cache(make_tiny_model("gpt2"), "static")
    with pytest.raises(ValueError, match="GPT-2 models only"):
        MiniGPT.from_hf(tiny_llama)
    with pytest.raises(ValueError, match="activation"):
        GPTConfig.from_dict(dict(n_layer=1, n_head=1, n_embd=4, n_positions=8, vocab_size=5,
                                 activation_function="relu"))
