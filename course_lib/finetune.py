"""Fine-tuning a trained model on a few themed stories: full fine-tuning and LoRA (Hu et al. 2021).

The training step, optimizer, batching and learning-rate schedule are the ones that trained the bundled
models (``course_lib.train``); only the data, the step count and which parameters may move are new::

    ids = encode_stories(tokenizer, themed_stories())
    log = finetune(model, ids, finetune_config(steps=40))          # full fine-tuning: every weight moves
    add_lora(model, rank=4)                                        # or: freeze it all, add small adapters
    log = finetune(model, ids, finetune_config(lr=3e-3))
    merge_lora(model)                                              # fold the adapters back into the weights
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict
from typing import Callable, Sequence

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from course_lib.devices import to_model_device
from course_lib.train import TrainConfig, lr_at, make_optimizer, random_windows, train_step

# GPT-2 fuses query, key and value into one layer, c_attn; Llama has separate q_proj / v_proj. Hu et al. adapt
# the query and value projections; these names reach them in both architectures.
DEFAULT_TARGETS = ("c_attn", "q_proj", "v_proj")


def finetune_config(**overrides) -> TrainConfig:
    """A short fine-tuning run: few steps, short windows, no weight decay, full fp32 (cheap at this size)."""
    defaults = dict(name="finetune", steps=40, lr=5e-4, warmup=4, batch_size=8, context=64, weight_decay=0.0,
                    eval_every=10, seed=0, bf16=False)
    unknown = set(overrides) - set(asdict(TrainConfig(name="x")))
    if unknown:
        raise ValueError(f"unknown fine-tuning settings {sorted(unknown)}; allowed: {sorted(defaults)}")
    return TrainConfig(**{**defaults, **overrides})


def finetune(model: nn.Module, ids: torch.Tensor, cfg: TrainConfig,
             evaluate: Callable[[nn.Module], dict] | None = None) -> list[dict]:
    """Train ``model`` in place on random windows of ``ids`` for ``cfg.steps`` steps; returns one log row per step.

    Only parameters with ``requires_grad`` move (all of them for full fine-tuning, the adapters after
    ``add_lora``). ``evaluate(model)`` runs every ``cfg.eval_every`` steps and its dict joins that step's row.
    """
    if cfg.steps < 1:
        raise ValueError(f"steps must be >= 1, got {cfg.steps}")
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("every parameter is frozen: nothing to fine-tune")
    ids = to_model_device(model, ids)
    opt = make_optimizer(model, cfg.lr, cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    log = []
    for step in range(cfg.steps):
        x, y = random_windows(ids, cfg.context, cfg.batch_size, gen)  # (B, T) each, on the model's device
        loss = train_step(model, opt, x, y, lr_at(step, cfg), cfg.bf16)
        row = {"step": step + 1, "loss": loss.item()}  # one sync per step, after a whole backward pass
        if evaluate is not None and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps):
            model.eval()
            with torch.no_grad():
                row.update(evaluate(model))
        log.append(row)
    model.eval()
    return log


# ----------------------------------------------------------------------------- LoRA


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update: y = base(x) + (alpha / r) * x A^T B^T.

    A (r, in) starts random and B (out, r) starts at zero, so the adapted model starts exactly as the base
    model (Hu et al. 2021, section 4.1). Works for ``nn.Linear`` (weight (out, in)) and GPT-2's ``Conv1D``
    (weight (in, out): it computes x W + b).
    """

    def __init__(self, base: nn.Linear | Conv1D, rank: int = 4, alpha: float = 8.0):
        super().__init__()
        if isinstance(base, nn.Linear):
            in_features, out_features = base.in_features, base.out_features
        elif isinstance(base, Conv1D):
            in_features, out_features = base.weight.shape
        else:
            raise ValueError(f"LoRA wraps nn.Linear or Conv1D layers, got {type(base).__name__}")
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        self.base = base
        self.scaling = alpha / rank
        like = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_a = nn.Parameter(torch.empty(rank, in_features, **like))
        self.lora_b = nn.Parameter(torch.zeros(out_features, rank, **like))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # as the paper's reference code (loralib) does

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # two thin matmuls (in -> r -> out) instead of materialising the (out, in) update
        return self.base(x) + (x @ self.lora_a.T) @ self.lora_b.T * self.scaling  # (..., out)

    def delta_weight(self) -> torch.Tensor:
        """The update as a full matrix, in ``nn.Linear`` layout (out, in)."""
        return self.lora_b @ self.lora_a * self.scaling

    def merged(self) -> nn.Module:
        """A plain copy of the base layer with the update added to its weight: no extra cost at inference."""
        layer = copy.deepcopy(self.base)
        delta = self.delta_weight().detach()
        with torch.no_grad():
            layer.weight += delta.T if isinstance(layer, Conv1D) else delta  # Conv1D keeps (in, out)
        return layer


def add_lora(model: nn.Module, rank: int = 4, alpha: float = 8.0,
             targets: Sequence[str] = DEFAULT_TARGETS) -> list[str]:
    """Freeze every weight of ``model``, then wrap each layer whose name ends in ``targets`` in ``LoRALinear``.

    Returns the names of the wrapped layers.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = []
    for name, module in list(model.named_modules()):
        parent_name, _, child = name.rpartition(".")
        if child not in targets:
            continue
        if isinstance(module, LoRALinear):
            raise ValueError(f"{name} already has a LoRA adapter; merge_lora(model) first or use a fresh model")
        setattr(model.get_submodule(parent_name), child, LoRALinear(module, rank, alpha))
        wrapped.append(name)
    if not wrapped:
        layers = sorted({n.rpartition(".")[2] for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))})
        raise ValueError(f"no layer named {list(targets)} in {type(model).__name__}; its linear layers: {layers}")
    return wrapped


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every ``LoRALinear`` in ``model`` by its merged plain layer (in place); returns ``model``."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, module.merged())
    return model


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; a tied embedding/output matrix counts once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
