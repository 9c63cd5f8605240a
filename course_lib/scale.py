"""Speed against model size: where each way of making generation faster starts to pay.

The speed of a forward does not depend on the values of the weights, so GPT-2-shaped models with random weights
show it at any size, from the storyteller's shape to GPT-2 small's and GPT-2 medium's. Each size generates with
fp32 weights (the baseline), bf16 weights, int8 weights through a real int8 kernel (torch's dynamic quantization:
int8 matrix products, activations quantized on the fly), and the compiled lean step, side by side in one
interleaved run per size. Speculative decoding is predicted, not run: a draft needs a model that agrees with the
target, which random weights are not; its formula takes the bundled pair's acceptance rate and the cost ratio c
of the bundled draft's step to each size's step, both measured.

    rows = sweep(SHAPES[:2], new_tokens=16)
    print(sweep_markdown(rows))
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

from course_lib.checks import check_arg, is_integer
from course_lib.decoding import greedy_no_sync
from course_lib.decoding.speculative import expected_speedup
from course_lib.fastpath import fast_greedy
from course_lib.minigpt import GPTConfig, MiniGPT
from course_lib.perf_model import decode_step_counts, fastest_s
from course_lib.timing import compare, weight_bytes


@dataclass(frozen=True)
class Shape:
    name: str
    n_layer: int
    n_embd: int
    n_head: int
    vocab_size: int


SHAPES = (Shape("storyteller shape, 6 x 192", 6, 192, 6, 4096),
          Shape("12 x 384", 12, 384, 6, 4096),
          Shape("GPT-2 small, 12 x 768", 12, 768, 12, 50257),
          Shape("GPT-2 medium, 24 x 1024", 24, 1024, 16, 50257))


def random_model(shape: Shape, n_positions: int = 256) -> MiniGPT:
    """A MiniGPT of ``shape`` with seeded random weights."""
    torch.manual_seed(0)
    return MiniGPT(GPTConfig(n_layer=shape.n_layer, n_head=shape.n_head, n_embd=shape.n_embd,
                             n_positions=n_positions, vocab_size=shape.vocab_size)).eval()


def int8_dynamic(model: nn.Module) -> nn.Module:
    """A copy whose nn.Linear layers run torch's int8 kernels (int8 weights, activations quantized on the fly, int8
    matrix products): what int8 weights buy where the hardware multiplies int8.

    torch's own dynamic quantization works with the torch the course installs, on x86 and ARM CPUs, without
    another package; torch marks it deprecated in favour of torchao (the warning is silenced here), so torchao's
    ``quantize_`` is the replacement once torch drops it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", (DeprecationWarning, UserWarning))
        return torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8)


@dataclass
class SizeRow:
    """One size: its weights, tokens/s of each variant and ratios to fp32 (one interleaved run), and the
    predicted speed-up of speculative decoding."""

    shape: Shape
    parameters: int
    weight_bytes: int
    tokens_per_s: dict[str, float] = field(default_factory=dict)
    ratios: dict[str, float] = field(default_factory=dict)
    speculative: float = 0.0
    c: float = 0.0


def sweep(shapes: Sequence[Shape] = SHAPES, new_tokens: int = 48, repeats: int = 3, compile: bool = True,
          draft: MiniGPT | None = None, acceptance: float = 0.7, k: int = 4) -> list[SizeRow]:
    """Time generation at each size with each variant; predict speculative decoding from ``draft``'s step time
    (the bundled draft; a storyteller-shaped random model if None) and the pair's ``acceptance`` rate."""
    check_arg("new_tokens", new_tokens, is_integer(new_tokens) and 1 <= new_tokens <= 200, "an integer in 1..200")
    check_arg("shapes", shapes, len(shapes) > 0, "at least one Shape")
    draft = draft if draft is not None else random_model(SHAPES[0])
    draft_step_s = fastest_s(decode_step_counts(draft, 1, 8)[0], repeats=5)
    rows = []
    for shape in shapes:
        model = random_model(shape)
        ids = torch.arange(8)[None, :] * 37 % shape.vocab_size  # (1, 8): any ids do, speed does not depend on them
        bf16, int8 = copy.deepcopy(model).to(torch.bfloat16), int8_dynamic(model)
        variants = {name: (lambda m=m: greedy_no_sync(m, ids, max_new_tokens=new_tokens).sequences)
                    for name, m in [("fp32", model), ("bf16", bf16), ("int8 kernel", int8)]}
        if compile:
            fast_greedy(model, ids, max_new_tokens=new_tokens, compile=True)  # compiling is not timed
            variants["compiled lean step"] = lambda: fast_greedy(model, ids, max_new_tokens=new_tokens,
                                                                 compile=True).sequences
        table = compare(variants, repeats=repeats, new_tokens=new_tokens)
        c = draft_step_s / fastest_s(decode_step_counts(model, 1, 8)[0], repeats=5)
        rows.append(SizeRow(shape, sum(p.numel() for p in model.parameters()), weight_bytes(model),
                            {name: table[name].tokens_per_s for name in variants},
                            {name: table.ratio(name) for name in variants}, expected_speedup(acceptance, k, c), c))
    return rows


def crossovers(rows: Sequence[SizeRow]) -> dict[str, str]:
    """For each technique, the first size from which it is faster than fp32 at every larger size, or "none"."""
    techniques = [name for name in rows[0].ratios if name != "fp32"] + ["speculative (predicted)"]
    found = {}
    for name in techniques:
        faster = [(r.speculative if name.startswith("speculative") else r.ratios[name]) > 1 for r in rows]
        first = next((i for i in range(len(rows)) if all(faster[i:])), None)
        found[name] = "none of these sizes" if first is None else rows[first].shape.name
    return found


def sweep_markdown(rows: Sequence[SizeRow], k: int = 4) -> str:
    """The sweep as a markdown table (tokens/s and ratio to fp32 per variant), then the crossover sizes."""
    names = list(rows[0].ratios)
    lines = ["| size | parameters | fp32 MB | " + " | ".join(names) + f" | c (draft / target) | speculative k={k}, "
             "predicted |", "|---|---|---|" + "---|" * (len(names) + 2)]
    for r in rows:
        cells = " | ".join(f"{r.tokens_per_s[n]:.0f} tok/s ({r.ratios[n]:.2f}x)" for n in names)
        lines.append(f"| {r.shape.name} | {r.parameters / 1e6:.1f} M | {r.weight_bytes / 1e6:.0f} | {cells} | "
                     f"{r.c:.3f} | {r.speculative:.2f}x |")
    lines += ["", "Faster than fp32 from: " + "; ".join(f"{name}: {size}" for name, size in crossovers(rows).items())
              + "."]
    return "\n".join(lines)
