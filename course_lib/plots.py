"""Matplotlib figures the notebooks draw. Each function returns its Axes so a cell can add to it."""

from __future__ import annotations

import matplotlib.pyplot as plt
from matplotlib.lines import Line2D
from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter
import torch

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")  # shapes that stay distinct in print and without colour


def _axes(ax=None, figsize=(7, 3.2)):
    if ax is None:
        _, ax = plt.subplots(figsize=figsize)
    return ax


def token_label(tokenizer, token_id: int) -> str:
    """A token as a readable label: spaces shown as '␣', newlines as '⏎'."""
    text = tokenizer.decode([int(token_id)])
    return text.replace(" ", "␣").replace("\n", "⏎") or repr(text)


def next_token_bars(probs: torch.Tensor, tokenizer, k: int = 12, ax=None, title: str | None = None,
                    highlight: int | None = None):
    """Bar chart of the ``k`` most likely next tokens of a (vocab,) probability vector; tokens of probability 0
    (cut by a processor) get no bar. ``highlight`` (a token id, e.g. the one drawn) is orange, and always shown:
    when it is not among the ``k``, an extra last bar shows it with its rank."""
    ax = _axes(ax)
    probs = probs.float().cpu()
    shown = torch.topk(probs, min(k, int((probs > 0).sum()))).indices.tolist()
    labels = [token_label(tokenizer, i) for i in shown]
    if highlight is not None and highlight not in shown:
        rank = int((probs > probs[highlight]).sum()) + 1
        shown.append(highlight)
        labels.append(f"{token_label(tokenizer, highlight)} (#{rank})")
    colors = ["tab:orange" if i == highlight else "tab:blue" for i in shown]
    ax.bar(range(len(shown)), probs[shown].tolist(), color=colors)
    ax.set_xticks(range(len(shown)), labels, rotation=45, ha="right")
    ax.set_ylabel("probability")
    ax.set_title(title or f"top-{k} next tokens")
    ax.figure.tight_layout()
    return ax


def cutoff_bars(probs: torch.Tensor, kept: torch.Tensor, tokenizer, k: int = 20, ax=None, title: str | None = None):
    """The ``k`` most likely tokens of a (vocab,) distribution: kept ones blue, cut ones grey, a line at the cut."""
    ax = _axes(ax)
    top = torch.topk(probs.float().cpu(), k)
    kept_top = kept.cpu()[top.indices]  # (k,) bool, in rank order
    ax.bar(range(k), top.values.tolist(), color=["tab:blue" if keep else "lightgrey" for keep in kept_top.tolist()])
    ax.set_xticks(range(k), [token_label(tokenizer, i) for i in top.indices.tolist()], rotation=60, ha="right")
    n_kept = int(kept.sum())
    if n_kept < k and bool(kept_top[:n_kept].all()):  # the kept tokens are the n most likely: draw the cut
        ax.axvline(n_kept - 0.5, color="tab:red", linestyle="--", label=f"cut: {n_kept} of {len(probs)} kept")
        ax.legend(loc="upper right")
    ax.set_ylabel("probability")
    ax.set_title(title or f"{n_kept} tokens kept")
    ax.figure.tight_layout()
    return ax


def cumulative_curve(probs: torch.Tensor, top_p: float | None = None, max_rank: int = 60, ax=None,
                     label: str | None = None):
    """Cumulative probability of the tokens sorted from most to least likely; with ``top_p``, the nucleus cut
    (a dashed line, or an arrow at the right edge when the nucleus is larger than ``max_rank``)."""
    ax = _axes(ax)
    cumulative = torch.sort(probs.float().cpu(), descending=True).values.cumsum(0)  # (vocab,)
    line, = ax.plot(range(1, max_rank + 1), cumulative[:max_rank].tolist(), marker=".", label=label)
    if top_p is not None:
        nucleus = int((cumulative < top_p).sum()) + 1  # the token that crosses top_p is kept
        text = f"top_p={top_p}: {nucleus} token{'s' if nucleus > 1 else ''}"
        ax.axhline(top_p, color="grey", linestyle=":")
        if nucleus <= max_rank:
            ax.axvline(nucleus, color=line.get_color(), linestyle="--")
            ax.annotate(text, (nucleus, top_p), textcoords="offset points", xytext=(6, -14))
        else:
            ax.annotate(text + " →", (max_rank, cumulative[max_rank - 1].item()), textcoords="offset points",
                        xytext=(-110, 8), color=line.get_color())
    ax.set_xlabel("rank of token")
    ax.set_ylabel("cumulative probability")
    ax.set_ylim(0, 1.02)
    if label:
        ax.legend(loc="lower right")
    ax.figure.tight_layout()
    return ax


