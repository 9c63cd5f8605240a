"""A Gradescope autograder bundle for an exercise, and the command it runs for each submission.

- ``gradescope_bundle`` writes the zip that Gradescope's "Configure Autograder" page takes: ``setup.sh`` (run
  once, as root, when Gradescope builds the image), ``run_autograder`` (run for each submission) and the
  exercise's source notebook. Gradescope unpacks it into ``/autograder/source``, puts the submission in
  ``/autograder/submission`` and reads ``/autograder/results/results.json``.
- ``python3 -m course_lib.grading.export EXERCISE.ipynb`` is what ``run_autograder`` calls: ``autograde`` grades
  the one notebook in ``$AUTOGRADER_ROOT/submission`` (``AUTOGRADER_ROOT`` defaults to ``/autograder``) exactly
  as ``course grade`` does, and always writes a results.json, with a score of 0 when it could not grade.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import traceback
import zipfile
from pathlib import Path

from course_lib.grading import grade, sandbox, submissions

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
            "output": grade.feedback_text(graded, reference),
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


if __name__ == "__main__":
    sys.exit(main())
