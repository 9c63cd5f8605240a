"""Runs ONE submission inside the grading subprocess; never imported by the grader's own process.

    python -m course_lib.grading.runner SUBMISSION.ipynb SOURCE.ipynb RESULTS.jsonl

Runs the learner's code cells (their tests and check cells skipped) in an IPython shell, then the source
notebook's tests cells (hidden tests included), then every test. It reports one JSON line at a time, so a
grader that has to kill this process on a time limit still knows how far it got.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict

from course_lib.grading import checks
from course_lib.grading.guard import confine
from course_lib.grading.markers import cell_source, hidden_test_names, is_check_cell, is_tests_cell


def code_cells(notebook: dict) -> list[str]:
    """The sources of a notebook's code cells; ValueError when the JSON is not shaped like a notebook."""
    cells = notebook.get("cells") if isinstance(notebook, dict) else None
    if not isinstance(cells, list) or not all(isinstance(c, dict) for c in cells):
        raise ValueError("this JSON file is not a Jupyter notebook (it has no list of cells)")
    return [cell_source(c) for c in cells if c.get("cell_type") == "code"]


def _error_text(result) -> str | None:
    error = result.error_before_exec or result.error_in_exec
    return None if error is None else f"{type(error).__name__}: {error}"[:300]


def main(submission: str, source: str, results: str) -> None:
    # Opened before confine(): the learner's code cannot open this file, which lies outside its folder.
    out = open(results, "a", encoding="utf-8")

    def report(**entry) -> None:
        out.write(json.dumps(entry) + "\n")
        out.flush()

    try:
        with open(submission, encoding="utf-8") as f:
            learner_cells = code_cells(json.load(f))
    except (ValueError, UnicodeDecodeError) as exc:  # json.JSONDecodeError is a ValueError
        report(fatal=f"the submission could not be read as a notebook: {exc}"[:300])
        return
    with open(source, encoding="utf-8") as f:
        test_cells = [c for c in code_cells(json.load(f)) if is_tests_cell(c)]
    hidden = set().union(*(hidden_test_names(c) for c in test_cells))

    from IPython.core.interactiveshell import InteractiveShell
    from traitlets.config import Config

    config = Config()
    config.HistoryManager.enabled = False  # no history database: nothing written but the learner's own files
    shell = InteractiveShell.instance(config=config)
    confine(os.getcwd())
    for number, cell in enumerate(learner_cells, start=1):
        if is_tests_cell(cell) or is_check_cell(cell):
            continue  # the learner's copy of the tests may be edited; the source's tests run below
        report(running=f"code cell {number}")
        error = _error_text(shell.run_cell(cell, store_history=False))
        if error:
            report(cell_error={"cell": number, "error": error})

    # The learner's definitions stay; the tests are the instructor's, registered afresh.
    checks.REGISTRY.clear()
    shell.user_ns.update(test=checks.test, check=checks.check)
    for cell in test_cells:
        error = _error_text(shell.run_cell(cell, store_history=False))
        if error:
            report(cell_error={"cell": "tests", "error": error})
    for question, tests in list(checks.REGISTRY.items()):
        for t in list(tests.values()):
            report(running=f"test {t.name} of {question}")
            outcome = asdict(checks.run_test(t))
            report(outcome={**outcome, "hidden": t.name in hidden})
    report(done=True)
    out.close()
    os._exit(0)  # results are in; skip the interpreter's teardown (seconds with torch loaded)


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit("usage: python -m course_lib.grading.runner SUBMISSION.ipynb SOURCE.ipynb RESULTS.jsonl")
    main(*sys.argv[1:])
