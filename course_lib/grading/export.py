"""Grading beyond ``course grade``'s folders: a Gradescope autograder bundle, a gradebook CSV for an LMS, and the
learner's own check of a saved notebook before handing it in.

- ``gradescope_bundle`` writes the zip that Gradescope's "Configure Autograder" page takes: ``setup.sh`` (run
  once, as root, when Gradescope builds the image), ``run_autograder`` (run for each submission) and the
  exercise's source notebook. Gradescope unpacks it into ``/autograder/source``, puts the submission in
  ``/autograder/submission`` and reads ``/autograder/results/results.json``.
- ``python3 -m course_lib.grading.export EXERCISE.ipynb`` is what ``run_autograder`` calls: ``autograde`` grades
  the one notebook in ``$AUTOGRADER_ROOT/submission`` (``AUTOGRADER_ROOT`` defaults to ``/autograder``) exactly
  as ``course grade`` does, and always writes a results.json, with a score of 0 when it could not grade.
- ``gradebook_csv`` turns ``grade_folder``'s rows into one row per student, for an LMS's gradebook import.
- ``validate`` (``course exercises validate FILE.ipynb``) runs a saved notebook the way the grader does, without
  the hidden tests, so that a learner sees before handing in what the grader will see.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import shlex
import sys
import traceback
import zipfile
from pathlib import Path

# Modules, not names, so that grade.py can import this module back (grade_folder writes the gradebook) with
# ``from course_lib.grading import export``; importing a name from here at grade.py's top would be circular.
from course_lib.grading import grade, sandbox, submissions
from course_lib.grading.markers import is_tests_cell, strip_hidden
from course_lib.grading.values import compare_values, decode

SETUP_SH = """\
#!/usr/bin/env bash
# Gradescope runs this once, as root, when it builds the autograder's image.
set -euo pipefail
apt-get update
apt-get install -y --no-install-recommends bubblewrap git python3-pip
# The grader needs no GPU: the CPU build of torch is a fraction of the download.
export PIP_BREAK_SYSTEM_PACKAGES=1
python3 -m pip install torch --index-url https://download.pytorch.org/whl/cpu
python3 -m pip install {spec}
"""

RUN_AUTOGRADER = """\
#!/usr/bin/env bash
# Gradescope runs this for each submission: it grades submission/*.ipynb and writes results/results.json.
exec python3 -m course_lib.grading.export "${{AUTOGRADER_ROOT:-/autograder}}/source/"{exercise} {options}
"""

GRADER_TROUBLE = ("The autograder could not grade this submission because of a problem on the grader's side; "
                  "your instructor can see the details in the autograder's log.")


class SubmissionError(ValueError):
    """The submission itself cannot be graded (the learner can fix it: the message says how)."""


def default_install_spec() -> str:
    """What the bundle's setup.sh installs by default: the course from its repository, as the setup cells do."""
    from course_lib.colab import find_project

    return f"git+{find_project(Path(__file__).parent).repository}"


