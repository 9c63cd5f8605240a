"""The course's one benchmark helper: warm-up, device sync, repeats, tokens/s of NEW tokens, GB/s, ratios.

    result = benchmark(lambda: model.generate(**inputs, max_new_tokens=64), new_tokens=64)
    table = compare({"no cache": run_without, "cache": run_with}, new_tokens=64)
    table.ratio("cache")          # how many times faster than the baseline (the first variant), fastest runs
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

from course_lib.checks import check_arg, is_integer
from course_lib.devices import synchronize

TokenCount = int | Callable[[Any], int]


@dataclass
class BenchResult:
    """Wall-clock times of repeated runs of one variant (seconds), plus what each run produced."""

    name: str
    times_s: list[float] = field(default_factory=list)
    new_tokens: int = 0  # new tokens produced by one run (prompt tokens do not count)
    bytes_moved: int | None = None  # bytes one run must read (e.g. weights x decode steps)

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)

    @property
    def min_s(self) -> float:
        return min(self.times_s)

    @property
    def max_s(self) -> float:
        return max(self.times_s)

    @property
    def tokens_per_s(self) -> float | None:
        return self.new_tokens / self.median_s if self.new_tokens else None

    @property
    def gb_per_s(self) -> float | None:
        return self.bytes_moved / self.median_s / 1e9 if self.bytes_moved else None

    def __str__(self) -> str:
        text = f"{self.name}: median {self.median_s * 1e3:.1f} ms (min {self.min_s * 1e3:.1f}, max {self.max_s * 1e3:.1f})"
        if self.tokens_per_s:
            text += f", {self.tokens_per_s:.1f} new tokens/s"
        if self.gb_per_s:
            text += f", {self.gb_per_s:.2f} GB/s"
        return text


def _count(new_tokens: TokenCount, output: Any) -> int:
    return new_tokens(output) if callable(new_tokens) else int(new_tokens)


def _timed(fn: Callable[[], Any], device: str | torch.device) -> tuple[float, Any]:
    synchronize(device)
    start = time.perf_counter()
    output = fn()
    synchronize(device)
    return time.perf_counter() - start, output


def _each(value) -> list:
    """The values of a per-variant mapping, or the one shared value."""
    return list(value.values()) if isinstance(value, Mapping) else [value]


def _check_settings(warmup: int, repeats: int, new_tokens, bytes_moved) -> None:
    """Clear errors for the settings ``benchmark`` and ``compare`` share (per-variant mappings item by item)."""
    check_arg("warmup", warmup, is_integer(warmup) and warmup >= 0, "an integer >= 0")
    check_arg("repeats", repeats, is_integer(repeats) and repeats >= 1, "an integer >= 1")
    for count in _each(new_tokens):
        check_arg("new_tokens", count, callable(count) or is_integer(count) and count >= 0,
              "an integer >= 0, or a function of fn's return value that counts the new tokens")
    for size in _each(bytes_moved):
        check_arg("bytes_moved", size, size is None or is_integer(size) and size >= 0, "an integer >= 0 or None")


@torch.inference_mode()
def benchmark(fn: Callable[[], Any], *, name: str = "run", warmup: int = 1, repeats: int = 5,
              new_tokens: TokenCount = 0, bytes_moved: int | None = None,
              device: str | torch.device = "cpu") -> BenchResult:
    """Time ``fn()``: ``warmup`` untimed calls, then ``repeats`` timed ones, syncing ``device`` around each.

    ``new_tokens`` is the count of generated tokens per call, or a function of ``fn``'s return value that
    counts them.
    """
    _check_settings(warmup, repeats, new_tokens, bytes_moved)
    for _ in range(warmup):
        fn()
    result = BenchResult(name, bytes_moved=bytes_moved)
    for _ in range(repeats):
        seconds, output = _timed(fn, device)
        result.times_s.append(seconds)
        result.new_tokens = _count(new_tokens, output)
    return result


@dataclass
class Comparison:
    """Several variants measured side by side in one run; ratios are speed-ups over the baseline."""

    results: list[BenchResult]
    baseline: str

    def __getitem__(self, name: str) -> BenchResult:
        for r in self.results:
            if r.name == name:
                return r
        raise KeyError(f"no variant {name!r}; measured: {', '.join(r.name for r in self.results)}")

    def ratio(self, name: str) -> float:
        """How many times faster ``name`` ran than the baseline: fastest run over fastest run.

        The code does the same work every run; on a shared machine noise (other processes, the hypervisor)
        only ever adds time, so the fastest run is the steadiest estimate of what each variant costs. The
        medians, in the table next to it, show how much a typical run paid on top.
        """
        return self[self.baseline].min_s / self[name].min_s

    def to_markdown(self) -> str:
        rows = ["| variant | median ms | min ms | max ms | new tokens/s | GB/s | speed vs " + self.baseline + " (min) |",
                "|---|---|---|---|---|---|---|"]
        for r in self.results:
            tps = f"{r.tokens_per_s:.1f}" if r.tokens_per_s else "-"
            gbs = f"{r.gb_per_s:.2f}" if r.gb_per_s else "-"
            rows.append(f"| {r.name} | {r.median_s * 1e3:.1f} | {r.min_s * 1e3:.1f} | {r.max_s * 1e3:.1f} | "
                        f"{tps} | {gbs} | {self.ratio(r.name):.2f}x |")
        return "\n".join(rows)

    def _repr_markdown_(self) -> str:
        return self.to_markdown()

    def __str__(self) -> str:
        return "\n".join(f"{r}  [{self.ratio(r.name):.2f}x vs {self.baseline}]" for r in self.results)


@torch.inference_mode()
def compare(variants: Mapping[str, Callable[[], Any]], *, baseline: str | None = None, warmup: int = 1,
            repeats: int = 5, new_tokens: TokenCount | Mapping[str, TokenCount] = 0,
            bytes_moved: Mapping[str, int] | None = None, device: str | torch.device = "cpu") -> Comparison:
    """Benchmark variants in one run, interleaving their repeats so that drift hits all of them alike.

    ``baseline`` defaults to the first variant. ``new_tokens`` is one count for all, or one per variant.
    """
    _check_settings(warmup, repeats, new_tokens, bytes_moved)
    if not variants:
        raise ValueError("compare() needs at least one variant")
    baseline = baseline or next(iter(variants))
    if baseline not in variants:
        raise ValueError(f"baseline {baseline!r} is not among the variants {list(variants)}")
    results = {n: BenchResult(n, bytes_moved=(bytes_moved or {}).get(n)) for n in variants}
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    for _ in range(repeats):
        for name, fn in variants.items():
            seconds, output = _timed(fn, device)
            results[name].times_s.append(seconds)
            counts = new_tokens.get(name, 0) if isinstance(new_tokens, Mapping) else new_tokens
            results[name].new_tokens = _count(counts, output)
    return Comparison(list(results.values()), baseline)


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of parameters and buffers: what one decode step must read from memory at batch 1."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:  # tied weights (embedding = LM head) count once
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total
