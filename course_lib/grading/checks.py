"""Tests of an exercise, and the learner's one-line ``check("q1")``.

A tests cell registers each test with a decorator; ``check`` runs the tests of one question against the
definitions the learner has in the kernel right now and prints one readable line per failure::

    @test("q1", hint="Sort the probabilities from high to low before the cumulative sum.")
    def keeps_the_most_likely_token():
        assert top_p_filter(torch.tensor([[3.0, 1.0]]), 0.1)[0, 0] == 3.0

    check("q1")   # q1: all 3 tests passed

Plain text only, so it reads the same in JupyterLab, Colab and a grader's log.
"""

from __future__ import annotations

import math
import re
import sysconfig
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from course_lib.grading.markers import STUB_MESSAGE

_LIBRARY_DIRS = tuple({sysconfig.get_paths()[key] for key in ("stdlib", "purelib", "platlib")})
_MAX_MESSAGE = 600
# torch.testing.assert_close's report: "Mismatched elements: 2 / 6 (33.3%)", "Greatest absolute difference:
# inf at index (0, 2) (up to 1e-05 allowed)".
_MISMATCHED = re.compile(r"Mismatched elements: (\d+) / (\d+)")
_WORST_AT = re.compile(r"Greatest absolute difference: \S+ at index \(([\d, ]*)\)")


@dataclass
class Test:
    question: str
    name: str
    run: Callable[[], None]
    hint: str
    points: float


@dataclass
class Outcome:
    question: str
    name: str
    passed: bool
    points: float       # earned
    max_points: float
    message: str        # why it failed; "" when it passed
    hint: str
    not_started: bool = False  # the learner's code still raises the stub's NotImplementedError


# question -> test name -> Test. Re-running a tests cell replaces its tests instead of adding copies.
REGISTRY: dict[str, dict[str, Test]] = {}


def test(question: str, hint: str = "", points: float = 1.0) -> Callable:
    """Decorator: register a no-argument function as a test of ``question``, worth ``points``."""
    if not isinstance(question, str) or not question:
        raise ValueError(f"question must be a non-empty string like 'q1', got {question!r}")
    if points <= 0:
        raise ValueError(f"points must be positive, got {points}")

    def register(fn: Callable[[], None]) -> Callable[[], None]:
        REGISTRY.setdefault(question, {})[fn.__name__] = Test(question, fn.__name__, fn, hint, points)
        return fn

    return register