def curve(xs, ys, xlabel: str, ylabel: str, ax=None, hline: float | None = None, hline_label: str | None = None,
          label: str | None = None):
    """A measured quantity against a setting (entropy vs temperature, repetition vs penalty ...), with an
    optional horizontal reference line."""
    ax = _axes(ax)
    ax.plot(list(xs), list(ys), marker="o", label=label)
    if hline is not None:
        ax.axhline(hline, color="grey", linestyle=":", label=hline_label)
    if label or hline_label:
        ax.legend()
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.figure.tight_layout()
    return ax


def diversity_quality(points, ax=None, title: str | None = None):
    """Decoding settings as points: distinct-n (x, more = varied) vs judge perplexity (y, log, lower = fluent).

    ``points``: dicts with "diversity", "perplexity", "group" (points of one group share a colour and are
    joined by a line, e.g. one line per temperature) and "label" (points with one label share a marker shape,
    e.g. one shape per top_p). Two legends to the right of the plot name the colours and the shapes, so no
    text sits on the lines.
    """
    ax = _axes(ax, figsize=(8, 4.5))
    groups: dict = {}
    for point in points:
        groups.setdefault(point["group"], []).append(point)
    shapes = {label: MARKERS[i % len(MARKERS)] for i, label in enumerate(dict.fromkeys(p["label"] for p in points))}
    for i, (group, members) in enumerate(groups.items()):
        color = f"C{i}"
        ax.plot([p["diversity"] for p in members], [p["perplexity"] for p in members], color=color, label=group)
        for p in members:
            ax.plot(p["diversity"], p["perplexity"], marker=shapes[p["label"]], color=color, markersize=8,
                    linestyle="none")
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))  # 2, 5, 10, 20, 50: a few round numbers
    ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(NullFormatter())  # unlabelled minor ticks: labels on each one crowd together
    ax.set_xlabel("diversity: distinct-2 across samples (higher = more varied)")
    ax.set_ylabel("judge perplexity (lower = more fluent)")
    ax.set_title(title or "diversity vs quality")
    colours = ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    ax.add_artist(colours)  # a second legend() call would replace the first
    handles = [Line2D([], [], marker=shape, color="grey", linestyle="none", markersize=8) for shape in shapes.values()]
    ax.legend(handles, list(shapes), loc="lower left", bbox_to_anchor=(1.01, 0), fontsize=8)
    ax.figure.tight_layout()
    return ax


def kept_per_step(counts: dict, ax=None, title: str | None = None):
    """How many tokens each truncation rule keeps at every generation step (log scale), one line per rule."""
    ax = _axes(ax)
    for name, per_step in counts.items():
        ax.plot(range(1, len(per_step) + 1), list(per_step), marker=".", label=name)
    ax.set_yscale("log")
    ax.set_xlabel("generation step")
    ax.set_ylabel("tokens kept")
    ax.set_title(title or "tokens that survive truncation, step by step")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.figure.tight_layout()
    return ax


