"""Make a trained model cheaper to run: precision, weight quantization, pruning. Each returns a changed COPY.

    fast = with_precision(model, "bf16")          # half the bytes per weight
    small = quantize(model, bits=8)               # int8 codes + one scale per output row
    sparse = magnitude_prune(model, amount=0.5)   # half the block weights set to zero
    shallow = drop_layers(model, [3])             # LayerDrop-style: remove a whole block

The original stays untouched as the fp32 baseline. ``report`` measures any set of such variants side by
side: speed through the course timer, weight bytes, held-out loss and whether greedy text changed.
``decode_time_breakdown``, ``copy_bandwidth_gbs`` and ``compile_model`` say where the time goes and what
``torch.compile`` costs.
"""

from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune
from transformers import DynamicCache
from transformers.pytorch_utils import Conv1D

from course_lib.checks import check, is_integer
from course_lib.devices import model_device, to_model_device
from course_lib.models import resolve_dtype
from course_lib.timing import benchmark, compare, weight_bytes
from course_lib.train import heldout_loss

# ----------------------------------------------------------------------------- precision


def with_precision(model: nn.Module, precision: str | torch.dtype) -> nn.Module:
    """A copy of ``model`` with its weights in fp32, bf16, or (on a GPU only) fp16."""
    dtype = resolve_dtype(precision)
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"unsupported precision {precision!r}; allowed: fp32, bf16, fp16 (GPU only)")
    device = model_device(model)
    if dtype == torch.float16 and device.type != "cuda":
        raise ValueError(f"fp16 needs a GPU: CPUs have no fast fp16 matmul and the model sits on {device}; "
                         "use 'bf16' on the CPU")
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


# ----------------------------------------------------------------------------- pruning


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


# ----------------------------------------------------------------------------- measuring


@dataclass
class VariantRow:
    name: str
    speed_ratio: float  # x times the baseline's decode speed (same run, fastest runs, course timer)
    weight_bytes: int
    heldout_loss: float  # nats/token on the held-out stories
    same_text: bool  # greedy continuation identical to the baseline's


@dataclass
class Report:
    """One row per variant; the first is the baseline. Renders as a markdown table in notebooks."""

    rows: list[VariantRow]

    def __getitem__(self, name: str) -> VariantRow:
        return next(r for r in self.rows if r.name == name)

    def to_markdown(self) -> str:
        base = self.rows[0]
        lines = ["| variant | speed vs " + base.name + " | weight MB | bytes vs " + base.name
                 + " | held-out loss | loss change | greedy text |", "|---|---|---|---|---|---|---|"]
        for r in self.rows:
            lines.append(f"| {r.name} | {r.speed_ratio:.2f}x | {r.weight_bytes / 1e6:.2f} | "
                         f"{r.weight_bytes / base.weight_bytes:.2f}x | {r.heldout_loss:.4f} | "
                         f"{r.heldout_loss - base.heldout_loss:+.4f} | {'same' if r.same_text else 'changed'} |")
        return "\n".join(lines)

    def _repr_markdown_(self) -> str:
        return self.to_markdown()


def report(variants: dict[str, nn.Module], heldout_ids: torch.Tensor, input_ids: torch.Tensor,
           max_new_tokens: int = 32, repeats: int = 3, context: int = 256) -> Report:
    """Speed (greedy ``generate`` through ``compare``), bytes, held-out loss and greedy text of each variant.

    The first variant is the baseline. Speed ratios come from one interleaved run, so they are comparable.
    ``context`` is the window of the held-out loss (at most the model's maximum positions). Each variant reads
    the tokens on its own device; the timer syncs the baseline's.
    """
    if not variants:
        raise ValueError("report() needs at least one variant (the first is the baseline)")

    def greedy(model):
        ids = to_model_device(model, input_ids)
        return lambda: model.generate(ids, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                                      do_sample=False)

    runs = {name: greedy(m) for name, m in variants.items()}
    texts = {name: run() for name, run in runs.items()}
    timings = compare(runs, repeats=repeats, new_tokens=max_new_tokens,
                      device=model_device(next(iter(variants.values()))))
    baseline_text = next(iter(texts.values()))
    return Report([VariantRow(name, timings.ratio(name), weight_bytes(m), heldout_loss(m, heldout_ids, context)[0],
                              torch.equal(texts[name], baseline_text)) for name, m in variants.items()])


