"""The grading sandbox against memory attacks.

Inside, memory that no mapping holds (memfd, memfd_secret, System V shared memory and message queues) is refused,
so RLIMIT_AS and the capped tmpfs bound what a submission holds. Outside, the report channel costs the grader a
bounded amount: ``parse_report`` checks each line's size, items and nesting before ``json.loads``, and
``run_sandboxed(..., keep=...)`` stores only the entries the caller wants.
"""

from __future__ import annotations

import inspect
import struct
import sys
import tracemalloc

import pytest

from course_lib.grading.sandbox import (MAX_DEPTH, MAX_ITEMS, MAX_LINE_BYTES, Limits, bwrap_problem, parse_report,
                                        run_sandboxed, sandbox_filter)

# Measured on Python 3.11 (x86_64): parsing worst_line() peaks at 43 MB of Python allocations; a whole run that
# floods the channel with such lines, its entries dropped by ``keep``, peaks at 50 MB. Both bounds: 1.5x that.
PARSE_PEAK_MB = 64
RUN_PEAK_MB = 75


def worst_line(items: int) -> bytes:
    """The costliest line to parse (of some sixty shapes measured) that parse_report accepts: one object holding a
    list of one-key objects whose key and value hold an escaped non-BMP character (so 4-byte strings), each key
    a new one (json keeps a memo of the keys while it parses). Self-contained: it also runs in the sandbox."""
    e = "\\ud83d\\ude00"
    count = (items - 2) // 3  # "{", ":" and "," per object; '{"x":[' and the last object's missing ","
    return ('{"x":[' + ",".join(f'{{"{e}{i}":"{e}"}}' for i in range(count)) + "]}").encode()


def _tokens(line: bytes) -> int:
    return sum(line.count(c) for c in (b"[", b"{", b",", b":"))


def _keys(count: int) -> bytes:
    return b"{" + b",".join(b'"a%d":0' % i for i in range(count)) + b"}"


def _nested(depth: int) -> bytes:
    """A report object whose value nests lists so that the whole line is ``depth`` deep."""
    return b'{"a":' + b"[" * (depth - 1) + b"]" * (depth - 1) + b"}"