def beam_tree(tree, tokenizer, row: int = 0, best=None, ax=None, title: str | None = None):
    """The search tree of ``beam_search(..., record_tree=True)`` for prompt ``row``: one column per step,
    candidates ranked by cumulative log-probability (top = best). Blue: kept as a running beam; green: ended
    (EOS or length limit) among the top K; grey: pruned. ``best`` (the new token ids of a returned
    hypothesis) is drawn as a thick orange path.
    """
    width = len(tree[0].tokens[row])
    ax = _axes(ax, figsize=(1.7 * (len(tree) + 1), 0.55 * width + 1.2))
    best = [int(t) for t in best] if best is not None else None
    slots = {0: ((0, -(width - 1) / 2), ())}  # running slot -> (position, token path) at the previous step
    ax.annotate("prompt", (0, slots[0][0][1]), ha="center", va="center", fontsize=8,
                bbox=dict(boxstyle="round", fc="white", ec="black"))
    for step, record in enumerate(tree, start=1):
        new_slots = {}
        for j in range(width):
            score, token = float(record.scores[row, j]), int(record.tokens[row, j])
            if score < -1e8 or int(record.parents[row, j]) not in slots:  # empty slot or parent not drawn
                continue
            (px, py), path = slots[int(record.parents[row, j])]
            path, stopped = path + (token,), bool(record.stopped[row, j])
            kept = int(record.kept_as[row, j]) if not stopped else -1
            ended = stopped and j < int((record.kept_as[row] >= 0).sum())  # only the top K can finish
            color = "tab:blue" if kept >= 0 else "tab:green" if ended else "lightgrey"
            on_best = best is not None and list(path) == best[: len(path)]
            ax.plot([px, step], [py, -j], color="tab:orange" if on_best else color, lw=3 if on_best else 1, zorder=1)
            ax.annotate(f"{token_label(tokenizer, token)}\n{score:.2f}", (step, -j), ha="center", va="center",
                        fontsize=7, bbox=dict(boxstyle="round", fc="white", ec=color), zorder=2)
            if kept >= 0:
                new_slots[kept] = ((step, -j), path)
        slots = new_slots
    ax.set_xlim(-0.5, len(tree) + 0.5)
    ax.set_ylim(-width + 0.4, 0.6)
    ax.set_xticks(range(len(tree) + 1), ["prompt"] + [f"step {s}" for s in range(1, len(tree) + 1)])
    ax.set_yticks([])
    ax.set_title(title or "beam search tree (blue: kept, green: ended, grey: pruned)")
    ax.figure.tight_layout()
    return ax


def kv_memory(tokens, formula_by_batch: dict, measured_by_batch: dict, ax=None, title: str | None = None):
    """KV-cache size vs tokens: the formula as lines, measured tensor bytes as dots, one colour per batch size.

    ``formula_by_batch`` / ``measured_by_batch``: {batch: [bytes at each entry of tokens]}.
    """
    ax = _axes(ax)
    for i, (batch, predicted) in enumerate(formula_by_batch.items()):
        color = f"C{i}"
        ax.plot(list(tokens), [b / 2**20 for b in predicted], color=color, label=f"formula, batch {batch}")
        ax.scatter(list(tokens), [b / 2**20 for b in measured_by_batch[batch]], color=color, zorder=3,
                   label=f"measured, batch {batch}")
    ax.set_xlabel("tokens in the cache")
    ax.set_ylabel("KV cache (MiB)")
    ax.set_title(title or "KV-cache memory: 2 x layers x heads x head_dim x tokens x batch x bytes")
    ax.legend(fontsize=8)
    ax.figure.tight_layout()
    return ax


def throughput_latency(batch_sizes, tokens_per_s, latency_s, ax=None, title: str | None = None):
    """Tokens/s (left axis, bars) and latency of each request (right axis, line) against batch size."""
    ax = _axes(ax)
    labels = [str(b) for b in batch_sizes]
    ax.bar(labels, list(tokens_per_s), color="tab:blue")
    ax.set_xlabel("batch size")
    ax.set_ylabel("new tokens / s (all rows)", color="tab:blue")
    right = ax.twinx()
    right.plot(labels, list(latency_s), color="tab:red", marker="o")
    right.set_ylabel("latency per request (s)", color="tab:red")
    right.set_ylim(bottom=0)
    ax.set_title(title or "batching: throughput grows, each request waits a little longer")
    ax.figure.tight_layout()
    return ax


