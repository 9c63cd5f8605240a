"""Speculative decoding: greedy output equals the target's own, sampling keeps the target's distribution."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from tiny_models import make_tiny_model
from course_lib.decoding import RepetitionPenalty, Temperature, TopK, greedy_search
from course_lib.decoding.speculative import (accept_greedy, accept_sampling, expected_speedup,
                                             expected_tokens_per_step, speculative_generate)
from course_lib.models import load_model

PROMPT = torch.tensor([[5, 17, 33, 2, 60, 61]])


def noisy_copy(model, noise: float, seed: int = 1):
    """A draft that agrees with the target often but not always: the target's weights plus noise."""
    draft = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in draft.parameters():
            if p.dim() > 1:
                p.add_(noise * p.std() * torch.randn(p.shape, generator=gen))
    return draft


@pytest.fixture(scope="module")
def target():
    return make_tiny_model("llama")  # its greedy text varies (tiny GPT-2 repeats one token)


def target_greedy(model, ids, n, **kw):
    return model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0, **kw)


@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("draft_kind", ["noisy", "unrelated", "gpt2", "itself"])
def test_greedy_is_identical_to_target_alone(target, k, draft_kind):
    draft = {"noisy": lambda: noisy_copy(target, 0.3), "unrelated": lambda: make_tiny_model("llama", seed=7),
             "gpt2": lambda: make_tiny_model("gpt2"), "itself": lambda: target}[draft_kind]()
    expected = target_greedy(target, PROMPT, 30, eos_token_id=None)
    out = speculative_generate(target, PROMPT, draft=draft, k=k, max_new_tokens=30, eos_token_id=[])
    assert torch.equal(out.sequences, expected)


def spec(target, draft, n, k, **kw):
    return speculative_generate(target, PROMPT, draft=draft, k=k, max_new_tokens=n, eos_token_id=[], **kw)


def test_greedy_with_processors_and_a_padded_prompt_equals_greedy_search(target):
    processors = [RepetitionPenalty(1.5), TopK(3)]
    draft = noisy_copy(target, 0.3)
    expected = greedy_search(target, PROMPT, max_new_tokens=20, processors=processors, eos_token_id=[]).sequences
    assert torch.equal(spec(target, draft, 20, 3, processors=processors).sequences, expected)
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), PROMPT], dim=1)  # (1, 3 + T): left padding
    mask = (torch.arange(padded.shape[1]) >= 3).long()[None]
    out = speculative_generate(target, padded, mask, draft=draft, k=3, max_new_tokens=20, eos_token_id=[])
    assert torch.equal(out.sequences[:, 3:], spec(target, draft, 20, 3).sequences)


def test_nothing_to_generate_returns_the_prompt(target):
    out = spec(target, target, 0, 3)
    assert torch.equal(out.sequences, PROMPT) and out.target_calls == 0 and out.new_tokens == 0


def test_noisy_draft_exercises_rejection_and_acceptance(target):
    out = spec(target, noisy_copy(target, 0.3), 30, 3)
    assert 0.0 < out.acceptance_rate < 1.0  # both the accept path and the crop-after-reject path ran
    assert out.acceptance_rate == out.accepted / (out.accepted + out.rejected)
    # unjudged guesses after a rejection count as proposed, not as judged
    assert out.kept_fraction == out.accepted / out.proposed < out.acceptance_rate


@pytest.mark.parametrize("k", [2, 4])
def test_bookkeeping_with_a_perfect_draft(target, k):
    out = spec(target, target, 30, k)
    assert out.acceptance_rate == 1.0 == out.kept_fraction and out.accepted == out.proposed
    assert out.rejected == 0
    assert out.target_calls == math.ceil(30 / (k + 1))  # every call yields k accepted + 1 bonus token
    assert out.new_tokens == 30


def test_every_target_call_emits_accepted_plus_one(target):
    out = spec(target, noisy_copy(target, 0.3), 25, 4)
    assert out.new_tokens == 25 == out.accepted + out.target_calls
    assert 0 < out.rejected <= out.target_calls  # at most one rejection per verification step
    assert out.tokens_per_target_call == pytest.approx(25 / out.target_calls)


