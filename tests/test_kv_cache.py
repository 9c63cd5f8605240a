"""Dynamic and static caches agree, crop/clone behave, and the memory formula equals the measured bytes."""
import pytest
import torch

from tiny_models import make_tiny_model
from course_lib.kv_cache import DynamicKVCache, StaticKVCache, kv_cache_bytes, measured_bytes
from course_lib.decoding import decode_step, greedy_no_sync, new_cache, prefill
from course_lib.minigpt import MiniGPT


@pytest.fixture(scope="module")
def tiny():
    hf = make_tiny_model("gpt2")
    return hf, MiniGPT.from_hf(hf)


def ids_of(shape, seed=0):
    return torch.randint(1, 97, shape, generator=torch.Generator().manual_seed(seed))


def test_dynamic_and_static_give_the_same_logits_every_step(tiny):
    _, model = tiny
    ids = ids_of((2, 12))
    dynamic, static = new_cache(model, "dynamic"), new_cache(model, "static", batch=2, max_len=12)
    torch.testing.assert_close(prefill(model, ids[:, :4], cache=dynamic), prefill(model, ids[:, :4], cache=static))
    for t in range(4, 12):
        torch.testing.assert_close(decode_step(model, ids[:, t : t + 1], cache=dynamic),
                                   decode_step(model, ids[:, t : t + 1], cache=static), atol=1e-6, rtol=1e-6)
    assert dynamic.get_seq_length() == static.get_seq_length() == 12


@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_crop_forgets_tokens_like_a_fresh_cache(tiny, kind):
    _, model = tiny
    ids, other = ids_of((1, 10)), ids_of((1, 3), seed=5)
    expected = prefill(model, torch.cat([ids[:, :7], other], dim=1), cache=new_cache(model, kind, max_len=16))
    for crop in (7, -3):  # keep the first 7 tokens, or (transformers' convention) drop the last 3
        cache = new_cache(model, kind, max_len=16)
        prefill(model, ids, cache=cache)
        cache.crop(crop)
        assert cache.get_seq_length() == 7
        got = prefill(model, other, cache=cache)  # continue differently
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_reorder_cache_selects_and_repeats_rows(tiny, kind):
    _, model = tiny
    ids, nxt = ids_of((3, 6)), ids_of((3, 1), seed=7)
    cache = new_cache(model, kind, batch=3, max_len=8)
    prefill(model, ids, cache=cache)
    rows = torch.tensor([2, 2, 0, 1])  # a new batch: row 2 twice, then rows 0 and 1
    cache.reorder_cache(rows)
    got = decode_step(model, nxt[rows], cache=cache)  # (4, vocab)
    fresh = new_cache(model, kind, batch=4, max_len=8)
    prefill(model, ids[rows], cache=fresh)
    torch.testing.assert_close(got, decode_step(model, nxt[rows], cache=fresh), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_clone_is_independent(tiny, kind):
    _, model = tiny
    cache = new_cache(model, kind, max_len=16)
    prefill(model, ids_of((1, 5)), cache=cache)
    before = cache.keys[0].clone()
    copy = cache.clone()
    decode_step(model, ids_of((1, 1), seed=3), cache=copy)
    assert (cache.get_seq_length(), copy.get_seq_length()) == (5, 6)
    assert torch.equal(cache.keys[0], before)


def test_formula_equals_measured_bytes(tiny):
    _, model = tiny
    cfg = model.config
    for batch, prompt, new in [(1, 1, 1), (3, 12, 6), (4, 30, 11)]:
        dynamic = new_cache(model, "dynamic")
        greedy_no_sync(model, ids_of((batch, prompt)), max_new_tokens=new, cache=dynamic)
        assert dynamic.get_seq_length() == prompt + new - 1  # the last new token is never fed back
        expected = kv_cache_bytes(cfg.n_layer, cfg.n_head, cfg.head_dim, dynamic.get_seq_length(), batch, 4)
        assert measured_bytes(dynamic) == expected
    static = new_cache(model, "static", batch=2, max_len=50)
    prefill(model, ids_of((2, 3)), cache=static)  # a static cache holds max_len slots however few are used
    assert measured_bytes(static) == kv_cache_bytes(cfg.n_layer, cfg.n_head, cfg.head_dim, 50, 2, 4)


def test_formula_equals_transformers_dynamic_cache(tiny):
    from transformers import DynamicCache

    hf, model = tiny
    cfg = model.config
    cache = DynamicCache(config=hf.config)
    with torch.no_grad():
        hf(ids_of((2, 11)), cache=cache, use_cache=True)
    assert measured_bytes(cache) == kv_cache_bytes(cfg.n_layer, cfg.n_head, cfg.head_dim, 11, 2, 4)


def test_formula_scales_with_bytes_per_value():
    assert kv_cache_bytes(6, 6, 32, 256, 1, 4) == 2 * 6 * 6 * 32 * 256 * 4
    assert kv_cache_bytes(6, 6, 32, 256, 8, 2) == 4 * kv_cache_bytes(6, 6, 32, 256, 1, 4)


def test_bad_input_is_refused(tiny):
    _, model = tiny
    with pytest.raises(ValueError, match="tokens"):
        kv_cache_bytes(2, 4, 8, -1)
    with pytest.raises(ValueError, match="n_layers"):
        kv_cache_bytes(0, 4, 8, 10)
    with pytest.raises(ValueError, match="n_layers"):
        DynamicKVCache(0)
    with pytest.raises(TypeError, match="cannot measure"):
        measured_bytes(object())
    static = StaticKVCache(n_layers=2, batch=1, n_heads=4, head_dim=8, max_len=4)
    with pytest.raises(ValueError, match="full"):
        static.update(0, torch.zeros(1, 4, 5, 8), torch.zeros(1, 4, 5, 8))
    with pytest.raises(ValueError, match="do not fit"):
        static.update(0, torch.zeros(2, 4, 1, 8), torch.zeros(2, 4, 1, 8))
    with pytest.raises(ValueError, match="keys and values"):
        static.update(0, torch.zeros(1, 4, 1, 8), torch.zeros(1, 4, 2, 8))
    with pytest.raises(ValueError, match="crop"):
        static.crop(1)
    with pytest.raises(ValueError, match="crop"):
        static.crop(-1)
    cache = new_cache(model, "static", max_len=6)
    with pytest.raises(ValueError, match="full"):
        prefill(model, ids_of((1, 7)), cache=cache)
