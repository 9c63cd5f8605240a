"""Fine-tuning and LoRA: the loop trains, adapters start as the base model, merging changes nothing."""
from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import make_tiny_model
from transformers.pytorch_utils import Conv1D

from course_lib.data import themed_stories
from course_lib.finetune import LoRALinear, add_lora, finetune, finetune_config, merge_lora, parameter_counts
from course_lib.data import heldout_stories

X = torch.randint(1, 97, (2, 12), generator=torch.Generator().manual_seed(0))  # (B, T)


def logits(model, x=X):
    with torch.no_grad():
        return model(input_ids=x).logits


def randomise_adapters(model, seed=1):
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, LoRALinear):
            m.lora_b.data = torch.randn(m.lora_b.shape, generator=gen) * 0.5


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_fresh_adapter_is_the_base_model(arch):
    base = make_tiny_model(arch)
    adapted = copy.deepcopy(base)
    wrapped = add_lora(adapted, rank=2)
    assert wrapped  # c_attn for GPT-2, q_proj and v_proj for Llama
    assert torch.allclose(logits(adapted), logits(base), atol=1e-6)  # B starts at zero


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_merged_equals_adapter_path(arch):
    model = make_tiny_model(arch)
    base_logits = logits(model)
    add_lora(model, rank=3, alpha=6.0)
    randomise_adapters(model)
    adapter_logits = logits(model)
    assert not torch.allclose(adapter_logits, base_logits, atol=1e-3)  # the update does something
    merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert torch.allclose(logits(model), adapter_logits, atol=1e-4)


def test_conv1d_and_linear_updates_agree():
    gen = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(5, 7)
    conv = Conv1D(7, 5)  # Conv1D(out, in) stores weight as (in, out)
    conv.weight.data, conv.bias.data = linear.weight.data.T.clone(), linear.bias.data.clone()
    a, b = LoRALinear(linear, rank=2), LoRALinear(conv, rank=2)
    b.lora_a.data = a.lora_a.data.clone()
    a.lora_b.data = b.lora_b.data = torch.randn(7, 2, generator=gen)
    x = torch.randn(3, 5, generator=gen)
    assert torch.allclose(a(x), b(x), atol=1e-6)
    assert torch.allclose(a.merged()(x), a(x), atol=1e-5) and torch.allclose(b.merged()(x), b(x), atol=1e-5)


def test_only_adapters_get_gradients():
    model = make_tiny_model("gpt2")
    add_lora(model, rank=2)
    randomise_adapters(model)  # with B = 0, A's gradient would be exactly zero
    model(input_ids=X, labels=X).loss.backward()
    for name, p in model.named_parameters():
        if "lora_" in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None and not p.requires_grad, name


def test_trainable_parameter_count():
    model = make_tiny_model("gpt2")
    total_before = parameter_counts(model)[1]
    add_lora(model, rank=4)
    c = model.config
    per_layer = 4 * (c.n_embd + 3 * c.n_embd)  # A (r, in) + B (out, r); c_attn maps 32 -> 96
    trainable, total = parameter_counts(model)
    assert trainable == c.n_layer * per_layer
    assert total == total_before + trainable


def test_finetune_lowers_loss_and_moves_only_adapters():
    model = make_tiny_model("gpt2")
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    add_lora(model, rank=4)
    ids = torch.arange(1, 11).repeat(30)  # a pattern the random model does not know
    log = finetune(model, ids, finetune_config(steps=30, lr=3e-2, context=16, batch_size=4, eval_every=10),
                   evaluate=lambda m: {"probe": 1.0})
    assert len(log) == 30 and log[-1]["loss"] < 0.5 * log[0]["loss"]
    assert [row["step"] for row in log if "probe" in row] == [10, 20, 30]
    for name, p in model.named_parameters():
        if "lora_" not in name:
            assert torch.equal(p, frozen_before[name.replace(".base.", ".")]), name
    assert not model.training


def test_full_finetune_moves_every_weight():
    model = make_tiny_model("llama")
    before = copy.deepcopy(model.state_dict())
    finetune(model, torch.arange(1, 11).repeat(30), finetune_config(steps=3, context=16, batch_size=2))
    assert all(not torch.equal(v, model.state_dict()[k]) for k, v in before.items() if v.dtype.is_floating_point)


def test_bad_inputs():
    model = make_tiny_model("gpt2")
    with pytest.raises(ValueError, match="unknown fine-tuning settings"):
        finetune_config(learning_rate=1e-3)
    with pytest.raises(ValueError, match="at least 18"):
        finetune(model, torch.arange(10), finetune_config(context=16))
    with pytest.raises(ValueError, match="steps must be >= 1"):
        finetune(model, torch.arange(100), finetune_config(steps=0))
    with pytest.raises(ValueError, match="no layer named"):
        add_lora(copy.deepcopy(model), targets=("query",))
    with pytest.raises(ValueError, match="nn.Linear or Conv1D"):
        add_lora(copy.deepcopy(model), targets=("wte",))
    with pytest.raises(ValueError, match="rank must be >= 1"):
        add_lora(copy.deepcopy(model), rank=0)
    twice = copy.deepcopy(model)
    add_lora(twice)
    with pytest.raises(ValueError, match="already has a LoRA adapter"):
        add_lora(twice)
    with pytest.raises(ValueError, match="every parameter is frozen"):
        finetune(merge_lora(twice), torch.arange(100), finetune_config(steps=1, context=8))


def test_themed_stories_are_small_original_and_not_evaluation_data():
    stories = themed_stories()
    assert len(stories) == 14 and all("Pip" in s for s in stories)
    assert sum(len(s.encode()) for s in stories) < 10_000
    heldout = set(heldout_stories())
    assert not heldout & set(stories)
