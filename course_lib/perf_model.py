"""A performance model of one forward pass, with every term measured on this machine.

    time of a forward  ~  ops x op_s   +   bytes / bandwidth   +   flops / flop_rate
                          (fixed cost)     (memory)                (compute)

``measure_machine`` measures the three rates here (the op cost on a narrow twin of the model: its own code, with
nothing to compute), ``decode_step_counts`` and ``prefill_counts`` count what one call of a forward does (torch ops
dispatched, matmul and attention FLOPs, bytes of weights and KV cache read), and ``predict`` adds the terms.
The largest term names what bounds the forward: a small model at batch 1 is bound by the fixed cost of its many
small ops, a large one by streaming its weights from memory, a large batch or a long prompt by compute.

    machine = measure_machine(model)
    step, counts = decode_step_counts(model, batch=1, context=64)
    predict(machine, counts)          # Prediction(overhead_s=..., memory_s=..., compute_s=...)
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from course_lib.checks import check_arg, is_integer
from course_lib.decoding import decode_step, new_cache, prefill
from course_lib.devices import model_device
from course_lib.kv_cache import measured_bytes
from course_lib.minigpt import MiniGPT
from course_lib.models import check_fits
from course_lib.timing import benchmark, weight_bytes


@dataclass(frozen=True)
class Machine:
    """The three rates of the model, measured on one device for one model's code."""

    op_s: float       # seconds per torch op of the model's own code path: Python, the dispatcher, a tiny kernel
    bandwidth: float  # bytes/s a matrix-vector product streams weights from memory
    flop_rate: float  # FLOP/s of the fastest large float32 matmul measured


@dataclass(frozen=True)
class Counts:
    """What one call of a forward does."""

    ops: int    # torch ops dispatched
    flops: int  # floating-point operations of its matmuls and attention
    bytes: int  # bytes it must read: every weight once, plus the KV cache

    @property
    def intensity(self) -> float:
        """Arithmetic intensity: FLOPs per byte read (the roofline's x axis)."""
        return self.flops / self.bytes


@dataclass(frozen=True)
class Prediction:
    """The three terms of the model, in seconds."""

    overhead_s: float
    memory_s: float
    compute_s: float

    @property
    def total_s(self) -> float:
        return self.overhead_s + self.memory_s + self.compute_s

    @property
    def bound(self) -> str:
        """The largest term: "overhead", "memory" or "compute"."""
        terms = {"overhead": self.overhead_s, "memory": self.memory_s, "compute": self.compute_s}
        return max(terms, key=terms.get)


def predict(machine: Machine, counts: Counts) -> Prediction:
    """ops x op_s + bytes / bandwidth + flops / flop_rate, term by term."""
    return Prediction(counts.ops * machine.op_s, counts.bytes / machine.bandwidth,
                      counts.flops / machine.flop_rate)


def fastest_s(fn: Callable[[], object], repeats: int = 5, device: torch.device | str = "cpu") -> float:
    """The fastest of ``repeats`` timed calls of ``fn`` after one warm-up call (seconds, the course timer): the
    machine's own cost, with as little of other programs' interference as one run can get."""
    return benchmark(fn, repeats=repeats, device=device).min_s


def measure_dispatch_s(device: torch.device | str = "cpu", ops: int = 2000, repeats: int = 5) -> float:
    """Seconds per op of ``ops`` additions of two 8-element tensors: what torch's dispatcher and a tiny kernel
    cost on their own, without a model's Python code around them (on a GPU, the launch)."""
    x = torch.ones(1, 8, device=device)

    def many_ops():
        for _ in range(ops):
            torch.add(x, x)

    return fastest_s(many_ops, repeats, device) / ops