@pytest.mark.parametrize("name, line", [
    ("4 MiB of [{},{},...]", b"[" + b"{}," * (MAX_LINE_BYTES // 3 - 1) + b"{}]"),
    ("3.5 MB of {\"a0\":0,\"a1\":0,...}", _keys(300_000)),
    ("one key too many", _keys(MAX_ITEMS // 2 + 1)),
    ("deep [[[[", b"[" * 200_000),
    ("deep {\"a\":[[[[...]]]]}", _nested(MAX_DEPTH + 1)),
    ("deep, in many brackets", b'{"a":[' + b"[]," * 1000 + b"[" * MAX_DEPTH + b"]" * MAX_DEPTH + b"]}"),
    ("over the byte cap", b'{"a":"' + b"x" * MAX_LINE_BYTES + b'"}'),
    ("not ASCII", '{"a":"\U0001F600"}'.encode()),
    ("not an object", b"[1, 2]"),
    ("not JSON", b'{"a": 1'),
])
def test_adversarial_report_lines_are_skipped(name, line):
    assert parse_report(line) is None, name


def test_reports_within_the_bounds_are_read():
    assert parse_report(b'{"done": 1}') == {"done": 1}
    assert parse_report(_nested(MAX_DEPTH)) is not None
    assert parse_report(b'{"a":[' + b"[]," * 1000 + b"[" * 62 + b"]" * 62 + b"]}") is not None  # 64 deep
    assert parse_report(b'{"a":"' + b"[" * 1000 + b'"}') == {"a": "[" * 1000}  # brackets in strings do not nest
    assert len(parse_report(_keys(MAX_ITEMS // 2))) == MAX_ITEMS // 2


@pytest.mark.parametrize("name, line", [
    ("worst", worst_line(MAX_ITEMS)),
    ("strings", b'{"x":[' + b",".join([b'"\\ud83d\\ude00"'] * (MAX_LINE_BYTES // 15 - 1)) + b"]}"),
    ("objects", b'{"x":[' + b"{}," * (MAX_ITEMS // 2 - 2) + b"{}]}"),
    ("one long string", b'{"x":"' + b"\\ud83d\\ude00" * (MAX_LINE_BYTES // 12 - 1) + b'"}'),
])
def test_parsing_one_line_costs_a_bounded_amount_of_memory(name, line):
    assert len(line) <= MAX_LINE_BYTES and _tokens(line) <= MAX_ITEMS
    tracemalloc.start()
    try:
        entry = parse_report(line)
        peak = tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()
    print(f"{name}: {len(line) / 2**20:.1f} MiB, {_tokens(line)} items, peak {peak:.1f} MB")
    assert entry is not None and peak < PARSE_PEAK_MB


@pytest.mark.parametrize("machine, numbers", [("x86_64", {319, 447, 29, 30, 68, 57, 58}),
                                              ("aarch64", {279, 447, 194, 196, 186})])
def test_the_filter_fails_memory_calls_with_eperm_on_each_architecture(machine, numbers):
    instructions = list(struct.iter_unpack("<HBBI", sandbox_filter(machine)))
    targets = {number: instructions[i + 1 + jt] for i, (code, jt, _jf, number) in enumerate(instructions)
               if code == 0x15 and number in numbers}  # BPF_JMP|JEQ|K: where each of these calls goes
    assert targets.keys() == numbers and set(targets.values()) == {(0x06, 0, 0, 0x00050001)}  # RET ERRNO(EPERM)


# --- in the real sandbox --------------------------------------------------------------------------------------

PROBE = """import ctypes, os, subprocess, threading
libc = ctypes.CDLL(None, use_errno=True)
def outcome(call):
    ctypes.set_errno(0)
    try:
        value = call()
    except OSError as exc:
        return f"{type(exc).__name__} errno {exc.errno}"
    return f"{value} errno {ctypes.get_errno()}"
"""
CALLS = {  # each cell raises RuntimeError("<call>: <what it returned or raised>")
    "memfd_create": 'os.memfd_create("x")',
    "memfd_secret": "libc.syscall(447, 0)",
    "shmget": "libc.shmget(0, 60 * 2**20, 0o1600)",  # IPC_PRIVATE, IPC_CREAT | 0600
    "shmat": "libc.shmat(0, None, 0)",
    "msgget": "libc.msgget(0, 0o1600)",
    "fork": "os.fork() or os._exit(0)",
    "subprocess": 'subprocess.run(["true"])',
}
THREADS = """seen = []
threads = [threading.Thread(target=seen.append, args=(n,)) for n in range(8)]
for t in threads:
    t.start()
for t in threads:
    t.join()
raise RuntimeError(f"threads: {sorted(seen)}")"""


@pytest.fixture(scope="module")
def sandboxed() -> None:
    if sys.platform != "linux" or bwrap_problem():
        pytest.skip("needs the bubblewrap sandbox (Linux, bwrap that can build it)")


@pytest.fixture(scope="module")
def cell_errors(sandboxed) -> dict[str, str]:
    """One run of the probe cells: each cell's reported error text, by the call it tried."""
    cells = [PROBE, *(f'raise RuntimeError("{name}: " + outcome(lambda: {call}))' for name, call in CALLS.items()),
             THREADS]
    run = run_sandboxed([{"cells": cells}], Limits(timeout=60, memory_mb=2048))
    assert run.problem == "", run.diagnostics[-2000:]
    errors = {e["cell_error"]["cell"]: e["cell_error"]["error"] for _, e in run.entries if "cell_error" in e}
    return {name: errors.get(n, "") for n, name in enumerate([*CALLS, "threads"], start=2)}


@pytest.mark.parametrize("name, expected", [
    ("memfd_create", "PermissionError errno 1"), ("memfd_secret", "-1 errno 1"), ("shmget", "-1 errno 1"),
    ("shmat", "-1 errno 1"), ("msgget", "-1 errno 1"),
])
def test_memory_outside_mappings_is_refused_in_the_sandbox(cell_errors, name, expected):
    assert cell_errors[name] == f"RuntimeError: {name}: {expected}"


def test_threads_work_and_new_processes_do_not(cell_errors):
    assert cell_errors["threads"] == f"RuntimeError: threads: {list(range(8))}"
    assert cell_errors["fork"] == "RuntimeError: fork: PermissionError errno 1"
    assert cell_errors["subprocess"] == "RuntimeError: subprocess: PermissionError errno 1"


def test_a_flood_of_costly_lines_costs_the_grader_a_bounded_amount(sandboxed):
    """15 MB of results: a line over the byte cap (skipped), two worst lines (dropped by ``keep``), a marker."""
    flood = (inspect.getsource(worst_line) + "import os\n"
             f"data = b'{{\"x\":\"' + b'y' * {MAX_LINE_BYTES} + b'\"}}\\n' + (worst_line({MAX_ITEMS}) + b'\\n') * 2\n"
             "data += b'{\"marker\": 1}\\n'\n"
             "for fd in [int(n) for n in os.listdir('/proc/self/fd') if int(n) > 2]:\n"
             "    try:\n        os.write(fd, data)\n    except OSError:\n        pass\n")
    seen = []

    def keep(sent: int, entry: dict) -> bool:
        seen.append(sorted(entry))
        return "x" not in entry

    tracemalloc.start()
    try:
        run = run_sandboxed([{"cells": [flood]}], Limits(timeout=60, memory_mb=2048), keep=keep)
        peak = tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()
    print(f"flood of {len(seen)} reports: grader's peak {peak:.1f} MB")
    assert run.problem == "" and seen.count(["x"]) == 2, run.diagnostics[-2000:]
    assert [e for _, e in run.entries if "x" in e] == [] and (1, {"marker": 1}) in run.entries
    assert run.entries[-1] == (1, {"done": 1}) and peak < RUN_PEAK_MB