# ----------------------------------------------------------------------------- where the time goes

MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm",
              "aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_attention_math")


def repeatable_decode_step(model: nn.Module, input_ids: torch.Tensor) -> Callable[[], torch.Tensor]:
    """A one-token decode step that can be timed over and over: the prompt is cached once, then each call
    feeds its last token again and crops it back out of the cache, so every call does the same work."""
    input_ids = to_model_device(model, input_ids)
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        model(input_ids=input_ids[:, :-1], cache=cache, use_cache=True)
    last = input_ids[:, -1:]  # (1, 1)

    @torch.inference_mode()
    def step() -> torch.Tensor:
        logits = model(input_ids=last, cache=cache, use_cache=True).logits  # (1, 1, vocab)
        cache.crop(-1)
        return logits

    return step


def decode_time_breakdown(step: Callable[[], Any], repeats: int = 20, threads: int | None = 1) -> dict[str, float]:
    """Seconds per call of ``step`` split into matmul kernels, all other torch ops, and the rest.

    "the rest" is wall time spent outside any torch op: Python, module calls, the dispatcher between ops
    (and the profiler's own bookkeeping, so it is an upper bound). At batch 1 on a small model it dominates.
    ``threads``: CPU threads for torch during the profile (None: as set). One by default: a one-token matmul is
    too small to gain from a second thread, and with two, a kernel whose second thread is kept waiting by
    another program counts that wait as matmul time.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    check("threads", threads, threads is None or is_integer(threads) and threads >= 1,
          "an integer >= 1, or None (torch's current setting)")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads or previous)
    try:
        step()  # warm-up: first-call allocations are not the steady state
        # torch.profiler's C++ back end (Kineto) prints "USDT: ... profiler_start/stop" to stderr on every profile
        # at its default level. It reads KINETO_LOG_LEVEL once, at the first profile of the process; 6 is above
        # its highest level (USDT = 5). A level the user set is kept.
        os.environ.setdefault("KINETO_LOG_LEVEL", "6")
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            for _ in range(repeats):
                step()
            wall = time.perf_counter() - start
    finally:
        torch.set_num_threads(previous)
    events = prof.key_averages()
    matmul = sum(e.self_cpu_time_total for e in events if e.key in MATMUL_OPS) / 1e6
    all_ops = sum(e.self_cpu_time_total for e in events) / 1e6
    return {"matmul kernels": matmul / repeats, "other torch ops": (all_ops - matmul) / repeats,
            "outside torch ops": max(0.0, wall - all_ops) / repeats}


def copy_bandwidth_gbs(n_bytes: int = 2**28, repeats: int = 5) -> float:
    """Measured memory bandwidth (GB/s) of a large tensor copy: each byte is read once and written once."""
    src = torch.ones(n_bytes // 4)
    dst = torch.empty_like(src)
    result = benchmark(lambda: dst.copy_(src), name="copy", repeats=repeats, bytes_moved=2 * src.nbytes)
    return result.gb_per_s


def compile_model(model: nn.Module, warmup: Callable[[nn.Module], Any], **compile_options
                  ) -> tuple[nn.Module, float]:
    """``torch.compile(model)``, then one ``warmup(compiled)`` call; returns (compiled, seconds of that call).

    Compilation happens lazily at the first call (and again for each new input shape), so the warm-up
    seconds ARE the compile cost: report them apart from the steady-state timings.
    """
    compiled = torch.compile(model, **compile_options)
    start = time.perf_counter()
    warmup(compiled)
    return compiled, time.perf_counter() - start
