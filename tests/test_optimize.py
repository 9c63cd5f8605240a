"""Precision, quantization and pruning change what they promise, keep the model running, and refuse bad input."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch
from transformers.pytorch_utils import Conv1D

from course_lib.data import heldout_stories
from course_lib.measure import decode_time_breakdown, repeatable_decode_step, report
from course_lib.prune import drop_layers, magnitude_prune, transformer_blocks, weight_sparsity
from course_lib.quantize import (QuantizedLinear, dequantize_rows, pack_int4, quantize, quantize_rows, unpack_int4,
                                 with_precision)
from course_lib.timing import weight_bytes
from course_lib.data import encode_stories
from course_lib.metrics import heldout_loss

IDS = torch.randint(1, 97, (2, 24), generator=torch.Generator().manual_seed(0))


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


def test_bf16_copy_leaves_the_original_alone(tiny_gpt2):
    half = with_precision(tiny_gpt2, "bf16")
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in tiny_gpt2.parameters()} == {torch.float32}
    assert relative_error(half(IDS).logits.float(), tiny_gpt2(IDS).logits) < 0.05


def test_fp16_on_cpu_and_unknown_precisions_are_refused(tiny_gpt2):
    with pytest.raises(ValueError, match="fp16 needs a GPU"):
        with_precision(tiny_gpt2, "fp16")
    with pytest.raises(ValueError, match="unknown dtype"):
        with_precision(tiny_gpt2, "fp8")
    with pytest.raises(ValueError, match="unsupported precision"):
        with_precision(tiny_gpt2, torch.int8)


@pytest.mark.parametrize("bits, group_size", [(8, None), (8, 16), (4, 16)])
def test_quantize_rows_rounds_to_the_nearest_step(bits, group_size):
    weight = torch.randn(12, 64, generator=torch.Generator().manual_seed(1))
    codes, scales = quantize_rows(weight, bits, group_size)
    q_max = 2 ** (bits - 1) - 1
    assert codes.dtype == torch.int8 and int(codes.abs().max()) == q_max  # the largest weight uses the full range
    assert scales.shape == (12, 64 // (group_size or 64))
    step = scales.repeat_interleave(group_size or 64, dim=1)  # (12, 64): the step size of each weight
    error = (dequantize_rows(codes, scales) - weight).abs()
    assert bool((error <= step / 2 + 1e-6).all())  # round-to-nearest: at most half a step off


def test_int4_packs_two_codes_per_byte():
    codes, _ = quantize_rows(torch.randn(6, 32), bits=4, group_size=8)
    packed = pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (6, 16)
    assert torch.equal(unpack_int4(packed), codes)


@pytest.mark.parametrize("args, message", [((3, 8), "bits"), ((8, 5), "divide")])
def test_quantize_rows_refuses_bad_settings(args, message):
    with pytest.raises(ValueError, match=message):
        quantize_rows(torch.randn(4, 32), *args)


def test_int4_model_needs_groups(tiny_gpt2):
    with pytest.raises(ValueError, match="group_size"):
        quantize(tiny_gpt2, bits=4)


def test_int8_model_is_close_small_and_keeps_ties(tiny_gpt2):
    q = quantize(tiny_gpt2, bits=8)
    assert relative_error(q(IDS).logits, tiny_gpt2(IDS).logits) < 0.02
    assert weight_bytes(q) <= 0.35 * weight_bytes(tiny_gpt2)
    assert q.lm_head.weight_q is q.transformer.wte.weight_q  # the tied matrix is stored once
    assert not any(isinstance(m, (Conv1D, torch.nn.Linear, torch.nn.Embedding)) for m in q.modules())


def test_conv1d_is_transposed_before_quantizing(tiny_gpt2):
    conv = tiny_gpt2.transformer.h[0].mlp.c_fc  # Conv1D: weight is (in, out)
    assert isinstance(conv, Conv1D) and conv.weight.shape == (32, 128)
    layer = quantize(tiny_gpt2).transformer.h[0].mlp.c_fc
    assert isinstance(layer, QuantizedLinear)
    x = torch.randn(3, 32)
    assert relative_error(layer(x), conv(x)) < 0.02


def test_int4_is_smaller_than_int8_and_still_runs(tiny_llama):
    q8, q4 = quantize(tiny_llama, 8), quantize(tiny_llama, 4, group_size=16)
    assert weight_bytes(q4) < 0.75 * weight_bytes(q8)
    assert relative_error(q4(IDS).logits, tiny_llama(IDS).logits) < 0.3
    assert q4.generate(IDS[:1, :5], max_new_tokens=4, do_sample=False).shape == (1, 9)


@pytest.mark.parametrize("amount", [0.3, 0.5])
def test_magnitude_pruning_zeroes_the_requested_fraction(tiny_model, amount):
    pruned = magnitude_prune(tiny_model, amount)
    assert weight_sparsity(pruned) == pytest.approx(amount, abs=0.005)
    assert weight_sparsity(tiny_model) == 0.0  # the original is untouched
    assert not any(name.endswith("_orig") for name, _ in pruned.named_parameters())  # made permanent
    assert pruned(IDS).logits.isfinite().all()


@pytest.mark.parametrize("amount", [-0.1, 1.0])
def test_pruning_refuses_impossible_amounts(tiny_gpt2, amount):
    with pytest.raises(ValueError, match="amount"):
        magnitude_prune(tiny_gpt2, amount)


def test_dropped_layers_are_gone_and_the_cache_still_lines_up(tiny_model):
    shallow = drop_layers(tiny_model, [0])
    assert len(transformer_blocks(shallow)) == 1 == shallow.config.num_hidden_layers
    assert len(transformer_blocks(tiny_model)) == 2
    cached = shallow.generate(IDS[:1, :6], max_new_tokens=8, do_sample=False, pad_token_id=0)
    ids = IDS[:1, :6]
    for _ in range(8):  # the same greedy tokens without any cache: the renumbered layers index it right
        ids = torch.cat([ids, shallow(ids).logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(cached, ids)


@pytest.mark.parametrize("layers", [[], [0, 1], [2], [-1]])
def test_drop_layers_refuses_bad_indices(tiny_gpt2, layers):
    with pytest.raises(ValueError, match="layers"):
        drop_layers(tiny_gpt2, layers)


def test_report_measures_every_variant(storyteller):
    # The storyteller, not a tiny random model: a random model that mostly copies its last token barely notices
    # pruning, so only a trained model can show the quality cost the report is there to measure.
    model, tokenizer = storyteller
    heldout = encode_stories(tokenizer, heldout_stories()[:3])[:700]
    ids = tokenizer("Once upon a time", return_tensors="pt").input_ids
    result = report({"fp32": model, "int8": quantize(model), "pruned": magnitude_prune(model, 0.9)},
                    heldout, ids, max_new_tokens=6, repeats=1, context=64)
    assert [r.name for r in result.rows] == ["fp32", "int8", "pruned"]
    assert result["fp32"].same_text and all(r.speed_ratio > 0 for r in result.rows)
    assert result["int8"].weight_bytes < 0.35 * result["fp32"].weight_bytes
    assert result["fp32"].heldout_loss == pytest.approx(heldout_loss(model, heldout, 64)[0])
    assert result["pruned"].heldout_loss > result["fp32"].heldout_loss + 0.05  # 90 % of the weights gone hurts
    int8 = result["int8"]
    assert (f"| int8 | {int8.speed_ratio:.2f}x | {int8.weight_bytes / 1e6:.2f} | "
            f"{int8.weight_bytes / result['fp32'].weight_bytes:.2f}x | {int8.heldout_loss:.4f} |") in result.to_markdown()
    with pytest.raises(ValueError, match="at least one"):
        report({}, heldout, IDS[:1, :5])


def test_repeatable_decode_step_does_the_same_work_every_call(tiny_model):
    step = repeatable_decode_step(tiny_model, IDS[:1, :10])
    first, second = step(), step()
    assert torch.equal(first, second)  # the fed token was cropped out again: same cache, same logits
    assert torch.allclose(first[0], tiny_model(IDS[:1, :10]).logits[0, -1], atol=1e-4)


def test_time_breakdown_puts_each_cost_in_its_part():
    a, b = torch.randn(256, 256), torch.randn(256, 256)
    x = torch.randn(1000)

    def step():  # 5 ms of Python (a sleep), some matrix products, some element-wise ops
        time.sleep(0.005)
        for _ in range(4):
            a @ b
        for _ in range(20):
            x + 1.0

    parts = decode_time_breakdown(step, repeats=5)
    assert set(parts) == {"matmul kernels", "other torch ops", "outside torch ops"}
    assert 0.005 <= parts["outside torch ops"] < 0.005 + 0.05  # the sleep is outside every torch op
    assert parts["matmul kernels"] > 0 and parts["other torch ops"] > 0
    elementwise = decode_time_breakdown(lambda: [x + 1.0 for _ in range(20)], repeats=5)
    assert elementwise["matmul kernels"] == 0 and elementwise["other torch ops"] > 0  # no matmul, none counted
    with pytest.raises(ValueError, match="repeats"):
        decode_time_breakdown(lambda: None, repeats=0)


def test_time_breakdown_profiles_on_the_threads_asked_and_restores_them():
    seen = []
    old = torch.get_num_threads()
    decode_time_breakdown(lambda: seen.append(torch.get_num_threads()), repeats=2)
    decode_time_breakdown(lambda: seen.append(torch.get_num_threads()), repeats=2, threads=None)
    assert seen == [1, 1, 1, old, old, old] and torch.get_num_threads() == old
    with pytest.raises(ValueError, match="threads=0 is not allowed; threads must be an integer >= 1"):
        decode_time_breakdown(lambda: None, threads=0)


def test_time_breakdown_prints_nothing_on_stderr():
    # A fresh process: the profiler's C++ logger reads its level once, at the first profile of a process.
    code = ("import torch; from course_lib.measure import decode_time_breakdown; "
            "decode_time_breakdown(lambda: torch.ones(8) @ torch.ones(8), repeats=2)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={k: v for k, v in os.environ.items() if k != "KINETO_LOG_LEVEL"})
    assert run.returncode == 0, run.stderr
    assert run.stderr == "", f"a learner would see this in pink under the cell: {run.stderr!r}"


def test_int8_storyteller_meets_the_course_target(storyteller):
    model, tokenizer = storyteller
    heldout = encode_stories(tokenizer, heldout_stories()[:20])
    q = quantize(model, bits=8)
    assert weight_bytes(q) <= 0.35 * weight_bytes(model)
    assert heldout_loss(q, heldout)[0] - heldout_loss(model, heldout)[0] <= 0.05
