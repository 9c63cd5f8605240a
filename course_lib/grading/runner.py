"""Runs ONE notebook inside the grading sandbox; never imported by the grader's own process.

    python -m course_lib.grading.runner MEMORY_BYTES CPU_SECONDS FILE_BYTES

The grader sends jobs, one JSON line each, on stdin; the runner answers with JSON lines on stdout (the only
channel out of the sandbox, read by the grader with a size cap) and a ``{"done": N}`` line after job N:

- ``{"cells": [source, ...]}``: run the notebook's code cells in an IPython shell; report each cell's error.
- ``{"tests": source, "seconds": s, "only": question}``: run a tests cell, then each test it registered (of
  ``question`` only, when given): report the data the test returned (``values.encode``), the type of what it
  raised, or that it ran past ``s`` seconds, and the test's ``expect=`` value when the source has one (only the
  instructor's run does: the grader removes ``expect=`` from what a submission receives).

Nothing here decides a grade: a submission controls this whole process, so everything it reports is just data
that the grader compares with the instructor's run outside the sandbox.
"""

from __future__ import annotations

import builtins
import json
import os
import resource
import signal
import sys

from course_lib.grading import checks
from course_lib.grading.values import ValueTypeError, encode


def limit_resources(memory: int, cpu_seconds: int, file_bytes: int) -> None:
    """Hard limits for this process and all it starts: address space, CPU time, file size; no core dumps."""
    for limit, value in ((resource.RLIMIT_AS, memory), (resource.RLIMIT_CPU, cpu_seconds),
                         (resource.RLIMIT_FSIZE, file_bytes), (resource.RLIMIT_CORE, 0),
                         (resource.RLIMIT_NPROC, 64), (resource.RLIMIT_NOFILE, 256)):
        soft, hard = resource.getrlimit(limit)
        value = value if hard == resource.RLIM_INFINITY else min(value, hard)
        resource.setrlimit(limit, (value, value))


def _error_type(exc: BaseException) -> str:
    """The exception's class name when it is a built-in one; the learner's own classes could carry any text."""
    name = type(exc).__name__
    return name if getattr(builtins, name, None) is type(exc) else "an exception of its own class"


def _error_text(result) -> str | None:
    error = result.error_before_exec or result.error_in_exec
    return None if error is None else f"{type(error).__name__}: {error}"[:300]


class _OutOfTime(BaseException):
    """Raised in a test that runs past its time budget."""


def _out_of_time(signum, frame) -> None:
    raise _OutOfTime


def _value(compute, seconds: float = 0.0) -> dict:
    """{"value": data} for what ``compute()`` returned, {"raised": type, "stub": bool} for what it raised, or
    {"timed_out": True} when it ran past ``seconds`` (0: no budget)."""
    try:
        signal.setitimer(signal.ITIMER_REAL, seconds)
        with checks.seeded():
            return {"value": encode(compute())}
    except _OutOfTime:
        return {"timed_out": True}
    except ValueTypeError as exc:
        return {"unsupported": str(exc)[:300]}
    except BaseException as exc:  # noqa: BLE001 -- SystemExit, KeyboardInterrupt: one test fails, the run goes on
        return {"raised": _error_type(exc), "stub": str(exc) == checks.STUB_MESSAGE}
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def main() -> None:
    limit_resources(*(int(arg) for arg in sys.argv[1:4]))
    channel = os.fdopen(os.dup(1), "w", encoding="utf-8")
    # What the notebook prints goes nowhere: only the report lines below leave the sandbox.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)

    def report(**entry) -> None:
        channel.write(json.dumps(entry) + "\n")
        channel.flush()

    from IPython.core.interactiveshell import InteractiveShell
    from traitlets.config import Config

    config = Config()
    config.HistoryManager.enabled = False
    shell = InteractiveShell.instance(config=config)
    # Nobody sees tracebacks here (the errors are reported as one line), and formatting the traceback of a
    # recursion a million frames deep would take minutes.
    shell.showtraceback = shell.showsyntaxerror = lambda *args, **kwargs: None
    signal.signal(signal.SIGALRM, _out_of_time)
    report(ready=True)
    for number, line in enumerate(sys.stdin, start=1):
        job = json.loads(line)
        if "cells" in job:
            for cell_number, cell in enumerate(job["cells"], start=1):
                report(running=f"code cell {cell_number}")
                if error := _error_text(shell.run_cell(cell, store_history=False)):
                    report(cell_error={"cell": cell_number, "error": error})
        else:
            checks.REGISTRY.clear()
            shell.user_ns.update(test=checks.test)
            if error := _error_text(shell.run_cell(job["tests"], store_history=False)):
                report(tests_error=error)
            for question, tests in list(checks.REGISTRY.items()):
                if job.get("only") not in (None, question):
                    continue
                for t in list(tests.values()):
                    report(running=f"test {t.name}")
                    entry = {"test": {"question": t.question, "name": t.name, "hint": t.hint, "points": t.points,
                                      "atol": t.atol, "rtol": t.rtol}}
                    if t.has_expect:  # first, so that a result that changes its inputs cannot change it
                        entry["expected"] = _value(t.expected)
                    entry["result"] = _value(t.run, job.get("seconds", 0.0))
                    report(**entry)
        report(done=number)
    os._exit(0)  # skip the interpreter's teardown (seconds with torch loaded)


if __name__ == "__main__":
    main()
