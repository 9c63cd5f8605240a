"""Serving: the paged KV cache's bookkeeping, the ragged step, and the three scheduling policies, whose outputs
must be every request's own greedy tokens."""
from __future__ import annotations

import pytest
import torch

from course_lib.fastpath import fast_greedy, lean_weights
from course_lib.minigpt import MiniGPT
from course_lib.paged_kv import CacheFullError, PagedKVCache
from course_lib.serving import Request, ServeResult, admit, make_workload, ragged_batch, ragged_forward, serve
from tiny_models import make_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def mini():
    return MiniGPT.from_hf(make_tiny_model("gpt2"))


@pytest.fixture(scope="module")
def requests_():
    # 10 requests, prompts of 1-7 tokens, outputs of 1-30 tokens: several blocks each, uneven finishes
    gen = torch.Generator().manual_seed(0)
    return [Request(i, tuple(torch.randint(1, 97, (1 + i % 7,), generator=gen).tolist()), 1 + (7 * i) % 30)
            for i in range(10)]


def alone(mini, r: Request) -> list[int]:
    return fast_greedy(mini, torch.tensor([r.prompt]), max_new_tokens=r.max_new_tokens).sequences[0, len(r.prompt):].tolist()


# ----------------------------------------------------------------------------- the paged cache


def test_blocks_are_taken_as_a_sequence_grows_and_returned_when_it_ends():
    cache = PagedKVCache(n_layers=2, n_heads=2, head_dim=4, num_blocks=4, block_size=4)
    cache.add(1)
    assert cache.append(1, 3).tolist() == [0, 1, 2] and cache.block_tables[1] == [0]
    cache.add(2)
    assert cache.append(2, 5).tolist() == [4, 5, 6, 7, 8] and cache.block_tables[2] == [1, 2]
    assert cache.append(1, 2).tolist() == [3, 12]  # fills block 0, then takes the last free block (3)
    assert cache.context_slots(1).tolist() == [0, 1, 2, 3, 12]
    assert cache.used_bytes == 4 * cache.block_bytes == 4 * 2 * (2 * 4 * 2 * 4 * 4)  # K+V x layers x slots x heads x hd x 4 B
    with pytest.raises(CacheFullError, match="sequence 2 needs 1 more blocks, 0 are free"):
        cache.append(2, 4)
    cache.free(1)
    assert sorted(cache.free_blocks) == [0, 3] and 1 not in cache.lengths
    cache.add(3)
    assert cache.append(3, 1).tolist() == [0]  # a freed block is reused
    assert cache.blocks_needed(None, 9) == 3 and cache.blocks_needed(3, 3) == 0 and cache.blocks_needed(3, 4) == 1


def test_paged_cache_refuses_bad_sizes_and_twice_added_sequences():
    with pytest.raises(ValueError, match="block_size=0 is not allowed; block_size must be an integer >= 1"):
        PagedKVCache(1, 1, 4, num_blocks=2, block_size=0)
    cache = PagedKVCache(1, 1, 4, num_blocks=2)
    cache.add(0)
    with pytest.raises(ValueError, match="sequence 0 is already in the cache"):
        cache.add(0)


def test_a_ragged_batch_gives_each_sequence_its_own_next_token(mini, requests_):
    """A prompt that starts and two running sequences in one forward: each gets what it would get alone."""
    w = lean_weights(mini)
    cache = PagedKVCache(2, 4, 8, num_blocks=16, block_size=4)
    first, second, third = requests_[2], requests_[5], requests_[6]
    for r in (first, second, third):
        cache.add(r.id)
    ragged_forward(w, cache, ragged_batch(cache, [(first.id, list(first.prompt)), (second.id, list(second.prompt))]))
    step = [(first.id, [alone(mini, first)[0]]), (third.id, list(third.prompt)), (second.id, [alone(mini, second)[0]])]
    got = ragged_forward(w, cache, ragged_batch(cache, step)).tolist()
    assert got == [alone(mini, first)[1], alone(mini, third)[0], alone(mini, second)[1]]


# ----------------------------------------------------------------------------- the policies


@pytest.mark.parametrize("policy", ["one-at-a-time", "static", "continuous"])
def test_every_policy_gives_every_request_its_own_greedy_tokens(mini, requests_, policy):
    result = serve(mini, requests_, max_batch=4, policy=policy, block_size=4)
    assert result.outputs == {r.id: alone(mini, r) for r in requests_}
    assert result.new_tokens == sum(r.max_new_tokens for r in requests_)
    assert set(result.finish_s) == {r.id for r in requests_} and result.seconds >= max(result.finish_s.values())


def test_continuous_batching_fills_a_free_place_at_the_next_step_and_static_waits(mini, requests_):
    steps_of = {r.id: r.max_new_tokens for r in requests_}
    continuous = serve(mini, requests_, max_batch=4, policy="continuous", block_size=4)
    static = serve(mini, requests_, max_batch=4, policy="static", block_size=4)
    admitted = 0
    for step, places in enumerate(continuous.occupancy):
        running = [r for r in places if r is not None]
        admitted = max(admitted, max(running) + 1)
        assert len(running) == 4 or admitted == len(requests_), f"an idle place at step {step} while requests wait"
    for step, places in enumerate(static.occupancy[1:], 1):  # new requests start only when the whole batch is done
        before = set(static.occupancy[step - 1]) - {None}
        if set(places) - before - {None}:
            assert not before & set(places), f"static batching let a request start beside older ones at step {step}"
    assert len(continuous.occupancy) < len(static.occupancy) < sum(steps_of.values())
    one = serve(mini, requests_, max_batch=4, policy="one-at-a-time")
    assert len(one.occupancy) == sum(steps_of.values()) and all(len(p) == 1 for p in one.occupancy)


