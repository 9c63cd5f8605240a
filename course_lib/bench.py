"""``course bench``: the course's benchmark suite in one run, printed as one markdown report.

    course bench            # the full suite (about 15 minutes on 2 CPU cores)
    course bench --quick    # fewer tokens, repeats and requests (about a minute)

Each section times its variants side by side in one interleaved run (``course_lib.timing.compare``): ratios
are fastest run over fastest run, medians show what a typical run paid. Every fast variant is checked to give
the same tokens as its baseline before it is timed. The first line names the machine, so tables from different
machines can be told apart.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
from tqdm.auto import tqdm

from course_lib.checks import check_arg
from course_lib.data import encode_prompt
from course_lib.devices import device_name, get_device
from course_lib.timing import Comparison, compare

if TYPE_CHECKING:
    from course_lib.minigpt import MiniGPT

# The decoders, models and servers are imported inside run_suite: `course --help` (which reads SECTIONS) stays
# fast, without loading transformers.

SECTIONS = ("perf-model", "kv-cache", "fast-path", "batching", "serving", "speculative", "quantized", "scale")


@dataclass(frozen=True)
class Settings:
    new_tokens: int = 240
    repeats: int = 5
    batch: int = 16  # the "batching" section's large batch
    requests: int = 64  # the "serving" workload
    max_new: int = 200  # its longest output
    max_batch: int = 8  # places in a serving batch
    tokens_per_call: int = 8  # the compiled fast path's tokens per call
    compile: bool = True  # time the compiled fast path too (compiling takes minutes on a small CPU)
    model_batches: tuple[int, ...] = (1, 4, 16, 64)  # the performance model's decode steps
    sizes: int = 4  # the scale sweep's sizes: the first ones of course_lib.scale.SHAPES
    sweep_tokens: int = 48  # new tokens per generation in the scale sweep


QUICK = Settings(new_tokens=64, repeats=2, batch=8, requests=16, max_new=64, max_batch=4, compile=False,
                 model_batches=(1, 16), sizes=2, sweep_tokens=8)


def machine_line(device: torch.device) -> str:
    """CPU model, cores, threads, torch version, the device and the dtype: the facts a reader needs to compare."""
    return (f"machine: {device_name('cpu')}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads | "
            f"torch {torch.__version__} | device {device} ({device_name(device)}) | float32")


def _ticking(variants: dict[str, Callable], bar) -> dict[str, Callable]:
    """The same variants, each advancing the progress bar when it returns."""
    def tick(fn):
        def run():
            out = fn()
            bar.update()
            return out
        return run
    return {name: tick(fn) for name, fn in variants.items()}


def _checked(variants: dict[str, Callable], reference: torch.Tensor) -> dict[str, Callable]:
    """Refuse to time a variant whose tokens differ from the baseline's (each returns (B, T + new) ids)."""
    for name, fn in variants.items():
        out = fn()
        if not torch.equal(out, reference[:, : out.shape[1]]):
            raise AssertionError(f"bench: {name!r} does not give the baseline's tokens")
    return variants


def _section(title: str, table: Comparison, notes: str = "") -> str:
    return f"### {title}\n\n{table.to_markdown()}\n" + (f"\n{notes}\n" if notes else "")


