"""Measuring generation: where the time of a decode step goes, what a cache or a batch buys, what a model
variant costs. Built on the course timer (``course_lib.timing``).

    costs = cost_per_token(model, ids, positions=[32, 64, 128])      # one token, with and without a KV cache
    table = report({"fp32": model, "int8": quantize(model)}, heldout, ids)
    parts = decode_time_breakdown(repeatable_decode_step(model, ids))
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

from course_lib.checks import check_arg, is_integer
from course_lib.decoding import decode_step, greedy_no_sync, new_cache, prefill
from course_lib.decoding.steps import forward, last_logits
from course_lib.devices import model_device, to_model_device
from course_lib.metrics import heldout_loss
from course_lib.timing import BenchResult, benchmark, compare, weight_bytes

# ----------------------------------------------------------------------------- model variants side by side


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
    cache = new_cache(model)
    prefill(model, input_ids[:, :-1], cache=cache)
    last = input_ids[:, -1:]  # (1, 1)

    def step() -> torch.Tensor:
        logits = decode_step(model, last, cache=cache)  # (1, vocab)
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
    check_arg("repeats", repeats, is_integer(repeats) and repeats >= 1, "an integer >= 1")
    check_arg("threads", threads, threads is None or is_integer(threads) and threads >= 1,
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


# ----------------------------------------------------------------------------- what a cache and a batch buy


def cost_per_token(model, ids: torch.Tensor, positions: Sequence[int], repeats: int = 3) -> dict[str, list[float]]:
    """Median seconds to produce the token after position p, for each p in ``positions``, with and without a cache.

    Without a cache that is a forward pass over all p + 1 tokens of ``ids`` (1, >= max(positions) + 1); with
    one, a single decode step reading p cached tokens.
    """
    if max(positions) + 1 > ids.shape[1]:
        raise ValueError(f"positions up to {max(positions)} need {max(positions) + 1} tokens; ids has {ids.shape[1]}")
    ids = to_model_device(model, ids)  # once, outside the timed calls
    costs: dict[str, list[float]] = {"no cache": [], "KV cache": []}
    for p in positions:
        cache = new_cache(model)
        prefill(model, ids[:, :p], cache=cache)

        def cached_step(p=p, cache=cache):
            logits = decode_step(model, ids[:, p : p + 1], cache=cache)
            cache.crop(-1)  # forget the token just written, so every repeat does the same work
            return logits

        @torch.inference_mode()
        def uncached(p=p):
            return last_logits(forward(model, ids[:, : p + 1], None, None))  # the whole sequence again

        result = compare({"no cache": uncached, "KV cache": cached_step}, repeats=repeats, device=ids.device)
        for name in costs:
            costs[name].append(result[name].median_s)
    return costs


def throughput_by_batch(model, ids: torch.Tensor, batch_sizes: Sequence[int], max_new_tokens: int,
                        repeats: int = 3) -> list[BenchResult]:
    """Time generation for each batch size on the first b rows of ``ids`` (N, T), equal-length prompts.

    Each result counts b x max_new_tokens new tokens (``tokens_per_s`` is the server's throughput); its
    ``median_s`` is also the latency of every request in the batch (all wait for the slowest step).
    """
    if max(batch_sizes) > ids.shape[0]:
        raise ValueError(f"largest batch size {max(batch_sizes)} needs that many prompt rows; ids has {ids.shape[0]}")
    ids = to_model_device(model, ids)  # once, outside the timed calls
    return [benchmark(lambda b=b: greedy_no_sync(model, ids[:b], max_new_tokens=max_new_tokens), name=f"batch {b}",
                      repeats=repeats, new_tokens=b * max_new_tokens, device=ids.device) for b in batch_sizes]