def batch_occupancy(occupancy: list[list[int | None]], ax=None, title: str | None = None):
    """Which request runs in each place of the batch at each step: one row per place, one colour per request,
    white where the place is idle. ``occupancy``: per step, the request id in each place (None = idle)."""
    ax = _axes(ax, figsize=(7, 0.4 * len(occupancy[0]) + 1.2))
    grid = torch.tensor([[-1 if r is None else r for r in places] for places in occupancy]).T  # (places, steps)
    shown = grid.float().masked_fill(grid < 0, float("nan"))
    cmap = plt.get_cmap("tab20").with_extremes(bad="white")
    ax.imshow((shown % 20).numpy(), aspect="auto", interpolation="nearest", cmap=cmap, vmin=0, vmax=19)
    idle = (grid < 0).float().mean().item()
    ax.set_xlabel("decode step")
    ax.set_ylabel("batch place")
    ax.set_yticks(range(grid.shape[0]))
    ax.set_title(title or f"batch occupancy: {idle:.0%} of the places idle (white)")
    ax.figure.tight_layout()
    return ax


def paged_memory(paged_bytes: list[int], padded_bytes: int, ax=None, title: str | None = None):
    """KV memory per step: the blocks a paged cache holds (a line) against a padded cache reserved up front for
    every place at the longest request's length (a flat line)."""
    ax = _axes(ax)
    ax.plot([b / 2**20 for b in paged_bytes], color="tab:blue", label="paged: blocks in use")
    ax.axhline(padded_bytes / 2**20, color="tab:red", linestyle="--", label="padded: reserved for the longest")
    ax.set_xlabel("decode step")
    ax.set_ylabel("KV cache (MiB)")
    ax.set_ylim(bottom=0)
    ax.set_title(title or "KV memory: paged blocks follow the tokens held")
    ax.legend(fontsize=8)
    ax.figure.tight_layout()
    return ax


def time_breakdown(parts: dict[str, float], ax=None, title: str | None = None):
    """One horizontal stacked bar: milliseconds per call spent in each part (e.g. matmuls vs the rest)."""
    ax = _axes(ax, figsize=(7, 1.8))
    left = 0.0
    for name, seconds in parts.items():
        ax.barh(0, seconds * 1e3, left=left, label=f"{name}: {seconds * 1e3:.2f} ms")
        left += seconds * 1e3
    ax.set_yticks([])
    ax.set_xlabel("ms per decode step")
    # To the right of the bar, one entry per line: below it, the legend would sit on the x label.
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    ax.set_title(title or "where one decode step spends its time")
    ax.figure.tight_layout()
    return ax


def speculative_speedup(c: float, ks=(1, 2, 4, 8), measured: tuple[float, float] | None = None,
                        measured_k: int | None = None, ax=None, title: str | None = None):
    """Leviathan et al.'s expected speed-up against acceptance rate, one curve per k; ``measured`` = (alpha, x)."""
    from course_lib.decoding.speculative import expected_speedup

    ax = _axes(ax, figsize=(6, 3.6))
    alphas = torch.linspace(0, 0.99, 100).tolist()
    for k in ks:
        ax.plot(alphas, [expected_speedup(a, k, c) for a in alphas], label=f"k = {k}",
                lw=2.5 if k == measured_k else 1.2)
    if measured is not None:
        ax.scatter(*measured, color="black", zorder=3, label=f"measured (k = {measured_k})")
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("acceptance rate alpha")
    ax.set_ylabel("expected speed-up")
    ax.set_title(title or f"speculative decoding, draft cost c = {c:.2f}")
    ax.legend(fontsize=8)
    ax.figure.tight_layout()
    return ax