def test_stops_at_eos_like_generate(target):
    full = target_greedy(target, PROMPT, 30, eos_token_id=None)[0, PROMPT.shape[1]:]
    eos = int(full[10])  # a token that first occurs somewhere inside the continuation
    expected = target_greedy(target, PROMPT, 30, eos_token_id=eos)
    out = speculative_generate(target, PROMPT, draft=noisy_copy(target, 0.3), k=3, max_new_tokens=30,
                               eos_token_id=eos)
    assert torch.equal(out.sequences, expected)
    assert out.sequences[0, -1] == eos


def test_a_stopping_criterion_ends_inside_an_accepted_run(target):
    full = spec(target, target, 30, 5).sequences  # a perfect draft: 6 tokens per verification step
    stop_at = PROMPT.shape[1] + 8  # the 9th new token is the 3rd of the second step's run
    criterion = lambda ids, scores: torch.tensor([ids.shape[1] >= stop_at])  # noqa: E731
    out = spec(target, target, 30, 5, stopping=[criterion])
    assert torch.equal(out.sequences, full[:, :stop_at])


def test_accept_greedy_counts_the_matching_prefix():
    logits = torch.full((2, 4, 5), -1.0)
    logits[0, torch.arange(4), torch.tensor([1, 2, 3, 4])] = 1.0  # target wants 1, 2, 3, then 4
    logits[1, torch.arange(4), torch.tensor([1, 0, 3, 4])] = 1.0
    drafts = torch.tensor([[1, 2, 3], [1, 2, 3]])
    n, nxt = accept_greedy(drafts, logits)
    assert n.tolist() == [3, 1]
    assert nxt.tolist() == [4, 0]  # the bonus token; the correction at the first mismatch


def _emitted(drafts, n, nxt, position):
    """Token at ``position`` of what one step emits (accepted drafts, then the next token)."""
    return torch.where(n > position, drafts[:, min(position, drafts.shape[1] - 1)], nxt)


def _tv(samples: torch.Tensor, probs: torch.Tensor) -> float:
    empirical = torch.bincount(samples, minlength=probs.numel()).float() / samples.numel()
    return 0.5 * float((empirical - probs).abs().sum())


def test_accept_sampling_preserves_the_target_distribution():
    # A "target" whose next-token distribution depends only on the position, so exact marginals are known.
    torch.manual_seed(0)
    vocab, k, trials = 6, 3, 40_000
    p = torch.softmax(3 * torch.randn(k + 1, vocab), -1)  # (k+1, V)
    q = torch.softmax(3 * torch.randn(k, vocab), -1)  # (k, V): a poor draft, so rejections are frequent
    gen = torch.Generator().manual_seed(1)
    drafts = torch.multinomial(q, trials, replacement=True, generator=gen).T  # (N, k)
    n, nxt = accept_sampling(drafts, q.expand(trials, k, vocab), p.expand(trials, k + 1, vocab))
    assert 0.1 < n.float().mean() / k < 0.9
    first = _emitted(drafts, n, nxt, 0)
    assert _tv(first, p[0]) < 0.015
    second = _emitted(drafts, n, nxt, 1)[n >= 1]  # a second token exists when the first draft was kept
    assert _tv(second, p[1]) < 0.03
    # The test has power: resampling from p (not max(0, p - q)) after a rejection is visibly wrong.
    naive = torch.where(n > 0, drafts[:, 0], torch.multinomial(p[0], trials, replacement=True, generator=gen))
    assert _tv(naive, p[0]) > 0.05