def _where(exc: BaseException) -> str:
    """' (line N in f: `code`)' for the innermost line of notebook code, skipping library frames."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if not f.filename.startswith(_LIBRARY_DIRS) and Path(f.filename).name != "checks.py"]
    if not frames:
        return ""
    frame = frames[-1]
    code = f": `{frame.line.strip()}`" if frame.line else ""
    return f" (line {frame.lineno} in {frame.name}{code})"


def _compared(exc: BaseException) -> tuple[Any, Any] | None:
    """(actual, expected) of the ``torch.testing.assert_close`` call that raised ``exc``; None for other errors."""
    tb = exc.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        if code.co_name == "assert_close" and "torch" in Path(code.co_filename).parts:
            return tb.tb_frame.f_locals.get("actual"), tb.tb_frame.f_locals.get("expected")
        tb = tb.tb_next
    return None


def _close_failure(exc: AssertionError) -> str | None:
    """A failed ``torch.testing.assert_close`` as one sentence: what differs, where, and by how much (instead
    of its tolerance report, e.g. "Greatest relative difference: nan"). None when ``exc`` came from elsewhere."""
    compared = _compared(exc)
    if compared is None:
        return None
    actual, expected = compared
    if all(isinstance(x, (int, float)) for x in compared):
        return _expected_got(expected, actual)
    if not all(hasattr(x, "shape") and hasattr(x, "dtype") for x in compared):
        return None  # lists and other containers: torch names the failing item itself
    if tuple(actual.shape) != tuple(expected.shape):
        return f"the result has shape {tuple(actual.shape)}, expected {tuple(expected.shape)}"
    if actual.dtype != expected.dtype:
        return f"the result has dtype {actual.dtype}, expected {expected.dtype}"
    mismatched, worst = _MISMATCHED.search(str(exc)), _WORST_AT.search(str(exc))
    if not (mismatched and worst):
        return None
    index = tuple(int(i) for i in worst.group(1).split(",") if i.strip())
    return (f"{mismatched.group(1)} of {mismatched.group(2)} values differ from the expected ones; the largest "
            f"difference is at [{', '.join(map(str, index))}]: "
            + _expected_got(expected[index].item(), actual[index].item()))


def _expected_got(expected: float, got: float) -> str:
    """'expected 3, got 2.5 (off by 0.5)'; without the gap when it is not a finite number (inf, nan)."""
    gap = abs(got - expected)
    return f"expected {expected:.4g}, got {got:.4g}" + (f" (off by {gap:.2g})" if math.isfinite(gap) else "")


def _describe(exc: Exception) -> str:
    if isinstance(exc, AssertionError):
        text = _close_failure(exc) or str(exc).strip() or "assertion failed"
        text += _where(exc) if not str(exc).strip() else ""
    else:
        text = f"{type(exc).__name__}: {exc}{_where(exc)}"
    return text if len(text) <= _MAX_MESSAGE else text[:_MAX_MESSAGE] + " [...]"


def run_test(t: Test) -> Outcome:
    """Run one test; any exception from the learner's code becomes a failed Outcome with a short message."""
    try:
        t.run()
    except NotImplementedError as exc:
        return Outcome(t.question, t.name, False, 0.0, t.points, _describe(exc), t.hint, not_started=True)
    except (Exception, SystemExit) as exc:  # KeyboardInterrupt still stops a learner's endless loop
        return Outcome(t.question, t.name, False, 0.0, t.points, _describe(exc), t.hint)
    return Outcome(t.question, t.name, True, t.points, t.points, "", t.hint)


def run_tests(question: str) -> list[Outcome]:
    """Outcomes of every registered test of ``question``, in the order they were defined."""
    return [run_test(t) for t in REGISTRY.get(question, {}).values()]


def _indent(text: str, prefix: str = "    ") -> str:
    return "\n".join(prefix + line for line in text.splitlines())


def check(question: str) -> None:
    """Run the visible tests of ``question`` and print which ones failed, each with a hint."""
    if question not in REGISTRY:
        known = ", ".join(sorted(REGISTRY)) or "none yet"
        print(f"No tests for {question!r}: run the tests cell of that task first (questions with tests: {known}).")
        return
    outcomes = run_tests(question)
    passed = sum(o.passed for o in outcomes)
    if passed == len(outcomes):
        print(f"{question}: all {len(outcomes)} tests passed")
        return
    if all(o.not_started for o in outcomes):
        print(f"{question}: not started yet. Replace the `raise NotImplementedError(...)` line in the task's code "
              f"cell with your solution, run that cell, then run check({question!r}) again.")
        return
    print(f"{question}: {passed} of {len(outcomes)} tests passed")
    for o in outcomes:
        if not o.passed:
            print(f"  FAILED {o.name.replace('_', ' ')}\n{_indent(o.message, '    ')}")
            if o.hint:
                print(f"    hint: {o.hint}")


def _stub_owner(exc: BaseException) -> str:
    """The function (or ``Class.method``) whose stub raised ``exc``: the innermost frame of its traceback."""
    tb = exc.__traceback__
    while tb.tb_next is not None:
        tb = tb.tb_next
    name, owner = tb.tb_frame.f_code.co_name, tb.tb_frame.f_locals.get("self")
    return name if owner is None else f"{type(owner).__name__}.{name}"


@contextmanager
def needs_your_code() -> Iterator[None]:
    """For a demo cell that calls the learner's functions: while one of them is still the stub of the student
    version, print which one to write instead of a NotImplementedError traceback, so that the first "Run All"
    of a fresh copy runs to the end. Any other error goes through."""
    try:
        yield
    except NotImplementedError as exc:
        if str(exc) != STUB_MESSAGE:
            raise
        print(f"not implemented yet: write {_stub_owner(exc)} above and run its cell, then run this cell again")
