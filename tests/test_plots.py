"""Figures a learner reads: nothing overlaps, every label is legible, every bar means something."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # before pyplot: draw off-screen, whatever the machine has

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.colors import to_rgba  # noqa: E402

from course_lib import plots  # noqa: E402

# 05's diversity-vs-quality grid, as measured: (temperature, top_p, distinct-2, judge perplexity)
GRID = [(0.7, 0.5, 0.460, 2.01), (0.7, 0.9, 0.669, 2.83), (0.7, 1.0, 0.661, 3.18),
        (1.0, 0.5, 0.548, 2.56), (1.0, 0.9, 0.863, 7.33), (1.0, 1.0, 0.944, 13.79),
        (1.3, 0.5, 0.847, 4.74), (1.3, 0.9, 0.960, 50.27), (1.3, 1.0, 0.952, 64.27)]


class LetterTokenizer:
    """Token i reads "t<i>": enough of a tokenizer for the bar labels."""

    def decode(self, ids):
        return "".join(f"t{i}" for i in ids)


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def extents(ax, *artists):
    ax.figure.canvas.draw()
    renderer = ax.figure.canvas.get_renderer()
    return [a.get_window_extent(renderer) for a in artists]


def test_time_breakdown_legend_clears_the_x_label_and_stays_in_the_figure():
    ax = plots.time_breakdown({"matmul kernels": 0.00049, "other torch ops": 0.00064, "outside torch ops": 0.00147})
    legend, xlabel = extents(ax, ax.get_legend(), ax.xaxis.label)
    assert not legend.overlaps(xlabel), f"legend {legend} sits on the x label {xlabel}"
    figure = ax.figure.bbox
    assert figure.x0 <= legend.x0 and legend.x1 <= figure.x1 and figure.y0 <= legend.y0 and legend.y1 <= figure.y1


def test_diversity_quality_has_few_round_ticks_and_no_text_on_the_lines():
    points = [{"group": f"T = {t}", "label": f"p={p}", "diversity": d, "perplexity": q} for t, p, d, q in GRID]
    ax = plots.diversity_quality(points)
    low, high = ax.get_ylim()
    ticks = [t for t in ax.yaxis.get_major_ticks() + ax.yaxis.get_minor_ticks()
             if t.label1.get_visible() and t.label1.get_text() and low <= t.get_loc() <= high]
    labels = [t.label1.get_text() for t in ticks]
    assert 3 <= len(labels) <= 7 and labels == sorted(labels, key=float), labels
    boxes = extents(ax, *(t.label1 for t in ticks))
    assert not any(a.overlaps(b) for a, b in zip(boxes, boxes[1:])), f"tick labels overlap: {labels}"
    assert not ax.texts, "point labels written on the plot cross its lines: name them in a legend"
    legends = [a for a in ax.get_children() if isinstance(a, matplotlib.legend.Legend)]
    entries = {text.get_text() for legend in legends for text in legend.get_texts()}
    assert entries == {"T = 0.7", "T = 1.0", "T = 1.3", "p=0.5", "p=0.9", "p=1.0"}


def bars(ax) -> list[tuple[str, float, bool]]:
    """(tick label, height, orange?) of each bar."""
    labels = [t.get_text() for t in ax.get_xticklabels()]
    orange = to_rgba("tab:orange")
    return [(label, p.get_height(), p.get_facecolor() == orange) for label, p in zip(labels, ax.patches)]


def test_next_token_bars_leave_out_impossible_tokens():
    probs = torch.zeros(50)
    probs[[3, 7, 9]] = torch.tensor([0.6, 0.3, 0.1])  # what top-p leaves: three tokens
    shown = bars(plots.next_token_bars(probs, LetterTokenizer(), k=12, highlight=7))
    assert shown == [("t3", pytest.approx(0.6), False), ("t7", pytest.approx(0.3), True),
                     ("t9", pytest.approx(0.1), False)]


def test_next_token_bars_add_the_highlighted_token_with_its_rank():
    probs = torch.linspace(1.0, 0.01, 50).softmax(0)  # token 0 most likely, token 49 least
    shown = bars(plots.next_token_bars(probs, LetterTokenizer(), k=12, highlight=30))
    assert len(shown) == 13 and [label for label, _, _ in shown[:12]] == [f"t{i}" for i in range(12)]
    assert shown[-1] == ("t30 (#31)", pytest.approx(probs[30].item()), True)
    assert sum(is_orange for _, _, is_orange in shown) == 1


def test_batch_occupancy_draws_each_place_and_leaves_idle_places_white():
    ax = plots.batch_occupancy([[0, 1], [0, None], [2, None]])
    image = ax.images[0].get_array()  # (places, steps)
    assert image.shape == (2, 3)
    assert image.mask.tolist() == [[False, False, False], [False, True, True]]  # NaN = idle = white
    assert image[0].tolist() == [0, 0, 2] and "33% of the places idle" in ax.get_title()
    plt.close(ax.figure)


def test_paged_memory_plots_blocks_in_use_against_the_padded_reservation():
    ax = plots.paged_memory([2**20, 3 * 2**20, 2**20], padded_bytes=8 * 2**20)
    assert list(ax.lines[0].get_ydata()) == [1.0, 3.0, 1.0]
    assert list(ax.lines[1].get_ydata()) == [8.0, 8.0]
    plt.close(ax.figure)


def test_roofline_bends_at_the_ridge_and_keeps_its_points_under_the_roof():
    points = {"decode, batch 1": (0.5, 2e9), "decode, batch 64": (8.0, 50e9), "prefill": (24.0, 100e9)}
    ax = plots.roofline(bandwidth=20e9, flop_rate=160e9, points=points)
    xs, ys = ax.lines[0].get_data()
    ridge = 160e9 / 20e9  # FLOPs per byte where memory stops being the limit
    assert all(y == pytest.approx(min(160, 20 * x)) for x, y in zip(xs, ys))
    assert xs[0] < min(i for i, _ in points.values()) and xs[-1] > max(ridge, 24.0)
    assert [t.get_text() for t in ax.get_legend().get_texts()][1:] == list(points)
    legend = extents(ax, ax.get_legend())[0]
    figure = ax.figure.bbox
    assert figure.x0 <= legend.x0 and legend.x1 <= figure.x1


def test_scale_sweep_draws_each_variant_and_the_memory_ceiling():
    from course_lib.scale import SHAPES, SizeRow

    rows = [SizeRow(SHAPES[0], 3_500_000, 14_000_000, {"fp32": 400.0, "int8 kernel": 450.0}),
            SizeRow(SHAPES[2], 124_000_000, 496_000_000, {"fp32": 20.0, "int8 kernel": 45.0})]
    ax = plots.scale_sweep(rows, bandwidth=24e9)
    fp32, int8, ceiling = ax.lines
    assert list(fp32.get_xdata()) == [14.0, 496.0] and list(int8.get_ydata()) == [450.0, 45.0]
    assert list(ceiling.get_ydata()) == pytest.approx([24e9 / 14e6, 24e9 / 496e6])  # tokens/s if only bytes counted
    assert [t.get_text() for t in ax.get_legend().get_texts()][:2] == ["fp32", "int8 kernel"]
    assert ax.get_xscale() == ax.get_yscale() == "log"
    legend = extents(ax, ax.get_legend())[0]
    assert ax.figure.bbox.x0 <= legend.x0 and legend.x1 <= ax.figure.bbox.x1
    plt.close(ax.figure)
