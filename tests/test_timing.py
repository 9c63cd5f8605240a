import itertools

import pytest
import torch

from course_lib import timing
from course_lib.timing import BenchResult, benchmark, compare, weight_bytes


@pytest.fixture
def fake_clock(monkeypatch):
    """perf_counter that advances by the durations the test queues, so results are exact."""
    durations: list[float] = []
    now = itertools.count()
    state = {"t": 0.0, "start": True}

    def perf_counter():
        next(now)
        if state["start"]:
            state["start"] = False
            return state["t"]
        state["t"] += durations.pop(0)
        state["start"] = True
        return state["t"]

    monkeypatch.setattr(timing.time, "perf_counter", perf_counter)
    return durations


def test_benchmark_statistics_and_tokens(fake_clock):
    fake_clock.extend([0.5, 0.1, 0.3])
    calls = []
    result = benchmark(lambda: calls.append(1) or "out", warmup=2, repeats=3, new_tokens=30, bytes_moved=3_000_000_000)
    assert len(calls) == 5  # 2 warm-up + 3 timed
    assert result.times_s == pytest.approx([0.5, 0.1, 0.3])
    assert (result.median_s, result.min_s, result.max_s) == pytest.approx((0.3, 0.1, 0.5))
    assert result.tokens_per_s == pytest.approx(100.0)
    assert result.gb_per_s == pytest.approx(10.0)


def test_new_tokens_counted_from_output(fake_clock):
    fake_clock.extend([1.0])
    prompt = torch.zeros(1, 4)
    result = benchmark(lambda: torch.zeros(1, 10), warmup=0, repeats=1,
                       new_tokens=lambda out: out.shape[1] - prompt.shape[1])
    assert result.new_tokens == 6 and result.tokens_per_s == pytest.approx(6.0)


def test_compare_interleaves_and_reports_ratios(fake_clock):
    order = []
    # slow: 0.4, then two noisy runs of 0.9; fast: 0.1, then two noisy runs of 0.3
    fake_clock.extend([0.4, 0.1, 0.9, 0.3, 0.9, 0.3])
    table = compare({"slow": lambda: order.append("slow"), "fast": lambda: order.append("fast")},
                    warmup=1, repeats=3, new_tokens={"slow": 8, "fast": 8})
    assert order == ["slow", "fast"] + ["slow", "fast"] * 3
    assert table.ratio("fast") == pytest.approx(4.0)  # fastest over fastest, 0.4 / 0.1 (medians: 0.9 / 0.3)
    assert table.ratio("slow") == pytest.approx(1.0)
    assert "| fast | 300.0 | 100.0 | 300.0 |" in table.to_markdown() and "4.00x" in table.to_markdown()


def test_bad_arguments():
    with pytest.raises(ValueError, match="repeats must be an integer >= 1"):
        benchmark(lambda: None, repeats=0)
    with pytest.raises(ValueError, match="baseline 'c' is not among"):
        compare({"a": lambda: None}, baseline="c")
    with pytest.raises(ValueError, match="at least one variant"):
        compare({})
    with pytest.raises(KeyError, match="no variant 'x'"):
        compare({"a": lambda: None}, repeats=1)["x"]


def test_result_without_tokens_has_no_rate():
    assert BenchResult("a", [0.1]).tokens_per_s is None


def test_weight_bytes_counts_tied_weights_once(tiny_gpt2):
    params = {p.data_ptr(): p.numel() for p in tiny_gpt2.parameters()}
    buffers = sum(b.numel() * b.element_size() for b in tiny_gpt2.buffers())
    assert tiny_gpt2.get_input_embeddings().weight.data_ptr() == tiny_gpt2.get_output_embeddings().weight.data_ptr()
    assert weight_bytes(tiny_gpt2) == sum(params.values()) * 4 + buffers


def test_weight_bytes_follows_dtype():
    model = torch.nn.Linear(10, 4)  # 44 parameters
    assert weight_bytes(model) == 44 * 4
    assert weight_bytes(model.to(torch.bfloat16)) == 44 * 2


def test_cost_per_token_reports_each_positions_median(fake_clock, tiny_gpt2):
    from course_lib.measure import cost_per_token

    ids = torch.randint(1, 97, (1, 8), generator=torch.Generator().manual_seed(0))
    # interleaved per position: no cache, KV cache, three times; medians 0.2 / 0.02 at p=3, 0.5 / 0.03 at p=6
    fake_clock.extend([0.1, 0.01, 0.2, 0.02, 0.3, 0.05] + [0.5, 0.03, 0.4, 0.04, 0.9, 0.01])
    costs = cost_per_token(tiny_gpt2, ids, positions=[3, 6], repeats=3)
    assert costs == {"no cache": pytest.approx([0.2, 0.5]), "KV cache": pytest.approx([0.02, 0.03])}
    assert fake_clock == []  # every queued duration was used: 2 positions x 2 variants x 3 repeats


def test_throughput_by_batch_counts_every_rows_tokens(fake_clock, tiny_gpt2):
    from course_lib.measure import throughput_by_batch

    ids = torch.randint(1, 97, (4, 5), generator=torch.Generator().manual_seed(1))
    fake_clock.extend([0.1, 0.3, 0.2] + [0.4, 0.2, 0.6])  # batch 1, then batch 4, 3 runs each
    batch_1, batch_4 = throughput_by_batch(tiny_gpt2, ids, [1, 4], max_new_tokens=6, repeats=3)
    assert (batch_1.name, batch_4.name) == ("batch 1", "batch 4")
    assert batch_1.tokens_per_s == pytest.approx(6 / 0.2) and batch_4.tokens_per_s == pytest.approx(24 / 0.4)
    assert batch_4.median_s == pytest.approx(0.4)  # each request of the batch waits this long