def gradescope_bundle(exercise: Path, bundle: Path, install_spec: str, timeout: float = 60.0,
                      memory_mb: int = 4096, use_sandbox: bool = True) -> None:
    """Write Gradescope's autograder zip for ``exercise`` (its instructor source) to ``bundle``, after checking
    that the source's solutions pass all its tests (ExerciseError otherwise, and nothing is written)."""
    exercise = Path(exercise)
    grade.verify(exercise, sandbox.Limits(timeout=max(timeout, 120.0), memory_mb=memory_mb), use_sandbox=False)
    options = f"--timeout {timeout:g} --memory-mb {memory_mb}" + ("" if use_sandbox else " --no-sandbox")
    scripts = {"setup.sh": SETUP_SH.format(spec=shlex.quote(install_spec)),
               "run_autograder": RUN_AUTOGRADER.format(exercise=shlex.quote(exercise.name), options=options)}
    with zipfile.ZipFile(bundle, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, text in scripts.items():
            info = zipfile.ZipInfo(name)
            info.external_attr = 0o100755 << 16  # an executable regular file
            archive.writestr(info, text, zipfile.ZIP_DEFLATED)
        archive.write(exercise, exercise.name)


def _test_result(verdict: grade.Verdict) -> dict:
    """One test in Gradescope's format. A hidden test's output is only the grader's own sentence, which leaves
    out the expected value; a visible test's has its hint as well."""
    test = verdict.test
    output = "passed" if verdict.passed else verdict.message
    if not (verdict.passed or test.hidden) and test.hint:
        output += f"\nhint: {test.hint}"
    return {"name": f"{test.question}: {test.name}" + (" (hidden test)" if test.hidden else ""),
            "score": test.points if verdict.passed else 0.0, "max_score": test.points,
            "status": "passed" if verdict.passed else "failed", "visibility": "visible", "output": output}


def _grade_one(exercise: Path, root: Path, limits: sandbox.Limits, use_sandbox: bool) -> dict:
    found = submissions.read_folder(root / "submission")
    if len(found) != 1:
        names = ", ".join(f"{s.student}.ipynb" for s in found) or "none"
        raise SubmissionError(f"Submit exactly one notebook (.ipynb file); this submission has {len(found)}: "
                              f"{names}.")
    (submission,) = found
    if submission.cells is None:
        raise SubmissionError(f"{submission.student}.ipynb cannot be graded: {submission.skipped}.")
    if use_sandbox and (problem := sandbox.bwrap_problem()):
        raise RuntimeError(f"cannot grade safely: {problem} (the bundle's --no-sandbox grades unconfined)")
    reference = grade.verify(exercise, sandbox.Limits(timeout=max(limits.timeout, 120.0),
                                                      memory_mb=limits.memory_mb), use_sandbox)
    graded = grade.grade_submission(submission, reference, limits)
    return {"score": sum(graded.earned(q) for q in reference.questions),
            "output": grade._feedback(graded, reference),
            "tests": [_test_result(v) for v in graded.verdicts]}


def autograde(exercise: Path, root: Path, timeout: float = 60.0, memory_mb: int = 4096,
              use_sandbox: bool = True) -> dict:
    """Grade the one notebook in ``root/submission`` against ``exercise`` and write ``root/results/results.json``
    in Gradescope's format; when it cannot, results.json says why, with a score of 0. Returns what it wrote.
    The details of a failure on the grader's side go to stdout only (Gradescope shows it to instructors)."""
    try:
        results = _grade_one(Path(exercise), root, sandbox.Limits(timeout=timeout, memory_mb=memory_mb),
                             use_sandbox)
    except SubmissionError as exc:
        results = {"score": 0.0, "output": str(exc), "tests": []}
    except Exception:  # noqa: BLE001 -- Gradescope shows nothing at all without a results.json
        traceback.print_exc(file=sys.stdout)
        results = {"score": 0.0, "output": GRADER_TROUBLE, "tests": []}
    (root / "results").mkdir(parents=True, exist_ok=True)
    (root / "results" / "results.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
    return results


def main(argv: list[str] | None = None) -> int:
    """``python3 -m course_lib.grading.export``: the command of the bundle's run_autograder."""
    parser = argparse.ArgumentParser(prog="python3 -m course_lib.grading.export",
                                     description="Gradescope's run_autograder step: grade "
                                                 "$AUTOGRADER_ROOT/submission/*.ipynb (default root: /autograder) "
                                                 "and write $AUTOGRADER_ROOT/results/results.json.")
    parser.add_argument("exercise", type=Path, help="the exercise's instructor source notebook")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds allowed for the submission")
    parser.add_argument("--memory-mb", type=int, default=4096, help="address space allowed, in MB")
    parser.add_argument("--no-sandbox", action="store_true", help="run the submission without bubblewrap")
    args = parser.parse_args(argv)
    root = Path(os.environ.get("AUTOGRADER_ROOT", "/autograder"))
    results = autograde(args.exercise, root, args.timeout, args.memory_mb, not args.no_sandbox)
    print(f"score {results['score']:g}, written to {root / 'results' / 'results.json'}")
    return 0


def gradebook_csv(rows: list[dict], questions: dict[str, float]) -> str:
    """One row per student (``student,total,q1,q2,...``, in the order of ``questions``) from ``grade_folder``'s
    rows (one per student and question); a question with no row counts 0."""
    points: dict[str, dict[str, str]] = {}
    for row in rows:
        points.setdefault(row["student"], {})[row["question"]] = row["points"]
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["student", "total", *questions])
    for student, earned in points.items():
        cells = [earned.get(q, "0") for q in questions]
        writer.writerow([grade.csv_safe(student), f"{sum(float(c) for c in cells):g}", *cells])
    return out.getvalue()


def _test_problem(entry: dict) -> str:
    """"" when a test's result matches its expected value (both computed in the run), else what is wrong."""
    test, result, expected = entry["test"], entry["result"], entry.get("expected", {})
    if result.get("stub"):
        return "not attempted: the code still raises NotImplementedError"
    if "value" not in expected:
        return f"the test's expect= {'raised ' + str(expected['raised']) if 'raised' in expected else 'is missing'}"
    if "value" not in result:
        return f"your code raised {result['raised']}" if "raised" in result else str(result.get("unsupported"))
    return compare_values(decode(result["value"]), decode(expected["value"]), test["atol"], test["rtol"])


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
            print(f"code cell {error['cell']} ({grade._first_line(cells[error['cell'] - 1])}) raised "
                  f"{error['error']}")
        elif "tests_error" in entry:
            raised += 1
            print(f"a tests cell raised {entry['tests_error']}")
        elif "test" in entry:
            test, problem = entry["test"], _test_problem(entry)
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


if __name__ == "__main__":
    sys.exit(main())