def run_suite(settings: Settings = Settings(), device: str | None = None, sections=SECTIONS) -> str:
    """Run the chosen ``sections`` and return the report (markdown)."""
    from course_lib.decoding import greedy_no_sync, greedy_search, speculative_generate
    from course_lib.fastpath import fast_greedy, fast_speculative
    from course_lib.minigpt import MiniGPT
    from course_lib.models import check_fits, load_model
    from course_lib.quantize import quantize

    unknown = [name for name in sections if name not in SECTIONS]
    check_arg("sections", unknown or sections, not unknown and len(sections) > 0, f"names among {', '.join(SECTIONS)}")
    dev = get_device(device)
    hf, tokenizer = load_model("storyteller", device=dev)
    target = MiniGPT.from_hf(hf)  # the same weights, for the course's own loops
    ids = torch.tensor([encode_prompt(tokenizer, "Once upon a time, a little fox")], device=dev)  # (1, 9): BOS first
    mask = torch.ones_like(ids)
    n, reps = settings.new_tokens, settings.repeats
    check_fits(hf, ids.shape[1] + n + 4, what=f"the prompt ({ids.shape[1]} tokens) + new_tokens + 4 guesses")
    greedy = dict(attention_mask=mask, max_new_tokens=n, do_sample=False, eos_token_id=None)  # exactly n tokens
    reference = hf.generate(ids, **greedy)
    parts = [f"# course bench ({time.strftime('%Y-%m-%d')})", "", machine_line(dev), ""]
    variants_in = {"kv-cache": 2, "fast-path": 5 + settings.compile, "batching": 2, "speculative": 5, "quantized": 2}
    runs = sum(variants_in.get(name, 0) * (reps + 1) for name in sections) + 4 * ("serving" in sections)
    bar = tqdm(desc="course bench", unit="run", total=runs)  # a timed run, or one serving policy

    def timed(variants, **kw) -> Comparison:
        return compare(_ticking(variants, bar), repeats=reps, device=dev, **kw)

    if "perf-model" in sections:
        parts.append(_perf_model_section({"transformers GPT-2": hf, "MiniGPT": target}, settings))
    if "kv-cache" in sections:
        table = timed({"no KV cache": lambda: hf.generate(ids, **greedy, use_cache=False),
                       "KV cache": lambda: hf.generate(ids, **greedy)}, new_tokens=n)
        parts.append(_section(f"KV cache: storyteller, batch 1, {n} new tokens", table))
    if "fast-path" in sections:
        tpc = settings.tokens_per_call
        variants = {
            "generate()": lambda: hf.generate(ids, **greedy),
            "course loop (greedy_search, transformers model)": lambda: greedy_search(
                hf, ids, max_new_tokens=n, eos_token_id=[]).sequences,
            "MiniGPT, no host sync, static cache": lambda: greedy_no_sync(target, ids, max_new_tokens=n,
                                                                         cache="static").sequences,
            "lean step": lambda: fast_greedy(target, ids, max_new_tokens=n).sequences,
            f"lean step, {tpc} tokens per call": lambda: fast_greedy(target, ids, max_new_tokens=n,
                                                                     tokens_per_call=tpc).sequences,
        }
        notes = "The compiled step is left out (--quick)."
        if settings.compile:
            start = time.perf_counter()
            fast_greedy(target, ids, max_new_tokens=n, compile=True, tokens_per_call=tpc)
            notes = f"Compiling took {time.perf_counter() - start:.1f} s (not in the times)."
            variants[f"compiled, {tpc} tokens per call"] = lambda: fast_greedy(
                target, ids, max_new_tokens=n, compile=True, tokens_per_call=tpc).sequences
        parts.append(_section(f"Fast path: storyteller, batch 1, {n} new tokens, identical greedy tokens",
                             timed(_checked(variants, reference), new_tokens=n), notes))
    if "batching" in sections:
        rows, big = ids.expand(settings.batch, -1), f"batch {settings.batch}"
        table = timed({"batch 1": lambda: greedy_no_sync(target, ids, max_new_tokens=n).sequences,
                       big: lambda: greedy_no_sync(target, rows, max_new_tokens=n).sequences},
                      new_tokens={"batch 1": n, big: settings.batch * n})
        gain = table[big].tokens_per_s / table["batch 1"].tokens_per_s
        parts.append(_section(f"Batching: MiniGPT, {n} new tokens per row (tokens/s counts every row)", table,
                             f"{big}: {gain:.2f}x the tokens/s of batch 1 (the speed column compares the time of "
                             f"one call, which makes {settings.batch}x the tokens)."))
    if "serving" in sections:
        parts.append(_serving_section(target, hf, tokenizer, settings, bar))
    if "speculative" in sections:
        drafts = {name: MiniGPT.from_hf(load_model(name, device=dev)[0]) for name in ("draft", "draft_distilled")}
        variants = {"target alone, generate()": lambda: hf.generate(ids, **greedy),
                    "target alone, lean step": lambda: fast_greedy(target, ids, max_new_tokens=n).sequences,
                    "speculative, course loop, draft, k=4": lambda: speculative_generate(
                        target, ids, draft=drafts["draft"], k=4, max_new_tokens=n, eos_token_id=[]).sequences}
        for name, d in drafts.items():
            variants[f"speculative, lean steps, {name}, k=4"] = lambda d=d: fast_speculative(
                target, ids, draft=d, k=4, max_new_tokens=n).sequences
        table = timed(_checked(variants, reference), new_tokens=n)
        notes = []
        for name, d in drafts.items():
            run = fast_speculative(target, ids, draft=d, k=4, max_new_tokens=n)
            ratio = table.ratio(f"speculative, lean steps, {name}, k=4") / table.ratio("target alone, lean step")
            notes.append(f"{name}: acceptance rate {run.acceptance_rate:.3f}, {run.tokens_per_target_call:.2f} tokens "
                         f"per target forward, {ratio:.2f}x the lean target alone.")
        parts.append(_section(f"Speculative decoding: storyteller + drafts, {n} new tokens, identical greedy tokens",
                             table, " ".join(notes)))
    if "quantized" in sections:
        int8 = quantize(hf, bits=8)
        table = timed({"fp32": lambda: hf.generate(ids, **greedy),
                       "int8 weights": lambda: int8.generate(ids, **greedy)}, new_tokens=n)
        parts.append(_section(f"Quantized weights: storyteller, generate(), {n} new tokens", table))
    if "scale" in sections:
        pair = fast_speculative(target, ids, draft=MiniGPT.from_hf(load_model("draft", device=dev)[0]), k=4,
                                max_new_tokens=n)
        draft = MiniGPT.from_hf(load_model("draft", device="cpu")[0])  # the sweep runs on the CPU
        parts.append(_scale_section(settings, draft, pair.acceptance_rate))
    bar.close()
    return "\n".join(parts)


