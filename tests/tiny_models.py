"""Tiny random causal LMs for fast tests (importable by test modules, unlike conftest.py)."""
from __future__ import annotations

import torch


def _tiny_config(arch: str, vocab_size: int = 97, seed: int = 0):
    from transformers import GPT2Config, LlamaConfig

    common = dict(vocab_size=vocab_size, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    if arch == "gpt2":
        return GPT2Config(n_positions=128, n_embd=32, n_layer=2, n_head=4, **common)
    return LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=128, **common)


def make_tiny_model(arch: str = "gpt2", vocab_size: int = 97, seed: int = 0):
    """A seeded, randomly initialised causal LM small enough for fast equivalence tests."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_tiny_config(arch, vocab_size))
    # Random init gives near-uniform logits; sharpen them so greedy/beam choices are not near ties.
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(20.0)
    return model.eval()
