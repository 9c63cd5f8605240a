"""The performance model's counts against closed forms, and its arithmetic. (Its timings are measured by
``course bench`` and notebook 12, not asserted here.)"""
from __future__ import annotations

import time

import pytest
import torch

from course_lib import perf_model as pm
from course_lib.minigpt import MiniGPT
from course_lib.models import ContextLengthError
from course_lib.timing import weight_bytes


def gpt2_flops(cfg, batch: int, new: int, keys: int) -> int:
    """Matmul FLOPs of ``new`` positions per row attending to ``keys`` positions: 12 C^2 per layer and position
    (qkv 3 C^2, projection C^2, MLP 8 C^2), attention 2 x 2 C per key, and the vocabulary head for the last
    position only, each multiply-add counting 2."""
    c = cfg.n_embd
    return 2 * batch * (new * 12 * c * c * cfg.n_layer + 2 * new * keys * c * cfg.n_layer + c * cfg.vocab_size)


@pytest.mark.parametrize("batch, context", [(1, 8), (3, 20)])
def test_decode_step_counts_match_the_closed_forms(tiny_gpt2, one_thread, batch, context):
    cfg = tiny_gpt2.config
    for model in (tiny_gpt2, MiniGPT.from_hf(tiny_gpt2)):
        _, counts = pm.decode_step_counts(model, batch, context)
        assert counts.flops == gpt2_flops(cfg, batch, 1, context + 1), type(model).__name__
        kv = 2 * cfg.n_layer * batch * context * cfg.n_embd * 4  # keys and values of every cached position, fp32
        assert counts.bytes == weight_bytes(model) + kv
        assert counts.intensity == counts.flops / counts.bytes


def test_prefill_counts_match_the_closed_form(tiny_gpt2, one_thread):
    _, counts = pm.prefill_counts(tiny_gpt2, batch=2, tokens=10)
    assert counts.flops == gpt2_flops(tiny_gpt2.config, 2, 10, 10)  # attention counted over all 10 x 10 pairs
    assert counts.bytes == weight_bytes(tiny_gpt2)


def test_a_step_dispatches_the_same_ops_at_any_size(tiny_model, one_thread):
    """The fixed cost of a step does not grow with the batch or the context: the same ops, on larger tensors."""
    ops = {pm.decode_step_counts(tiny_model, b, t)[1].ops for b, t in [(1, 4), (4, 4), (1, 40), (8, 60)]}
    assert len(ops) == 1 and ops.pop() > 10 * tiny_model.config.num_hidden_layers


def test_the_counted_step_is_the_timed_step(tiny_gpt2, one_thread):
    """The step returned with the counts gives the model's logits and leaves the cache as it found it."""
    step, _ = pm.decode_step_counts(tiny_gpt2, 2, 6)
    first, again = step(), step()
    ids = pm._prompt(tiny_gpt2, 2, 7)
    with torch.no_grad():
        expected = tiny_gpt2(ids).logits[:, -1]
    torch.testing.assert_close(first, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(again, first)


def test_the_narrow_twin_runs_the_same_ops_on_almost_nothing(tiny_model, one_thread):
    for model in [tiny_model] + ([MiniGPT.from_hf(tiny_model)] if tiny_model.config.model_type == "gpt2" else []):
        twin = pm.narrow_twin(model)
        (_, mine), (_, its) = pm.decode_step_counts(model, 2, 8), pm.decode_step_counts(twin, 2, 8)
        assert its.ops == mine.ops, type(model).__name__
        assert its.flops * 10 < mine.flops and weight_bytes(twin) * 5 < weight_bytes(model)


def test_predict_adds_the_three_terms_and_names_the_largest():
    machine = pm.Machine(op_s=1e-6, bandwidth=1e9, flop_rate=1e10)
    p = pm.predict(machine, pm.Counts(ops=100, flops=10**9, bytes=10**6))
    assert (p.overhead_s, p.memory_s, p.compute_s) == pytest.approx((1e-4, 1e-3, 0.1))
    assert p.total_s == pytest.approx(0.1011) and p.bound == "compute"
    assert pm.predict(machine, pm.Counts(ops=10**5, flops=10, bytes=10)).bound == "overhead"
    assert pm.predict(machine, pm.Counts(ops=1, flops=10, bytes=10**8)).bound == "memory"


def test_fastest_s_is_the_fastest_timed_call():
    calls = []

    def sleepy():
        calls.append(None)
        time.sleep(0.02 if len(calls) == 3 else 0.005)

    assert 0.005 <= pm.fastest_s(sleepy, repeats=3) < 0.02
    assert len(calls) == 4  # one warm-up, three timed
    with pytest.raises(ValueError, match="repeats"):
        pm.fastest_s(sleepy, repeats=0)


def test_bad_sizes_are_refused_by_name(tiny_gpt2):
    with pytest.raises(ValueError, match="batch"):
        pm.decode_step_counts(tiny_gpt2, 0, 8)
    with pytest.raises(ValueError, match="tokens"):
        pm.prefill_counts(tiny_gpt2, 1, 0)
    with pytest.raises(ContextLengthError):
        pm.decode_step_counts(tiny_gpt2, 1, tiny_gpt2.config.n_positions)  # context + the new token: one too many