def measure_bandwidth(device: torch.device | str = "cpu", n_bytes: int = 2**28, repeats: int = 5) -> float:
    """Bytes/s of a matrix-vector product with an ``n_bytes`` matrix (256 MiB, far larger than any CPU cache):
    a decode step's matmuls read each weight once for one row of activations, at this rate at best."""
    side = int((n_bytes // 4) ** 0.5)
    weight, x = torch.randn(side, side, device=device), torch.randn(1, side, device=device)
    return weight.nbytes / fastest_s(lambda: x @ weight, repeats, device)


def matmul_flop_rates(sizes: Sequence[int] = (128, 256, 512, 1024), device: torch.device | str = "cpu",
                      repeats: int = 5) -> dict[int, float]:
    """FLOP/s of an (n, n) @ (n, n) float32 matmul (2 n^3 FLOPs) for each n in ``sizes``."""
    rates = {}
    for n in sizes:
        a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
        rates[n] = 2 * n**3 / fastest_s(lambda: a @ b, repeats, device)
    return rates


def narrow_twin(model):
    """The same architecture with one or two numbers per attention head (and an MLP as narrow): the same ops in the same
    code as ``model``, on tensors so small that their bytes and FLOPs cost nothing. Random weights."""
    if isinstance(model, MiniGPT):
        cfg = model.config
        twin = MiniGPT(replace(cfg, n_embd=cfg.n_head))
    else:
        cfg = copy.deepcopy(model.config)
        if hasattr(cfg, "n_embd"):  # GPT-2
            cfg.n_embd, cfg.n_inner = cfg.n_head, 4 * cfg.n_head
        else:  # Llama-like: two numbers per head, as rotary embeddings turn pairs
            cfg.hidden_size = cfg.intermediate_size = 2 * cfg.num_attention_heads
            cfg.head_dim = 2
        twin = type(model)(cfg)
    return twin.to(model_device(model)).eval()


def measure_op_s(model, repeats: int = 5) -> float:
    """Seconds per op of ``model``'s own code: a decode step of its narrow twin (batch 1, 8 cached tokens),
    whose bytes and FLOPs are negligible, divided by the ops it dispatches."""
    step, counts = decode_step_counts(narrow_twin(model), batch=1, context=8)
    return fastest_s(step, repeats, model_device(model)) / counts.ops


def measure_machine(model, repeats: int = 5) -> Machine:
    """The three rates on ``model``'s device, the op cost for ``model``'s code (a few seconds on a CPU)."""
    device = model_device(model)
    return Machine(measure_op_s(model, repeats), measure_bandwidth(device, repeats=repeats),
                   max(matmul_flop_rates(device=device, repeats=repeats).values()))


class _OpCounter(TorchDispatchMode):
    """Counts the torch ops that reach the dispatcher while it is active."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def _attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of the CPU's attention kernel: the same two matmuls as the GPU kernels torch's counter knows."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


_CPU_ATTENTION = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _attention_flops}


def count_ops_and_flops(fn: Callable[[], object]) -> tuple[int, int]:
    """(torch ops dispatched, FLOPs of matmuls and attention counted by ``torch.utils.flop_counter``) of one
    call of ``fn``."""
    with FlopCounterMode(display=False, custom_mapping=_CPU_ATTENTION) as flops, _OpCounter() as ops:
        fn()
    return ops.ops, flops.get_total_flops()


def _prompt(model, batch: int, tokens: int) -> torch.Tensor:
    """(batch, tokens) token ids on the model's device; speed does not depend on which ids they are."""
    check_arg("batch", batch, is_integer(batch) and batch >= 1, "an integer >= 1")
    check_arg("tokens", tokens, is_integer(tokens) and tokens >= 1, "an integer >= 1")
    check_fits(model, tokens, what=f"{tokens} tokens")
    ids = torch.arange(batch * tokens, device=model_device(model)).view(batch, tokens)
    return (ids * 7 + 3) % model.config.vocab_size


def decode_step_counts(model, batch: int, context: int) -> tuple[Callable[[], torch.Tensor], Counts]:
    """A decode step of ``batch`` rows that reads ``context`` cached tokens, repeatable (each call writes one
    position into the cache and crops it out again), and what one call of it does."""
    ids = _prompt(model, batch, context + 1)
    cache = new_cache(model)
    prefill(model, ids[:, :-1], cache=cache)
    last = ids[:, -1:]  # (B, 1)

    def step() -> torch.Tensor:
        logits = decode_step(model, last, cache=cache)  # (B, vocab)
        cache.crop(-1)
        return logits

    ops, flops = count_ops_and_flops(step)
    return step, Counts(ops, flops, weight_bytes(model) + measured_bytes(cache))


def prefill_counts(model, batch: int, tokens: int) -> tuple[Callable[[], torch.Tensor], Counts]:
    """A prefill of ``batch`` prompts of ``tokens`` tokens into a fresh cache, and what one call of it does."""
    ids = _prompt(model, batch, tokens)
    run = lambda: prefill(model, ids, cache=new_cache(model))  # noqa: E731
    ops, flops = count_ops_and_flops(run)
    return run, Counts(ops, flops, weight_bytes(model))


@dataclass(frozen=True)
class Row:
    """One forward: what it does, what the model predicts, what it took."""

    name: str
    counts: Counts
    prediction: Prediction
    measured_s: float


def prediction_table(model, machine: Machine, batch_sizes: Sequence[int] = (1, 4, 16, 64), context: int = 64,
                     prompt_tokens: Sequence[int] = (64,), repeats: int = 5) -> list[Row]:
    """Decode steps at each batch size (reading ``context`` cached tokens) and prefills of ``prompt_tokens``,
    each predicted and measured (fastest of ``repeats``)."""
    check_arg("batch_sizes", batch_sizes, len(batch_sizes) > 0, "at least one batch size")
    device = model_device(model)
    runs = [(f"decode, batch {b}", *decode_step_counts(model, b, context)) for b in batch_sizes]
    runs += [(f"prefill, {t} tokens", *prefill_counts(model, 1, t)) for t in prompt_tokens]
    return [Row(name, counts, predict(machine, counts), fastest_s(fn, repeats, device)) for name, fn, counts in runs]


def table_markdown(rows: Sequence[Row]) -> str:
    """The rows as a markdown table: counts, the three predicted terms, predicted and measured milliseconds."""
    lines = ["| forward | ops | MFLOP | MB read | overhead ms | memory ms | compute ms | predicted ms | measured ms "
             "| measured / predicted | bound by |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        p = r.prediction
        lines.append(f"| {r.name} | {r.counts.ops} | {r.counts.flops / 1e6:.1f} | {r.counts.bytes / 1e6:.1f} | "
                     f"{p.overhead_s * 1e3:.2f} | {p.memory_s * 1e3:.2f} | {p.compute_s * 1e3:.2f} | "
                     f"{p.total_s * 1e3:.2f} | {r.measured_s * 1e3:.2f} | {r.measured_s / p.total_s:.2f} | {p.bound} |")
    return "\n".join(lines)