def _perf_model_section(models: dict, s: Settings) -> str:
    """The performance model's three rates, then its predictions beside the measured forwards of each model."""
    from course_lib import perf_model
    from course_lib.devices import model_device

    device = model_device(next(iter(models.values())))
    lines = ["### Performance model: time ~ ops x op cost + bytes / bandwidth + FLOPs / FLOP rate", "",
             f"Bare torch op (two 8-number tensors added): {perf_model.measure_dispatch_s(device) * 1e6:.1f} us. "
             "Each model's op cost is measured on its narrow twin (the same code with almost nothing to compute).",
             ""]
    for name, model in models.items():
        machine = perf_model.measure_machine(model, repeats=s.repeats)
        rows = perf_model.prediction_table(model, machine, s.model_batches, context=64, repeats=s.repeats)
        lines += [f"{name}: {machine.op_s * 1e6:.1f} us per op, weights streamed at {machine.bandwidth / 1e9:.1f} "
                  f"GB/s, matmuls at {machine.flop_rate / 1e9:.0f} GFLOP/s (64 cached tokens per row).", "",
                  perf_model.table_markdown(rows), ""]
    return "\n".join(lines)


def _scale_section(s: Settings, draft: MiniGPT, acceptance: float) -> str:
    """Speed against model size (random GPT-2-shaped weights, CPU): where each technique starts to pay."""
    from course_lib.scale import SHAPES, sweep, sweep_markdown

    rows = sweep(SHAPES[:s.sizes], new_tokens=s.sweep_tokens, repeats=s.repeats, compile=s.compile, draft=draft,
                 acceptance=acceptance)
    return (f"### Scale: GPT-2-shaped models with random weights, CPU, batch 1, {s.sweep_tokens} new tokens\n\n"
            f"{sweep_markdown(rows)} Speculative decoding is the formula's prediction with the bundled draft's step "
            f"cost against each size's (c) and the bundled pair's acceptance rate {acceptance:.3f}, k = 4.\n")


def _serving_section(target: MiniGPT, hf, tokenizer, s: Settings, bar) -> str:
    """One run of each serving policy on the same workload (too long to repeat); every output checked."""
    from course_lib.kv_cache import kv_cache_bytes
    from course_lib.serving import make_workload, serve, transformers_serve

    requests = make_workload(tokenizer, n=s.requests, max_new=s.max_new, seed=0)
    results = []
    for policy in ("one-at-a-time", "static", "continuous"):
        results.append(serve(target, requests, max_batch=s.max_batch, policy=policy))
        bar.update()
    results.append(transformers_serve(hf, requests, max_batch=s.max_batch))
    bar.update()
    alone = results[0].outputs
    base = next(r for r in results if r.policy == "static").tokens_per_s
    cfg = target.config
    padded = kv_cache_bytes(cfg.n_layer, cfg.n_head, cfg.head_dim,
                            max(len(r.prompt) + r.max_new_tokens for r in requests), s.max_batch)
    lines = [f"### Serving: {len(requests)} requests, outputs {min(r.max_new_tokens for r in requests)}-"
             f"{max(r.max_new_tokens for r in requests)} tokens, at most {s.max_batch} at once", "",
             "| policy | new tokens/s | vs static | mean latency s | p95 latency s | same tokens as one at a time |",
             "|---|---|---|---|---|---|"]
    for r in results:
        same = sum(r.outputs[i] == alone[i] for i in alone)
        lines.append(f"| {r.policy} | {r.tokens_per_s:.0f} | {r.tokens_per_s / base:.2f}x | {r.mean_latency_s:.2f} | "
                     f"{r.p95_latency_s:.2f} | {same}/{len(alone)} |")
    paged = max(results[2].kv_bytes)
    lines += ["", f"KV memory, continuous batching: at most {paged / 2**20:.1f} MiB of paged blocks in use, against "
                  f"{padded / 2**20:.1f} MiB for a cache padded to the longest request in every place.", ""]
    return "\n".join(lines)