def test_sampling_end_to_end_matches_the_target_distribution():
    vocab = 4  # few outcomes: a few hundred runs pin the distribution down
    target = make_tiny_model("llama", vocab_size=vocab, seed=0)
    draft = make_tiny_model("llama", vocab_size=vocab, seed=3)
    prompt, temperature, trials = torch.tensor([[3, 1]]), 8.0, 600
    with torch.no_grad():
        p1 = torch.softmax(target(prompt).logits[0, -1] / temperature, -1)  # (V,)
        nexts = torch.cat([prompt.expand(vocab, 2), torch.arange(vocab)[:, None]], 1)  # (V, 3): each first token
        p2_given = torch.softmax(target(nexts).logits[:, -1] / temperature, -1)  # (V, V)
    p2 = p1 @ p2_given  # exact marginal of the second new token
    torch.manual_seed(0)  # the global RNG: the one source of randomness of every decoder
    outs = [speculative_generate(target, prompt, draft=draft, k=2, max_new_tokens=2, eos_token_id=[],
                                 processors=[Temperature(temperature)], do_sample=True) for _ in range(trials)]
    tokens = torch.stack([o.sequences[0, 2:] for o in outs])  # (N, 2)
    assert 0 < sum(o.accepted for o in outs) < sum(o.proposed for o in outs)  # both paths were taken
    assert _tv(tokens[:, 0], p1) < 0.07
    assert _tv(tokens[:, 1], p2) < 0.07


def simulated_speedup(alpha: float, k: int, c: float, steps: int = 200_000) -> tuple[float, float]:
    """Monte-Carlo speculative steps: each draft token is accepted with probability alpha until the first
    rejection; a step emits the accepted tokens plus one and costs k drafts (c each) + one target forward.
    Returns the speed-up (tokens per unit of cost over the target alone) and its standard error."""
    gen = torch.Generator().manual_seed(0)
    accepted = (torch.rand(steps, k, generator=gen) < alpha).long().cumprod(1).sum(1)  # (steps,)
    tokens = (accepted + 1).double()
    return float(tokens.mean()) / (k * c + 1), float(tokens.std() / steps**0.5) / (k * c + 1)


@pytest.mark.parametrize("alpha, k, c", [(0.8, 4, 0.05), (0.5, 2, 0.3), (0.0, 3, 0.5), (0.95, 6, 0.1)])
def test_expected_speedup_formula_agrees_with_a_simulation(alpha, k, c):
    mean, se = simulated_speedup(alpha, k, c)
    assert expected_speedup(alpha, k, c) == pytest.approx(mean, abs=5 * se + 1e-9)
    assert expected_tokens_per_step(alpha, k) == pytest.approx(mean * (k * c + 1), abs=5 * se * (k * c + 1) + 1e-9)


def test_expected_speedup_edge_cases():
    assert expected_tokens_per_step(1.0, 4) == 5.0  # every guess accepted, plus the bonus token
    assert expected_speedup(0.0, 3, 0.5) < 1  # every guess wasted: a slow-down
    assert expected_speedup(1.0, 3, 0.0) == 4.0


@pytest.mark.parametrize("kwargs, message", [
    (dict(k=0), "k"), (dict(max_new_tokens=-1), "max_new_tokens"), (dict(seed=-1), "seed"),
])
def test_bad_arguments(target, kwargs, message):
    args = dict(max_new_tokens=5, k=2) | kwargs
    with pytest.raises(ValueError, match=message):
        speculative_generate(target, PROMPT, draft=target, **args)


def test_rejects_batches_and_mismatched_vocabularies(target):
    with pytest.raises(ValueError, match="one sequence at a time"):
        speculative_generate(target, PROMPT.repeat(2, 1), draft=target, max_new_tokens=5)
    with pytest.raises(ValueError, match="vocabulary"):
        speculative_generate(target, PROMPT, draft=make_tiny_model("llama", vocab_size=50), max_new_tokens=5)


@pytest.mark.parametrize("args, message", [((1.5, 4, 0.1), "alpha"), ((0.5, 0, 0.1), "k"), ((0.5, 4, -1), "c")])
def test_formula_rejects_bad_values(args, message):
    with pytest.raises(ValueError, match=message):
        expected_speedup(*args)


def test_bundled_draft_gives_the_storytellers_greedy_text(storyteller):
    model, tokenizer = storyteller
    draft, _ = load_model("draft", device="cpu")
    for prompt in ["Once upon a time, a little fox", "Tom and his sister went to the park"]:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        expected = target_greedy(model, ids, 48, eos_token_id=None)
        out = speculative_generate(model, ids, draft=draft, k=4, max_new_tokens=48, eos_token_id=[])
        assert torch.equal(out.sequences, expected)
        assert out.acceptance_rate > 0.3  # a trained draft agrees with the target on easy tokens
