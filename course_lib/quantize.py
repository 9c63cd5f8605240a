"""Fewer bits per weight: a copy of a model in bf16/fp16, or with int8/int4 weight codes and scales.

    half = with_precision(model, "bf16")          # half the bytes per weight
    small = quantize(model, bits=8)               # int8 codes + one scale per output row
    tiny = quantize(model, bits=4, group_size=32) # int4 codes, one scale per group of 32 inputs

The original stays untouched as the fp32 baseline; ``course_lib.measure.report`` compares such variants.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from course_lib.devices import model_device
from course_lib.models import resolve_dtype

# ----------------------------------------------------------------------------- precision


def with_precision(model: nn.Module, precision: str | torch.dtype) -> nn.Module:
    """A copy of ``model`` with its weights in fp32, bf16, or (on a GPU only) fp16."""
    dtype = resolve_dtype(precision)
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"unsupported precision {precision!r}; allowed: fp32, bf16, fp16 (GPU only)")
    device = model_device(model)
    if dtype == torch.float16 and device.type != "cuda":
        raise ValueError(f"fp16 needs a GPU: torch's CPU matmuls have no fast fp16 path on most CPUs, and the "
                         f"model sits on {device}; use 'bf16' on the CPU")
    return copy.deepcopy(model).to(dtype)


# ----------------------------------------------------------------------------- quantization


def quantize_rows(weight: torch.Tensor, bits: int = 8, group_size: int | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric round-to-nearest quantization of an (out, in) matrix, one scale per row group.

    Returns integer codes in [-(2^(bits-1)-1), 2^(bits-1)-1] as int8 (out, in) and fp32 scales
    (out, in // group_size); ``group_size`` None means one scale per whole row (per output channel).
    """
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    out_features, in_features = weight.shape
    group_size = group_size or in_features
    if in_features % group_size:
        raise ValueError(f"group_size {group_size} must divide the row length {in_features}")
    groups = weight.detach().float().view(out_features, -1, group_size)  # (out, G, group)
    q_max = 2 ** (bits - 1) - 1
    scales = groups.abs().amax(-1).clamp(min=1e-12) / q_max  # (out, G): the largest weight maps to q_max
    codes = torch.round(groups / scales[..., None]).clamp(-q_max, q_max)  # (out, G, group)
    return codes.view(out_features, in_features).to(torch.int8), scales


def dequantize_rows(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Back to float: codes (out, in) times their group's scale (out, G)."""
    out_features, in_features = codes.shape
    groups = codes.float().view(out_features, scales.shape[1], -1)  # (out, G, group)
    return (groups * scales[..., None]).view(out_features, in_features)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte: (out, in) int8 in [-7, 7] -> (out, in // 2) uint8."""
    shifted = (codes + 8).to(torch.uint8)  # [1, 15]: no sign bit to lose
    return (shifted[:, 0::2] << 4) | shifted[:, 1::2]


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of ``pack_int4``: (out, in // 2) uint8 -> (out, in) int8."""
    high, low = (packed >> 4).to(torch.int8) - 8, (packed & 15).to(torch.int8) - 8
    return torch.stack([high, low], -1).flatten(-2)  # (out, in): interleave back


class QuantizedWeight(nn.Module):
    """An (out, in) weight stored as int8 codes (or int4, two per byte) plus fp32 group scales.

    Tied matrices (GPT-2's embedding = LM head) share ONE of these, so the int8 copy is stored once.
    """

    def __init__(self, weight: torch.Tensor, bits: int, group_size: int | None):
        super().__init__()
        codes, scales = quantize_rows(weight, bits, group_size)
        self.bits = bits
        self.register_buffer("codes", pack_int4(codes) if bits == 4 else codes)
        self.register_buffer("scales", scales)

    def rows(self, index: torch.Tensor | None = None) -> torch.Tensor:
        """The dequantized matrix (out, in), or only the rows in ``index`` (an embedding lookup)."""
        codes = self.codes if index is None else self.codes[index.flatten()]
        scales = self.scales if index is None else self.scales[index.flatten()]
        return dequantize_rows(unpack_int4(codes) if self.bits == 4 else codes, scales)


class QuantizedLinear(nn.Module):
    """``y = x W^T + b`` with W dequantized on the fly: the saving is in storage, not in arithmetic."""

    def __init__(self, weight: QuantizedWeight, bias: torch.Tensor | None):
        super().__init__()
        self.weight_q = weight
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight_q.rows().to(x.dtype), self.bias)  # (..., out)


class QuantizedEmbedding(nn.Module):
    """Embedding lookup that dequantizes only the looked-up rows."""

    def __init__(self, weight: QuantizedWeight):
        super().__init__()
        self.weight_q = weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.weight_q.rows(ids).view(*ids.shape, -1)  # (..., dim)


def quantize(model: nn.Module, bits: int = 8, group_size: int | None = None) -> nn.Module:
    """A copy of ``model`` whose Linear, GPT-2 Conv1D and Embedding weights are stored as int8 or int4.

    Weight-only, symmetric, per output row (``group_size`` None) or per group of ``group_size`` inputs
    (int4 needs groups: try 32). GPT-2's ``Conv1D`` keeps its weight as (in, out), the transpose of
    ``nn.Linear``: it is transposed before quantizing, and the result is an ordinary linear layer.
    Plain PyTorch, so it runs on any device, and it saves bytes, not time (it dequantizes in Python). The
    maintained production tool is torchao's ``quantize_``, whose fused kernels also save time on GPUs.
    """
    if bits == 4 and group_size is None:
        raise ValueError("int4 with one scale per row loses too much; pass a group_size such as 32")
    quantized = copy.deepcopy(model)
    shared: dict[int, QuantizedWeight] = {}  # id of the original weight -> its quantized form (ties stay tied)

    def weight_of(param: torch.Tensor, matrix: torch.Tensor) -> QuantizedWeight:
        if id(param) not in shared:
            shared[id(param)] = QuantizedWeight(matrix, bits, group_size)
        return shared[id(param)]

    for parent in list(quantized.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                replacement = QuantizedLinear(weight_of(child.weight, child.weight), child.bias)
            elif isinstance(child, Conv1D):
                replacement = QuantizedLinear(weight_of(child.weight, child.weight.t()), child.bias)
            elif isinstance(child, nn.Embedding):
                replacement = QuantizedEmbedding(weight_of(child.weight, child.weight))
            else:
                continue
            setattr(parent, name, replacement)
    return quantized
