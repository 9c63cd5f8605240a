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

import sysconfig
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

_LIBRARY_DIRS = tuple({sysconfig.get_paths()[key] for key in ("stdlib", "purelib", "platlib")})
_MAX_MESSAGE = 600


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


def _describe(exc: Exception) -> str:
    if isinstance(exc, AssertionError):
        text = str(exc).strip() or "assertion failed"
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
