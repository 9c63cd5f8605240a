"""Pruning: a copy of a model with the smallest weights set to zero (unstructured), or without whole blocks
(structured). Zeros keep every matrix's shape, so a dense matmul does the same work; removing a block does less.

    sparse = magnitude_prune(model, amount=0.5)   # half the block weights set to zero
    shallow = drop_layers(model, [3])             # LayerDrop-style: remove a whole block
"""

from __future__ import annotations

import copy

from torch import nn
from torch.nn.utils import prune
from transformers.pytorch_utils import Conv1D


def transformer_blocks(model: nn.Module) -> nn.ModuleList:
    """The list of decoder blocks of a GPT-2 (``transformer.h``) or Llama (``model.layers``) model."""
    for path in ("transformer.h", "model.layers"):
        try:
            return model.get_submodule(path)
        except AttributeError:
            continue
    raise ValueError(f"{type(model).__name__} has neither transformer.h (GPT-2) nor model.layers (Llama)")


def _block_matmuls(model: nn.Module) -> list[nn.Module]:
    return [m for m in transformer_blocks(model).modules() if isinstance(m, (nn.Linear, Conv1D))]


def magnitude_prune(model: nn.Module, amount: float) -> nn.Module:
    """A copy with the smallest ``amount`` of each block matmul's weights set to zero, permanently.

    Embeddings and the LM head are left dense (they hold the vocabulary). Zeros save nothing by
    themselves: a dense matmul multiplies by zero just as fast.
    """
    if not 0.0 <= amount < 1.0:
        raise ValueError(f"amount is the fraction of weights to zero, in [0, 1); got {amount}")
    pruned = copy.deepcopy(model)
    for module in _block_matmuls(pruned):
        prune.l1_unstructured(module, "weight", amount=amount)
        prune.remove(module, "weight")  # bake the mask into the weight; no mask hooks at run time
    return pruned


def weight_sparsity(model: nn.Module) -> float:
    """Fraction of exactly-zero weights in the block matmuls."""
    weights = [m.weight for m in _block_matmuls(model)]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


def drop_layers(model: nn.Module, layers: list[int]) -> nn.Module:
    """A copy without the decoder blocks at indices ``layers`` (structured pruning, as in LayerDrop).

    Fan et al. 2019 (arXiv:1909.11556) train with layer dropout so that blocks can be removed later; a
    model trained without it loses more, which the held-out loss shows.
    """
    n_layers = len(transformer_blocks(model))
    if not layers or len(set(layers)) >= n_layers or any(not 0 <= i < n_layers for i in layers):
        raise ValueError(f"layers must name 1 to {n_layers - 1} distinct blocks among 0..{n_layers - 1}, got {layers}")
    shallow = copy.deepcopy(model)
    blocks = transformer_blocks(shallow)
    for index in sorted(set(layers), reverse=True):
        del blocks[index]
    for new_index, block in enumerate(blocks):
        for module in block.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index  # the KV cache is indexed by layer: renumber the survivors
    shallow.config.num_hidden_layers = len(blocks)
    return shallow
