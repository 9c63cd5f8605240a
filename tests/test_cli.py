"""The `course` command line: doctor, execute, bench, and the wiring of its subcommands."""
import re
import subprocess
import sys

import nbformat
import pytest

from course_lib import cli, models


def test_doctor_passes_with_bundled_models(capsys):
    assert cli.main(["doctor"]) == 0
    out = capsys.readouterr().out
    for name in models.BUNDLED_MODELS:
        assert f"model         {name}:" in out
    assert "hub" in out and "All good" in out
    if sys.platform == "linux":
        assert "grading       sandbox OK (bubblewrap)" in out, "CI installs bubblewrap; graders need it"


@pytest.mark.skipif(sys.platform != "linux", reason="the grading sandbox is Linux only")
def test_doctor_says_when_the_grading_sandbox_is_missing(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no bwrap here
    cli.main(["doctor"])
    assert "grading       NO SANDBOX: bubblewrap (bwrap) is not installed: install bubblewrap" in capsys.readouterr().out


def test_doctor_fails_with_advice_when_a_model_is_missing(monkeypatch, capsys):
    monkeypatch.setitem(models.BUNDLED_MODELS, "ghost", "a model whose weights are not there")
    assert cli.main(["doctor"]) == 1
    out = capsys.readouterr().out
    assert "bundled model 'ghost' does not load" in out and "Problems:" in out


def test_execute_stores_outputs_and_reports_failures(tmp_path, capsys):
    good, bad = tmp_path / "00_good.ipynb", tmp_path / "01_bad.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("import os; print(6 * 7, os.environ['COURSE_STATIC'])")]), good)
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("1 / 0")]), bad)
    out_dir = tmp_path / "executed"
    assert cli.main(["execute", str(good), str(bad), "--out", str(out_dir)]) == 1
    cell = nbformat.read(out_dir / "00_good.ipynb", as_version=4).cells[0]
    assert cell.outputs[0]["text"] == "42 1\n"
    report = capsys.readouterr().out
    assert "00_good.ipynb" in report and "ok" in report and "FAILED: CellExecutionError" in report
    assert nbformat.read(good, as_version=4).cells[0].outputs == []  # the source is untouched without --inplace


def test_execute_prints_no_kernel_warning(tmp_path, capfd):
    notebook = tmp_path / "00_quiet.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("print('hi')")]), notebook)
    assert cli.main(["execute", str(notebook), "--out", str(tmp_path / "executed")]) == 0
    out, err = capfd.readouterr()  # file descriptors: the kernel is a subprocess that writes to them directly
    assert "00_quiet.ipynb" in out
    assert "WARNING" not in err and "without encryption" not in err, err


def test_bench_quick_runs_every_section_and_prints_its_tables(capsys):
    assert cli.main(["bench", "--quick", "--new-tokens", "16", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[2].startswith("machine: ") and "torch threads" in out
    for title in ("Performance model", "KV cache", "Fast path", "Batching", "Serving", "Speculative decoding",
                  "Quantized weights"):
        assert f"### {title}" in out, out
    model_rows = re.findall(r"^\| (decode, batch \d+|prefill, 64 tokens) \| \d+ \| [\d.]+ \| [\d.]+ \|.*"
                            r"\| ([\d.]+) \| (overhead|memory|compute) \|$", out, re.M)
    assert [name for name, _, _ in model_rows] == ["decode, batch 1", "decode, batch 16", "prefill, 64 tokens"] * 2, out
    rows = {m[0]: (float(m[1]), float(m[2])) for m in
            re.findall(r"^\| (no KV cache|KV cache|lean step) \| [\d.]+ \| [\d.]+ \| [\d.]+ \| ([\d.]+) \| - \| ([\d.]+)x \|",
                       out, re.M)}
    assert set(rows) == {"no KV cache", "KV cache", "lean step"}, out
    assert all(tokens_per_s > 0 and ratio > 0 for tokens_per_s, ratio in rows.values())
    serving = re.findall(r"^\| (one-at-a-time|static|continuous|transformers continuous) \| \d+ \| [\d.]+x \| .* \| (\d+)/16 \|$",
                         out, re.M)
    assert serving == [(p, "16") for p in ("one-at-a-time", "static", "continuous", "transformers continuous")], out


def test_module_entry_point_matches_console_script():
    result = subprocess.run([sys.executable, "-m", "course_lib", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    for command in ("doctor", "lab", "execute", "bench", "train", "exercises", "grade"):
        assert command in result.stdout


def test_unknown_subcommand_is_rejected():
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["fly"])
    assert exit_info.value.code == 2


def test_bench_refuses_more_tokens_than_the_context_and_unknown_sections(capsys):
    assert cli.main(["bench", "--sections", "kv-cache", "--new-tokens", "300", "--repeats", "1"]) == 2
    assert "context window of 256" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", "--sections", "warp-drive"])
    assert exit_info.value.code == 2 and "invalid choice: 'warp-drive'" in capsys.readouterr().err
