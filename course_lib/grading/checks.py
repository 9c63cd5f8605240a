"""Tests of an exercise, and the learner's one-line ``check("q1")``.

A test calls the learner's code on inputs it chooses and returns the result as data; ``expect`` says what
the result should be. ``check`` runs the tests of one question against the definitions the learner has in the
kernel right now and prints one readable line per failure::

    @test("q1", hint="Sort the probabilities from high to low before the cumulative sum.", expect=[[3.0, -inf]])
    def keeps_the_most_likely_token():
        return top_p_filter(torch.tensor([[3.0, 1.0]]), 0.1).tolist()

    check("q1")   # q1: all 3 tests passed

A test never decides its own verdict: ``values.compare_values`` does, here and in the grader, which compares the
result a submission returned (in its sandbox) with the expected result of the instructor's run.

Plain text only, so it reads the same in JupyterLab, Colab and a grader's log.
"""

from __future__ import annotations

import math
import random
import sysconfig
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from course_lib.grading.markers import STUB_MESSAGE
from course_lib.grading.values import ValueTypeError, compare_values, decode, encode

_LIBRARY_DIRS = tuple({sysconfig.get_paths()[key] for key in ("stdlib", "purelib", "platlib")})
_MAX_MESSAGE = 600


_NOTHING = object()


@dataclass
class Test:
    question: str
    name: str
    run: Callable[[], Any]   # calls the learner's code and returns its result (data, see values.py)
    hint: str
    points: float | None     # None: the default (1 point for a hidden test; a visible test gives none)
    expect: Any = _NOTHING   # the expected result, or a no-argument function that computes it
    atol: float | None = None
    rtol: float | None = None

    @property
    def has_expect(self) -> bool:
        return self.expect is not _NOTHING

    def expected(self) -> Any:
        return self.expect() if callable(self.expect) else self.expect


@dataclass
class Outcome:
    question: str
    name: str
    passed: bool
    message: str        # why it failed; "" when it passed
    hint: str
    not_started: bool = False  # the learner's code still raises the stub's NotImplementedError


# question -> test name -> Test. Re-running a tests cell replaces its tests instead of adding copies.
REGISTRY: dict[str, dict[str, Test]] = {}


def test(question: str, hint: str = "", points: float | None = None, *, expect: Any = _NOTHING,
         atol: float | None = None, rtol: float | None = None) -> Callable:
    """Decorator: register a no-argument function as a test of ``question``.

    Only hidden tests give points (``points``, 1 by default): a visible test's expected result can be looked up
    by the learner, so it gives feedback only and may not state ``points``.

    The function calls the learner's code on inputs it chooses and returns the result as data (numbers,
    strings, tensors, lists and dicts of those); ``expect`` is the right result, or a no-argument function
    that computes it. Floats are compared within ``atol``/``rtol`` (see ``values.compare_values``).

    When grading, the function runs in the submission's sandbox and ``expect`` only in the instructor's run. The
    learner notebook holds the visible tests: their ``expect`` is a literal value or a property the test checks,
    and reference implementations appear only in hidden blocks (the build refuses a learner copy that imports or
    uses one of a task's library implementations). Give the learner's
    code copies (``.clone()``) of inputs that ``expect`` also uses, and catch only the exception a test is
    about (catching everything would also catch the stub's NotImplementedError).
    """
    if not isinstance(question, str) or not question:
        raise ValueError(f"question must be a non-empty string like 'q1', got {question!r}")
    if points is not None and not (isinstance(points, (int, float)) and math.isfinite(points) and points > 0):
        raise ValueError(f"points must be a positive number (or None for the default), got {points!r}")

    def register(fn: Callable[[], Any]) -> Callable[[], Any]:
        REGISTRY.setdefault(question, {})[fn.__name__] = Test(question, fn.__name__, fn, hint, points, expect,
                                                              atol, rtol)
        return fn

    return register


@contextmanager
def seeded(seed: int = 0) -> Iterator[None]:
    """Run a block with torch and ``random`` seeded, restoring the caller's random state afterwards, so that
    a test builds the same inputs in the learner's kernel, the submission's sandbox and the instructor's run."""
    state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        try:
            yield
        finally:
            random.setstate(state)


def _where(exc: BaseException) -> str:
    """' (line N in f: `code`)' for the innermost line of notebook code, skipping library frames."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if not f.filename.startswith(_LIBRARY_DIRS) and Path(f.filename).name != "checks.py"]
    if not frames:
        return ""
    frame = frames[-1]
    code = f": `{frame.line.strip()}`" if frame.line else ""
    return f" (line {frame.lineno} in {frame.name}{code})"


def _describe(exc: BaseException) -> str:
    """An exception raised by the learner's code as one line, with the line of notebook code that raised it."""
    text = f"{type(exc).__name__}: {exc}".rstrip(": ") + _where(exc)
    return text if len(text) <= _MAX_MESSAGE else text[:_MAX_MESSAGE] + " [...]"


def run_test(t: Test) -> Outcome:
    """Run one test in this kernel: the expected result first, then the learner's, then compare the two.

    Both go through ``values.encode``/``decode`` (as they do when grading), both with the same seed."""
    def outcome(message: str = "", not_started: bool = False) -> Outcome:
        passed = not message
        return Outcome(t.question, t.name, passed, message, t.hint, not_started)

    if not t.has_expect:
        return outcome("this test has no expect=... (a mistake in the exercise, not in your code)")
    with seeded():
        expected = decode(encode(t.expected()))
    try:
        with seeded():
            actual = decode(encode(t.run()))
    except NotImplementedError as exc:
        return outcome(_describe(exc), not_started=str(exc) == STUB_MESSAGE)
    except ValueTypeError as exc:
        return outcome(str(exc))
    except (Exception, SystemExit) as exc:  # KeyboardInterrupt still stops a learner's endless loop
        return outcome(_describe(exc))
    return outcome(compare_values(actual, expected, t.atol, t.rtol))


def run_tests(question: str) -> list[Outcome]:
    """Outcomes of every registered test of ``question``, in the order they were defined."""
    return [run_test(t) for t in REGISTRY.get(question, {}).values()]


def _indent(text: str, prefix: str = "    ") -> str:
    return "\n".join(prefix + line for line in text.splitlines())


def _summary() -> None:
    """One line per task: done, failing or not attempted."""
    if not REGISTRY:
        print("No tests yet: run the notebook's cells from the top (Run > Run All Cells), then check() again.")
        return
    for question in REGISTRY:
        outcomes = run_tests(question)
        passed = sum(o.passed for o in outcomes)
        if passed == len(outcomes):
            state = f"done, all {len(outcomes)} tests pass"
        elif all(o.not_started for o in outcomes):
            state = "not attempted"
        else:
            state = f"{len(outcomes) - passed} of {len(outcomes)} tests failing: run check({question!r}) for details"
        print(f"{question}: {state}")
    print("These tests show whether your code works; the points come from the grader's tests of the same "
          "behaviour on other inputs.")


def check(question: str | None = None) -> None:
    """Run the visible tests of ``question`` and print which ones failed, each with a hint; with no question,
    print a summary of every task in the notebook."""
    if question is None:
        _summary()
        return
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
