"""Grading beyond `course grade`: the Gradescope bundle run for real, the gradebook CSV, `course exercises validate`."""
from __future__ import annotations

import csv
import io
import json
import os
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from course_lib.colab import Project
from course_lib.grading.build import learner_notebook
from course_lib.grading.cli import main
from course_lib.grading.export import GRADER_TROUBLE, autograde
from course_lib.grading.grade import gradebook_csv
from course_lib.grading.markers import strip_hidden
from course_lib.grading.sandbox import bwrap_problem
from test_grading import SOLUTION, TESTS, add_exercise, notebook, write  # the tiny "add" exercise

SPEC = "accelerated-generation @ https://example.org/course.tar.gz"


# --- the Gradescope bundle ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("bundle")
    write(folder / "add.ipynb", add_exercise())
    assert main(["grade", "--gradescope", str(folder / "add.zip"), "--exercise", str(folder / "add.ipynb"),
                 "--install-spec", SPEC, "--timeout", "30"]) == 0
    return folder / "add.zip"


def test_the_bundle_holds_setup_run_autograder_and_the_source(bundle):
    with zipfile.ZipFile(bundle) as archive:
        assert sorted(archive.namelist()) == ["add.ipynb", "run_autograder", "setup.sh"]
        setup = archive.read("setup.sh").decode()
        run = archive.read("run_autograder").decode()
        modes = {name: archive.getinfo(name).external_attr >> 16 for name in ("setup.sh", "run_autograder")}
    assert "apt-get install" in setup and "bubblewrap" in setup and f"pip install '{SPEC}'" in setup
    assert "python3 -m course_lib.grading.export" in run and '/source/"add.ipynb --timeout 30' in run
    assert all(stat.S_ISREG(mode) and mode & 0o111 for mode in modes.values())


