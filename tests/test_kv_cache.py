"""Dynamic and static caches agree, crop/clone behave, and the memory formula equals the measured bytes."""
import pytest
import torch

from tiny_models import make_tiny_model
from course_lib.kv_cache import DynamicKVCache, StaticKVCache, kv_cache_bytes, measured_bytes
from course_lib.minigpt import MiniGPT, decode_step, generate, new_cache, prefill


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
    torch.testing.assert_close(prefill(model, ids[:, :4], dynamic), prefill(model, ids[:, :4], static))
    for t in range(4, 12):
        torch.testing.assert_close(decode_step(model, ids[:, t : t + 1], dynamic),
                                   decode_step(model, ids[:, t : t + 1], static), atol=1e-6, rtol=1e-6)
    assert dynamic.length == static.length == 12


@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_crop_forgets_tokens_like_a_fresh_cache(tiny, kind):
    _, model = tiny
    ids, other = ids_of((1, 10)), ids_of((1, 3), seed=5)
    cache = new_cache(model, kind, max_len=16)
    prefill(model, ids, cache)
    cache.crop(7)  # drop the last 3 tokens, then continue differently
    got = prefill(model, other, cache)
    expected = prefill(model, torch.cat([ids[:, :7], other], dim=1), new_cache(model, kind, max_len=16))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_clone_is_independent(tiny, kind):
    _, model = tiny
    cache = new_cache(model, kind, max_len=16)
    prefill(model, ids_of((1, 5)), cache)
    before = cache.keys[0].clone()
    copy = cache.clone()
    decode_step(model, ids_of((1, 1), seed=3), copy)
    assert (cache.length, copy.length) == (5, 6)
    assert torch.equal(cache.keys[0], before)


def test_formula_equals_measured_bytes(tiny):
    _, model = tiny
    cfg = model.config
    for batch, prompt, new in [(1, 1, 1), (3, 12, 6), (4, 30, 11)]:
        dynamic = new_cache(model, "dynamic")
        generate(model, ids_of((batch, prompt)), new, cache=dynamic)
        assert dynamic.length == prompt + new - 1  # the last new token is never fed back
        expected = kv_cache_bytes(cfg.n_layer, cfg.n_head, cfg.head_dim, dynamic.length, batch, 4)
        assert measured_bytes(dynamic) == expected
    static = new_cache(model, "static", batch=2, max_len=50)
    prefill(model, ids_of((2, 3)), static)  # a static cache holds max_len slots however few are used
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
    cache = new_cache(model, "static", max_len=6)
    with pytest.raises(ValueError, match="full"):
        prefill(model, ids_of((1, 7)), cache)
