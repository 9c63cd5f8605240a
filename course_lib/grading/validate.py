"""``course exercises validate FILE.ipynb``: the learner's own check of a saved notebook before handing it in.

It runs the saved file the way the grader does (its code cells in a fresh process, then its visible tests), so a
notebook whose saved state differs from the kernel's (a cell edited but not re-run, a name defined only in a
deleted cell) shows up before the grader sees it. The hidden tests are the grader's; this runs none.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from course_lib.grading import sandbox, submissions
from course_lib.grading.grade import first_line, result_problem
from course_lib.grading.markers import is_tests_cell, strip_hidden


def validate(path: Path, timeout: float = 60.0) -> int:
    """Run the notebook saved at ``path`` as the grader does (its code cells in a fresh process, then its own
    visible tests) and print which cells raised and which tests failed. 0 when none did, else 1."""
    try:
        notebook = json.loads(Path(path).read_text(encoding="utf-8"))
        cells = submissions.learner_cells(notebook)
        tests = [strip_hidden(c) for c in submissions.code_cells(notebook) if is_tests_cell(c)]
    except OSError as exc:
        print(f"error: cannot read {path}: {exc.strerror}", file=sys.stderr)
        return 1
    except json.JSONDecodeError as exc:
        print(f"error: {path} is not a saved notebook: it is not valid JSON ({exc})", file=sys.stderr)
        return 1
    except ValueError as exc:  # not UTF-8, not nbformat 4, unbalanced hidden-test markers
        print(f"error: {path}: {exc}", file=sys.stderr)
        return 1
    print(f"Running {path} as saved, from the top, in a fresh process (as the grader does)...", flush=True)
    run = sandbox.run_sandboxed([{"cells": cells}, *({"tests": t} for t in tests)],
                                sandbox.Limits(timeout=timeout), sandbox=False)
    raised, passed, failed, running = 0, 0, 0, "the start"
    for _, entry in run.entries:
        running = entry.get("running", running)
        if error := entry.get("cell_error"):
            raised += 1
            print(f"code cell {error['cell']} ({first_line(cells[error['cell'] - 1])}) raised "
                  f"{error['error']}")
        elif "tests_error" in entry:
            raised += 1
            print(f"a tests cell raised {entry['tests_error']}")
        elif "test" in entry:
            test, problem = entry["test"], result_problem(entry)
            if not problem:
                passed += 1
                print(f"passed  {test['question']} {test['name']}")
            else:
                failed += 1
                print(f"FAILED  {test['question']} {test['name']}: {problem}")
                if test["hint"]:
                    print(f"        hint: {test['hint']}")
    if run.problem:
        print(f"The run stopped: {run.problem} while running {running}.")
    print(f"This is what the grader will run: {len(cells)} code cells ({raised} raised an error), {passed} of "
          f"{passed + failed} visible tests passed; the grader adds hidden tests on other inputs.")
    return 0 if not (raised or failed or run.problem) else 1
