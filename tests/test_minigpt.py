"""The from-scratch GPT-2 gives the transformers model's logits and tokens, with and without a KV cache."""
import pytest
import torch

from tiny_models import make_tiny_model
from course_lib.minigpt import GPTConfig, MiniGPT, decode_step, generate, new_cache, prefill


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
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-4, rtol=1e-4)


def test_logits_match_transformers_with_left_padding(tiny_pair):
    hf, ours = tiny_pair
    ids, mask = random_ids(97, (2, 10)), torch.ones(2, 10, dtype=torch.long)
    mask[0, :4] = 0
    # transformers' generate derives positions from the mask; pass the same to its forward
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = hf(ids, attention_mask=mask, position_ids=positions).logits
        got = ours(ids, attention_mask=mask)
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-4, rtol=1e-4)


def test_prefill_then_decode_steps_match_full_forward(tiny_pair):
    _, ours = tiny_pair
    ids = random_ids(97, (2, 9))
    full = ours(ids)  # (B, T, vocab) without a cache
    for kind in ("dynamic", "static"):
        cache = new_cache(ours, kind, batch=2, max_len=16)
        steps = [prefill(ours, ids[:, :5], cache)]
        steps += [decode_step(ours, ids[:, t : t + 1], cache) for t in range(5, 9)]
        torch.testing.assert_close(torch.stack(steps, dim=1), full[:, 4:], atol=1e-5, rtol=1e-5)
        assert cache.length == 9


@pytest.mark.parametrize("cache", ["dynamic", "static", None])
def test_greedy_tokens_equal_transformers_generate(tiny_pair, cache):
    hf, ours = tiny_pair
    ids = random_ids(97, (3, 7), seed=1)
    assert torch.equal(generate(ours, ids, 20, cache=cache), hf_greedy(hf, ids, 20))


@pytest.mark.parametrize("cache", ["dynamic", "static", None])
def test_left_padded_rows_get_their_unpadded_tokens(tiny_pair, cache):
    hf, ours = tiny_pair
    ids, mask = random_ids(97, (2, 8), seed=2), torch.ones(2, 8, dtype=torch.long)
    mask[1, :3] = 0
    ids[1, :3] = 0
    out = generate(ours, ids, 12, cache=cache, attention_mask=mask)
    assert torch.equal(out, hf_greedy(hf, ids, 12, mask))
    alone = generate(ours, ids[1:, 3:], 12, cache=cache)  # row 1 without its padding
    assert torch.equal(out[1, 8:], alone[0, 5:])


def test_from_pretrained_folder_loads_the_same_weights(tiny_pair, tmp_path):
    hf, ours = tiny_pair
    hf.save_pretrained(tmp_path)
    loaded = MiniGPT.from_pretrained(tmp_path)
    ids = random_ids(97, (1, 6))
    torch.testing.assert_close(loaded(ids), ours(ids))
    assert loaded.wte.weight is not ours.wte.weight


def test_storyteller_matches_transformers(storyteller):
    hf, tokenizer = storyteller
    ours = MiniGPT.from_hf(hf)
    ids = tokenizer(["Once upon a time there was a little dog"], return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-4, rtol=1e-4)
    expected = hf_greedy(hf, ids, 24)
    for cache in ("dynamic", "static", None):
        assert torch.equal(generate(ours, ids, 24, cache=cache), expected)


def test_bad_input_is_refused(tiny_pair, tiny_llama):
    _, ours = tiny_pair
    ids = random_ids(97, (1, 5))
    with pytest.raises(ValueError, match="batch, tokens"):
        ours(ids[0])
    with pytest.raises(ValueError, match="context window of 128"):
        generate(ours, ids, 124)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(ours, ids, 0)
    with pytest.raises(ValueError, match="attention_mask"):
        ours(ids, attention_mask=torch.ones(1, 4))
    with pytest.raises(ValueError, match="cache kind"):
        new_cache(ours, "paged")
    with pytest.raises(ValueError, match="GPT-2 models only"):
        MiniGPT.from_hf(tiny_llama)
    with pytest.raises(ValueError, match="activation"):
        GPTConfig.from_dict(dict(n_layer=1, n_head=1, n_embd=4, n_positions=8, vocab_size=5,
                                 activation_function="relu"))