def test_a_static_batch_computes_padding_and_returns_when_its_slowest_request_is_done(mini, requests_):
    static = serve(mini, requests_, max_batch=4, policy="static", block_size=4)
    batches = [requests_[i : i + 4] for i in range(0, len(requests_), 4)]
    step = 0
    for batch in batches:
        slowest = max(r.max_new_tokens for r in batch)
        assert len({static.finish_s[r.id] for r in batch}) == 1, "a static batch returns all at once"
        for r in batch:  # a request makes tokens for its own steps, then its place idles (computing padding)
            made = [r.id in places for places in static.occupancy[step : step + slowest]]
            assert made == [True] * r.max_new_tokens + [False] * (slowest - r.max_new_tokens)
        held = static.kv_bytes[step : step + slowest]
        assert held == sorted(held), "padding rows keep their blocks (and grow) until the batch ends"
        step += slowest
    assert step == len(static.occupancy)


def test_paged_memory_follows_the_tokens_held(mini, requests_):
    result = serve(mini, requests_, max_batch=4, policy="continuous", block_size=4)
    block = PagedKVCache(2, 4, 8, num_blocks=1, block_size=4).block_bytes
    produced = {r.id: 0 for r in requests_}
    for places, used in zip(result.occupancy, result.kv_bytes):
        held = 0
        for r in requests_:
            if r.id in places:
                produced[r.id] += 1
                tokens = len(r.prompt) + produced[r.id] - 1  # the last token's key is written at the next step
                held += -(-tokens // 4)
        assert used == held * block


def test_admission_plan_first_come_lowest_place_and_static_waits_for_an_empty_batch():
    waiting = [10, 11, 12]
    assert admit([None, 7, None, None], waiting, "continuous") == [(0, 10), (2, 11), (3, 12)]
    assert admit([None, None], waiting, "continuous") == [(0, 10), (1, 11)]  # more requests than places
    assert admit([5, None, None], waiting, "static") == []  # a batch starts together
    assert admit([None, None], waiting, "static") == [(0, 10), (1, 11)]
    assert admit([None], [], "continuous") == [] and waiting == [10, 11, 12]  # a plan: nothing is taken
    with pytest.raises(ValueError, match="policy='lifo' is not allowed"):
        admit([None], waiting, "lifo")


def test_token_times_give_ttft_and_tpot(mini, requests_):
    one = serve(mini, requests_, max_batch=4, policy="one-at-a-time")
    continuous = serve(mini, requests_, max_batch=4, policy="continuous", block_size=4)
    for run in (one, continuous):
        for r in requests_:
            assert 0 < run.first_token_s[r.id] <= run.last_token_s[r.id] <= run.finish_s[r.id]
        assert run.mean_tpot_s > 0
    order = sorted(requests_, key=lambda r: r.id)  # one at a time: a request starts after the previous has ended
    assert all(one.first_token_s[b.id] > one.last_token_s[a.id] for a, b in zip(order, order[1:]))
    # continuous batching starts every request of the first batch at step 1: their first tokens come together
    first = [continuous.first_token_s[r.id] for r in order[:4]]
    assert len(set(first)) == 1 and continuous.mean_ttft_s < one.mean_ttft_s
    with pytest.raises(ValueError, match="recorded no token times"):
        ServeResult("x", 1, {0: [1]}, {0: 1.0}, 1.0).mean_ttft_s


def test_latency_figures():
    result = ServeResult("static", 2, {i: [0] * 3 for i in range(20)}, {i: float(i + 1) for i in range(20)}, 20.0)
    assert result.mean_latency_s == 10.5 and result.p95_latency_s == 19.0 and result.tokens_per_s == 3.0


def test_workload_is_seeded_and_mixed(storyteller):
    _, tokenizer = storyteller
    first, again = make_workload(tokenizer, n=64, seed=3), make_workload(tokenizer, n=64, seed=3)
    assert first == again and first != make_workload(tokenizer, n=64, seed=4)
    lengths = [r.max_new_tokens for r in first]
    assert min(lengths) >= 8 and max(lengths) <= 200 and max(lengths) - min(lengths) > 150
    assert all(r.prompt[0] == tokenizer.bos_token_id for r in first)
    assert len({len(r.prompt) for r in first}) > 10


def test_bad_settings_get_clear_errors(mini, requests_):
    with pytest.raises(ValueError, match="policy='fifo' is not allowed; policy must be one of"):
        serve(mini, requests_, max_batch=2, policy="fifo")
    with pytest.raises(ValueError, match="max_batch=0 is not allowed"):
        serve(mini, requests_, max_batch=0)
    with pytest.raises(CacheFullError):
        serve(mini, requests_, max_batch=4, block_size=4, num_blocks=3)


def test_the_scheduler_alone_takes_the_same_steps_as_a_real_run(mini, requests_):
    for policy in ("static", "continuous"):
        real = serve(mini, requests_, max_batch=4, policy=policy, block_size=4)
        dry = serve(None, requests_, max_batch=4, policy=policy)
        assert dry.occupancy == real.occupancy and set(dry.kv_bytes) == {0}
        assert {i: len(out) for i, out in dry.outputs.items()} == {i: len(out) for i, out in real.outputs.items()}
