"""Ensembles: mixtures and products of next-token distributions over one shared vocabulary."""
from __future__ import annotations

import pytest
import torch
from tiny_models import make_tiny_model

from course_lib.decoding import generate
from course_lib.ensembles import Ensemble, VocabularyMismatchError, check_same_tokenizer, combine_log_probs, weight_sweep
from course_lib.metrics import nll
from course_lib.models import load_tokenizer
from course_lib.metrics import heldout_loss
from course_lib.train import train_tokenizer

X = torch.randint(1, 97, (2, 10), generator=torch.Generator().manual_seed(0))  # (B, T)


@pytest.fixture(scope="module")
def pair():
    return make_tiny_model("gpt2", seed=0), make_tiny_model("llama", seed=1)


def log_probs(model, x=X):
    with torch.no_grad():
        return model(input_ids=x).logits.log_softmax(-1)


@pytest.mark.parametrize("method", ["mixture", "product"])
def test_weight_one_is_that_member(pair, method):
    a, b = pair
    assert torch.allclose(log_probs(Ensemble([a, b], [1.0, 0.0], method)), log_probs(a), atol=1e-5)
    assert torch.allclose(log_probs(Ensemble([a, b], [0.0, 1.0], method)), log_probs(b), atol=1e-5)


@pytest.mark.parametrize("method", ["mixture", "product"])
def test_model_with_itself_is_the_model(pair, method):
    a, _ = pair
    assert torch.allclose(log_probs(Ensemble([a, a], [0.3, 0.7], method)), log_probs(a), atol=1e-5)


def test_rules_match_their_formulas(pair):
    a, b = pair
    pa, pb = log_probs(a).exp(), log_probs(b).exp()
    mix = Ensemble([a, b], [0.25, 0.75], "mixture")(input_ids=X).logits
    assert torch.allclose(mix.exp(), 0.25 * pa + 0.75 * pb, atol=1e-6)
    prod = Ensemble([a, b], [0.25, 0.75], "product")(input_ids=X).logits
    unnormalised = pa**0.25 * pb**0.75
    assert torch.allclose(prod.exp(), unnormalised / unnormalised.sum(-1, keepdim=True), atol=1e-6)


def test_mixture_loss_is_at_most_the_average_member_loss(pair):
    a, b = pair
    targets = X[:, 1:]
    la, lb = log_probs(a)[:, :-1], log_probs(b)[:, :-1]
    mixed = combine_log_probs([la, lb], [0.5, 0.5], "mixture")
    assert nll(mixed, targets) <= 0.5 * nll(la, targets) + 0.5 * nll(lb, targets) + 1e-6  # Jensen
    sweep = weight_sweep([la, lb], targets, [1.0, 0.5, 0.0])
    assert sweep[0] == pytest.approx(nll(la, targets), abs=1e-5)
    assert sweep[2] == pytest.approx(nll(lb, targets), abs=1e-5)
    assert sweep[1] == pytest.approx(nll(mixed, targets), abs=1e-6)


def test_heldout_loss_accepts_an_ensemble(pair):
    a, _ = pair
    ids = torch.randint(1, 97, (70,), generator=torch.Generator().manual_seed(2))
    assert heldout_loss(Ensemble([a]), ids, context=16)[0] == pytest.approx(heldout_loss(a, ids, context=16)[0], abs=1e-5)


def test_left_padding_is_handled(pair):
    ens = Ensemble(list(pair), [0.5, 0.5])
    row = X[:1, :6]
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), row], dim=1)  # (1, 9), left-padded
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones_like(row)], dim=1)
    with torch.no_grad():
        alone = ens(input_ids=row).logits[:, -1]
        with_pad = ens(input_ids=padded, attention_mask=mask).logits[:, -1]
    assert torch.allclose(alone, with_pad, atol=1e-4)


def test_generate_with_per_member_caches_is_the_uncached_argmax_loop(pair):
    a, b = pair
    ens = Ensemble([a, b], [0.6, 0.4], "product")
    ids = X[:, :4]
    expected = ids
    for _ in range(6):  # no cache: every step re-reads the whole prefix with both members
        nxt = combine_log_probs([log_probs(a, expected)[:, -1], log_probs(b, expected)[:, -1]], [0.6, 0.4], "product")
        expected = torch.cat([expected, nxt.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generate(ens, ids, max_new_tokens=6, eos_token_id=[]).sequences, expected)
    assert torch.equal(generate(ens, ids, max_new_tokens=6, eos_token_id=[]).sequences, expected)  # caches start afresh


def test_generate_left_padded_batch_and_single_member(pair):
    a, b = pair
    ens = Ensemble([a, b], [0.5, 0.5])
    short, long = X[:1, :3], X[1:, :6]
    padded = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1), long])  # (2, 6)
    mask = (torch.arange(6) >= torch.tensor([[3], [0]])).long()  # (2, 6): row 0 starts at position 3
    both = generate(ens, padded, mask, max_new_tokens=5, eos_token_id=[]).sequences
    assert torch.equal(both[0, 3:], generate(ens, short, max_new_tokens=5, eos_token_id=[]).sequences[0])
    assert torch.equal(both[1], generate(ens, long, max_new_tokens=5, eos_token_id=[]).sequences[0])
    # weight 1 on one member: the same tokens as transformers' own greedy search with that model
    hf = a.generate(long, attention_mask=torch.ones_like(long), max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(generate(Ensemble([a, b], [1.0, 0.0]), long, max_new_tokens=5).sequences, hf)


def test_bad_inputs(pair):
    a, b = pair
    with pytest.raises(VocabularyMismatchError, match="sizes \\[97, 50\\]"):
        Ensemble([a, make_tiny_model("gpt2", vocab_size=50)])
    with pytest.raises(ValueError, match="sum to 1"):
        Ensemble([a, b], [0.5, 0.6])
    with pytest.raises(ValueError, match=">= 0"):
        Ensemble([a, b], [1.5, -0.5])
    with pytest.raises(ValueError, match="2 members"):
        Ensemble([a, b], [1.0])
    with pytest.raises(ValueError, match="unknown method 'vote'"):
        Ensemble([a, b], method="vote")
    with pytest.raises(ValueError, match="at least one model"):
        Ensemble([])
    with pytest.raises(VocabularyMismatchError, match="differ in shape"):
        combine_log_probs([torch.zeros(2, 5), torch.zeros(2, 6)], [0.5, 0.5])
    with pytest.raises(ValueError, match="exactly two"):
        weight_sweep([torch.zeros(1, 2, 5)] * 3, torch.zeros(1, 2, dtype=torch.long), [0.5])


def test_tokenizers_must_match():
    ours = load_tokenizer("storyteller")
    check_same_tokenizer(ours, load_tokenizer("llama"))  # bundled models share one tokenizer
    other = train_tokenizer(["Tom had a red ball. He liked to play with it every day."] * 20, vocab_size=300)
    with pytest.raises(VocabularyMismatchError, match="differs from tokenizer 0"):
        check_same_tokenizer(ours, other)