def _autograde(bundle: Path, root: Path, submission: dict) -> dict:
    """Lay out Gradescope's /autograder in ``root``, run the bundle's run_autograder, return results.json."""
    with zipfile.ZipFile(bundle) as archive:
        archive.extractall(root / "source")
    write(root / "submission" / "x.ipynb", submission)
    env = {**os.environ, "AUTOGRADER_ROOT": str(root),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(["bash", str(root / "source" / "run_autograder")], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads((root / "results" / "results.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize("case", ["correct", "wrong", "raising"])
def test_run_autograder_writes_gradescope_results(bundle, tmp_path, case):
    if sys.platform != "linux" or (problem := bwrap_problem()):
        pytest.skip(f"the grading sandbox is bubblewrap on Linux: {problem if sys.platform == 'linux' else ''}")
    solution = {"correct": SOLUTION, "wrong": SOLUTION.replace("a + b", "a - b"),
                "raising": "import no_such_module\n" + SOLUTION}[case]
    results = _autograde(bundle, tmp_path, add_exercise(solution))
    tests = {t["name"]: t for t in results["tests"]}
    assert "q1: adds_small_numbers" in tests and any(name.endswith("(hidden test)") for name in tests)
    assert all(t["visibility"] == "visible" for t in tests.values())
    if case == "correct":
        assert all(t["score"] == t["max_score"] and t["status"] == "passed" for t in tests.values())
        assert results["score"] == sum(t["max_score"] for t in tests.values()) > 0
        return
    assert results["score"] == 0 and all(t["score"] == 0 and t["status"] == "failed" for t in tests.values())
    if case == "wrong":
        visible = tests["q1: adds_small_numbers"]["output"]
        assert "expected 3, got -1" in visible and visible.endswith("\nhint: use +")
        hidden = [t["output"] for name, t in tests.items() if name.endswith("(hidden test)")]
        assert hidden and not any("expected" in text or "got" in text for text in hidden), hidden
    else:
        assert "code cell 2" in results["output"] and "ModuleNotFoundError" in results["output"]


def test_a_submission_that_cannot_be_graded_still_gets_a_results_json(tmp_path):
    write(tmp_path / "submission" / "a.ipynb", add_exercise())
    write(tmp_path / "submission" / "b.ipynb", add_exercise())
    results = autograde(tmp_path / "add.ipynb", tmp_path, use_sandbox=False)
    assert results == {"score": 0.0, "output": "Submit exactly one notebook (.ipynb file); this submission has 2: "
                                               "a.ipynb, b.ipynb.", "tests": []}
    (tmp_path / "submission" / "b.ipynb").unlink()
    results = autograde(tmp_path / "missing-source.ipynb", tmp_path, use_sandbox=False)
    assert results == {"score": 0.0, "output": GRADER_TROUBLE, "tests": []}
    assert json.loads((tmp_path / "results" / "results.json").read_text(encoding="utf-8")) == results


@pytest.mark.parametrize("argv, error", [
    (["grade", "--exercise", "add.ipynb"], "one of the two"),
    (["grade", "subs", "--gradescope", "b.zip", "--exercise", "add.ipynb"], "one of the two"),
    (["grade", "subs", "--install-spec", "x", "--exercise", "add.ipynb"], "--install-spec goes with --gradescope"),
])
def test_grade_takes_submissions_or_gradescope(argv, error, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2 and error in capsys.readouterr().err


# --- the gradebook CSV ----------------------------------------------------------------------------------------

def test_gradebook_has_one_row_per_student_with_total_and_questions_in_order():
    rows = [{"student": "ada", "question": "q2", "points": "2", "max_points": "2", "message": ""},
            {"student": "ada", "question": "q1", "points": "1.5", "max_points": "3", "message": ""},
            {"student": "=cmd|' /C calc'!A0", "question": "q1", "points": "0", "max_points": "3", "message": ""},
            {"student": "=cmd|' /C calc'!A0", "question": "q2", "points": "2", "max_points": "2", "message": ""}]
    table = list(csv.reader(io.StringIO(gradebook_csv(rows, {"q1": 3.0, "q2": 2.0}))))
    assert table == [["student", "total", "q1", "q2"], ["ada", "3.5", "1.5", "2"],
                     ["'=cmd|' /C calc'!A0", "2", "0", "2"]]


# --- course exercises validate --------------------------------------------------------------------------------

def _learner(solution: str, *before: str) -> dict:
    """A learner's saved notebook: imports, ``before`` cells, the solution, the visible tests, a check cell."""
    return notebook(("code", "from course_lib.grading import check, test"), *(("code", c) for c in before),
                    ("code", solution), ("code", strip_hidden(TESTS)), ("code", 'check("q1")'))


def test_validate_passes_a_correct_saved_notebook(tmp_path, capsys):
    path = write(tmp_path / "add.ipynb", _learner("def add(a, b):\n    return a + b"))
    assert main(["exercises", "validate", str(path)]) == 0
    out = capsys.readouterr().out
    assert "passed  q1 adds_small_numbers" in out and "raised" not in out.replace("(0 raised an error)", "")
    assert "This is what the grader will run: 2 code cells (0 raised an error), 1 of 1 visible tests passed; " \
           "the grader adds hidden tests on other inputs." in out


def test_validate_names_the_cell_that_raised_and_the_failed_test(tmp_path, capsys):
    path = write(tmp_path / "add.ipynb", _learner("def add(a, b):\n    return a - b", "x = 1 / 0"))
    assert main(["exercises", "validate", str(path)]) == 1
    out = capsys.readouterr().out
    assert "code cell 2 (`x = 1 / 0`) raised ZeroDivisionError: division by zero" in out
    assert "FAILED  q1 adds_small_numbers: " in out and "expected 3, got -1" in out and "hint: use +" in out
    assert "3 code cells (1 raised an error), 0 of 1 visible tests passed" in out


@pytest.mark.parametrize("content, error", [(None, "cannot read"), ("{not json", "not valid JSON"),
                                            ('{"cells": []}', "not a Jupyter notebook")])
def test_validate_refuses_what_is_not_a_saved_notebook(tmp_path, capsys, content, error):
    path = tmp_path / "mine.ipynb"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    assert main(["exercises", "validate", str(path)]) == 1
    err = capsys.readouterr().err
    assert str(path) in err and error in err


def test_every_learner_notebook_ends_with_how_to_validate_it():
    text = learner_notebook(add_exercise(), "add", "exercises/add.ipynb", Project("https://github.com/o/r", "0.1.0"))
    last = json.loads(text)["cells"][-1]
    assert last["id"] == "course-validate-markdown" and last["cell_type"] == "markdown"
    assert "course exercises validate add.ipynb" in "".join(last["source"])