def loss_bars(labels, losses, baseline: float, ax=None, title: str | None = None):
    """Held-out loss of several variants as bars, with the baseline as a dashed line."""
    ax = _axes(ax)
    ax.bar(range(len(losses)), losses, color="tab:blue")
    ax.axhline(baseline, color="tab:orange", ls="--", label=f"baseline {baseline:.3f}")
    ax.set_xticks(range(len(losses)), labels)
    ax.set_ylim(min(min(losses), baseline) * 0.97, max(max(losses), baseline) * 1.02)
    ax.set_ylabel("held-out loss (nats/token)")
    ax.set_title(title or "held-out loss")
    ax.legend(fontsize=8)
    ax.figure.tight_layout()
    return ax


def token_logprob_bars(tokens, logprobs, ax=None, title: str | None = None):
    """Per-token log-probabilities of a scored continuation (``ContinuationScore.tokens/.logprobs``) as bars:
    the surprising tokens stand out as the long ones."""
    ax = _axes(ax, figsize=(max(4.0, 0.6 * len(tokens) + 1.5), 3.0))
    ax.bar(range(len(tokens)), list(logprobs), color="tab:purple")
    ax.set_xticks(range(len(tokens)), [t.replace(" ", "␣").replace("\n", "⏎") for t in tokens], rotation=45,
                  ha="right")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_ylabel("log p(token | everything before)")
    ax.set_title(title or f"total {sum(logprobs):.2f} nats")
    ax.figure.tight_layout()
    return ax


def roofline(bandwidth: float, flop_rate: float, points: dict[str, tuple[float, float]], ax=None,
             title: str | None = None):
    """The roofline: attainable FLOP/s = min(flop_rate, bandwidth x intensity) against arithmetic intensity
    (FLOPs per byte read), both axes logarithmic, and ``points`` (label -> (intensity, measured FLOP/s))."""
    ax = _axes(ax, figsize=(6.5, 3.8))
    intensities = [i for i, _ in points.values()]
    low, high = min(intensities + [flop_rate / bandwidth]) / 4, max(intensities + [flop_rate / bandwidth]) * 4
    xs = [low * (high / low) ** (k / 99) for k in range(100)]
    ax.plot(xs, [min(flop_rate, bandwidth * x) / 1e9 for x in xs], color="black", lw=1.5,
            label=f"roof: {bandwidth / 1e9:.0f} GB/s, {flop_rate / 1e9:.0f} GFLOP/s")
    for (label, (intensity, rate)), marker in zip(points.items(), MARKERS * len(points)):
        ax.scatter(intensity, rate / 1e9, marker=marker, zorder=3, label=label)
    return _log_log(ax, "arithmetic intensity (FLOPs per byte read)", "GFLOP/s",
                    title or "roofline: what bounds each forward")


def scale_sweep(rows, bandwidth: float | None = None, ax=None, title: str | None = None):
    """Tokens/s of each variant against the fp32 weight bytes of each size (``course_lib.scale.SizeRow``s), both
    axes logarithmic; with ``bandwidth`` (bytes/s) also the memory-bound ceiling bandwidth / fp32 bytes."""
    ax = _axes(ax, figsize=(6.5, 3.8))
    megabytes = [r.weight_bytes / 1e6 for r in rows]
    for name, marker in zip(rows[0].tokens_per_s, MARKERS * len(rows[0].tokens_per_s)):  # every variant drawn
        ax.plot(megabytes, [r.tokens_per_s[name] for r in rows], marker=marker, label=name)
    if bandwidth is not None:
        ax.plot(megabytes, [bandwidth / r.weight_bytes for r in rows], color="black", ls="--", lw=1,
                label=f"fp32 weights read once per token at {bandwidth / 1e9:.0f} GB/s")
    return _log_log(ax, "fp32 weight MB (model size)", "new tokens/s", title or "speed against model size, batch 1")


def _log_log(ax, xlabel: str, ylabel: str, title: str):
    """Both axes logarithmic, labelled, and the legend right of the plot, inside the figure."""
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    ax.figure.tight_layout()
    return ax
