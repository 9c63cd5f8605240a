"""The scale sweep on two tiny sizes (its real sizes run in `course bench --sections scale`)."""
from __future__ import annotations

import pytest
import torch

from course_lib import scale

TINY = (scale.Shape("tiny", 2, 32, 4, 97), scale.Shape("small", 2, 64, 4, 97))


def gpt2_parameters(shape: scale.Shape, n_positions: int = 256) -> int:
    c = shape.n_embd
    per_block = 12 * c * c + 13 * c  # attention 4 C^2 + 4 C, MLP 8 C^2 + 5 C, two norms 4 C
    return shape.vocab_size * c + n_positions * c + shape.n_layer * per_block + 2 * c  # + the final norm


def test_random_models_have_the_shape_asked_for():
    for shape in TINY + scale.SHAPES[:1]:
        model = scale.random_model(shape)
        assert sum(p.numel() for p in model.parameters()) == gpt2_parameters(shape), shape.name


def test_int8_kernel_stays_close_to_fp32_and_leaves_the_original_alone(one_thread):
    model = scale.random_model(TINY[1])
    int8 = scale.int8_dynamic(model)
    assert isinstance(model.h[0].mlp.c_fc, torch.nn.Linear)  # the original is untouched
    assert isinstance(int8.h[0].mlp.c_fc, torch.ao.nn.quantized.dynamic.Linear)
    ids = torch.arange(10)[None, :]
    with torch.no_grad():
        exact, approx = model(ids).logits, int8(ids).logits
    assert (approx - exact).abs().max() < 0.05 * exact.abs().max()


def test_sweep_times_every_variant_and_names_the_crossovers(one_thread):
    rows = scale.sweep(TINY, new_tokens=2, repeats=1, compile=False, draft=scale.random_model(TINY[0]),
                       acceptance=0.7, k=4)
    assert [r.shape for r in rows] == list(TINY)
    for r in rows:
        assert list(r.ratios) == ["fp32", "bf16", "int8 kernel"] and r.ratios["fp32"] == 1.0
        assert all(t > 0 for t in r.tokens_per_s.values()) and r.c > 0
    text = scale.sweep_markdown(rows)
    assert text.count("\n| tiny |") + text.count("\n| small |") == 2 and "Faster than fp32 from: bf16:" in text


def test_a_crossover_is_the_first_size_from_which_a_technique_stays_faster():
    def row(name, int8, speculative):
        return scale.SizeRow(scale.Shape(name, 1, 8, 1, 8), 0, 0, {}, {"fp32": 1.0, "int8 kernel": int8},
                             speculative)

    rows = [row("a", 1.2, 0.9), row("b", 0.8, 1.1), row("c", 1.5, 1.3), row("d", 2.0, 1.2)]
    assert scale.crossovers(rows) == {"int8 kernel": "c", "speculative (predicted)": "b"}
    assert scale.crossovers(rows[:2])["int8 kernel"] == "none of these sizes"
    with pytest.raises(ValueError, match="new_tokens"):
        scale.sweep(TINY, new_tokens=0)
