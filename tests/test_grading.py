"""Graded exercises: markers, the learner's check(), building student versions, grading submissions."""
from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import pytest

from course_lib.grading import checks, markers
from course_lib.grading.build import build, source_notebooks, student_notebook
from course_lib.grading.cli import main
from course_lib.grading.grade import grade_folder

EXERCISES = Path(__file__).resolve().parent.parent / "exercises"


def notebook(*cells: tuple[str, str]) -> dict:
    """A minimal nbformat-4 notebook from (cell_type, source) pairs."""
    def cell(kind, source):
        extra = {"outputs": [], "execution_count": None} if kind == "code" else {}
        return {"cell_type": kind, "metadata": {}, "source": source, **extra}
    return {"cells": [cell(*c) for c in cells], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}


SOLUTION = "def add(a, b):\n    # BEGIN SOLUTION\n    return a + b\n    # END SOLUTION"
TESTS = """# BEGIN TESTS
@test("q1", hint="use +")
def adds_small_numbers():
    assert add(1, 2) == 3, f"add(1, 2) returned {add(1, 2)!r}, expected 3"
# BEGIN HIDDEN
@test("q1", points=2)
def adds_negative_numbers():
    assert add(-1, -2) == -3
# END HIDDEN
# END TESTS"""


def add_exercise(solution: str = SOLUTION) -> dict:
    """A pure-Python exercise (fast to run): one question, one visible and one hidden test."""
    return notebook(("markdown", "# Add"), ("code", "from course_lib.grading import check, test"),
                    ("code", solution), ("code", TESTS), ("code", 'check("q1")'))


def write(path: Path, nb: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(nb), encoding="utf-8")
    return path


@pytest.fixture
def registry():
    """An empty test registry for the duration of a test, restored afterwards."""
    saved = dict(checks.REGISTRY)
    checks.REGISTRY.clear()
    yield checks.REGISTRY
    checks.REGISTRY.clear()
    checks.REGISTRY.update(saved)


# --- markers ------------------------------------------------------------------------------------------------

def test_solution_block_becomes_a_stub_at_its_indentation():
    source = "def f(x):\n    y = 1\n    # BEGIN SOLUTION\n    return x + y\n    # END SOLUTION\n"
    assert markers.strip_solutions(source) == f"def f(x):\n    y = 1\n    {markers.STUB}"


@pytest.mark.parametrize("source, problem", [
    ("def f():\n    # BEGIN SOLUTION\n    return 1\n", "never closed"),
    ("def f():\n    return 1\n    # END SOLUTION\n", "without a"),
    ("def f():\n    # BEGIN SOLUTION\n    # BEGIN SOLUTION\n    # END SOLUTION\n", "inside another"),
    ("# BEGIN SOLUTION\nx = 1\n# END SOLUTION\n", "inside a function body"),
])
def test_bad_solution_markers_are_refused(source, problem):
    with pytest.raises(markers.MarkerError, match=problem):
        markers.strip_solutions(source, "nb, cell 3")


def test_hidden_blocks_are_removed_and_their_tests_named():
    assert markers.strip_hidden(TESTS).count("@test") == 1
    assert "adds_negative_numbers" not in markers.strip_hidden(TESTS)
    assert markers.hidden_test_names(TESTS) == {"adds_negative_numbers"}


def test_tests_and_check_cells_are_recognised():
    assert markers.is_tests_cell(TESTS) and not markers.is_tests_cell(SOLUTION)
    markers.check_tests_cell(TESTS)
    with pytest.raises(markers.MarkerError, match="must start with"):
        markers.check_tests_cell("# BEGIN TESTS\n@test('q1')\ndef t():\n    pass\n")
    assert markers.is_check_cell('check("q1")\n# again\ncheck(\'q2\')')
    assert not markers.is_check_cell('check("q1")\nx = 1') and not markers.is_check_cell("# only a comment")


def test_student_version_hides_solutions_hidden_tests_and_outputs():
    source = add_exercise()
    source["cells"][2]["outputs"] = [{"output_type": "stream", "name": "stdout", "text": "secret"}]
    student = student_notebook(source, "add")
    text = json.dumps(student)
    assert "return a + b" not in text and "adds_negative_numbers" not in text and "secret" not in text
    assert "NotImplementedError" in text and "adds_small_numbers" in text
    assert source["cells"][2]["outputs"], "the source notebook itself must not change"


# --- the learner's check() -----------------------------------------------------------------------------------

def test_check_prints_which_test_failed_with_a_hint_and_no_traceback(registry, capsys):
    def top_token(scores):
        return sorted(scores)[0] + undefined_name  # noqa: F821 -- the learner's bug

    @checks.test("q1", hint="Sort from high to low.")
    def returns_the_largest():
        assert top_token([1, 3, 2]) == 3

    @checks.test("q1", hint="Compare with max().")
    def matches_max():
        assert False, "expected 3, got 1"

    @checks.test("q1")
    def always_passes():
        pass

    checks.check("q1")
    out = capsys.readouterr().out
    assert "q1: 1 of 3 tests passed" in out
    assert "FAILED returns the largest" in out and "NameError: name 'undefined_name' is not defined" in out
    assert "in top_token: `return sorted(scores)[0] + undefined_name" in out, "the learner's line is quoted"
    assert "hint: Sort from high to low." in out and "expected 3, got 1" in out and "hint: Compare with max()." in out
    assert "Traceback" not in out and "always passes" not in out


def test_check_says_when_nothing_is_implemented_or_the_question_is_unknown(registry, capsys):
    @checks.test("q2")
    def stub():
        raise NotImplementedError("your code here")

    checks.check("q2")
    checks.check("q9")
    out = capsys.readouterr().out
    assert "q2: not started yet" in out and "No tests for 'q9'" in out and "q2" in out.splitlines()[-1]


def test_check_reports_success(registry, capsys):
    checks.test("q1")(lambda: None)
    checks.check("q1")
    assert capsys.readouterr().out.strip() == "q1: all 1 tests passed"


def test_check_says_in_a_sentence_what_assert_close_found(registry, capsys):
    import torch

    @checks.test("q1")
    def masks_the_right_token():  # the learner's filter removed token 2, which should have stayed
        torch.testing.assert_close(torch.tensor([[1.0, 2.0, float("-inf")], [0.0, 0.0, 0.0]]),
                                   torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.5]]))

    @checks.test("q1")
    def has_the_right_shape():
        torch.testing.assert_close(torch.zeros(2), torch.zeros(2, 1))

    @checks.test("q1")
    def is_close():
        torch.testing.assert_close(torch.tensor([0.25, 1.0]), torch.tensor([0.25, 1.5]))

    @checks.test("q1")
    def returns_the_right_number():
        torch.testing.assert_close(2.0, 3.0)

    checks.check("q1")
    out = capsys.readouterr().out
    assert "2 of 6 values differ from the expected ones; the largest difference is at [0, 2]: expected 3, got -inf" in out
    assert "the result has shape (2,), expected (2, 1)" in out
    assert "1 of 2 values differ from the expected ones; the largest difference is at [1]: expected 1.5, got 1 " \
           "(off by 0.5)" in out
    assert "expected 3, got 2 (off by 1)" in out
    assert "Greatest" not in out and "allowed" not in out and "not close" not in out


def test_a_demo_cell_says_which_stub_to_write_instead_of_a_traceback(capsys):
    namespace = {}
    exec(markers.strip_solutions(SOLUTION) + "\nclass Filter:\n    def __init__(self):\n        "
         + markers.STUB, namespace)
    with checks.needs_your_code():
        print("before")
        namespace["add"](1, 2)
        print("never printed")
    with checks.needs_your_code():
        namespace["Filter"]()
    with checks.needs_your_code():
        print("all written")
    out = capsys.readouterr().out.splitlines()
    assert out == ["before", "not implemented yet: write add above and run its cell, then run this cell again",
                   "not implemented yet: write Filter.__init__ above and run its cell, then run this cell again",
                   "all written"]
    with pytest.raises(NotImplementedError, match="sparse"), checks.needs_your_code():
        raise NotImplementedError("sparse tensors are not supported")  # not a stub: a real error goes through


@pytest.mark.parametrize("question, points", [("", 1), (3, 1), ("q1", 0)])
def test_test_decorator_rejects_bad_arguments(question, points):
    with pytest.raises(ValueError):
        checks.test(question, points=points)


# --- build and grade ---------------------------------------------------------------------------------------

def test_build_refuses_when_a_solution_fails_its_tests(tmp_path, capsys):
    write(tmp_path / "src" / "add.ipynb", add_exercise(SOLUTION.replace("a + b", "a - b")))
    assert main(["exercises", "build", str(tmp_path / "src"), str(tmp_path / "student")]) == 1
    err = capsys.readouterr().err
    assert "refusing to build" in err and "adds_small_numbers" in err and "add(1, 2) returned -1" in err
    assert not (tmp_path / "student").exists()


def test_grade_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="not a folder"):
        grade_folder(tmp_path / "add.ipynb", tmp_path / "missing", tmp_path / "results")
    with pytest.raises(ValueError, match="timeout must be positive"):
        grade_folder(tmp_path / "add.ipynb", tmp_path, tmp_path / "results", timeout=0)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_one_bad_submission_never_spoils_the_others(tmp_path):
    source = write(tmp_path / "src" / "add.ipynb", add_exercise())
    subs = tmp_path / "submissions"
    write(subs / "good.ipynb", add_exercise())
    write(subs / "empty.ipynb", student_notebook(add_exercise(), "add"))
    (subs / "invalid.ipynb").write_text('{"cells": [ not json', encoding="utf-8")
    outside = tmp_path / "outside.txt"

    def with_cells(*codes: str) -> dict:
        """The solution notebook with extra code cells (code cells 2, 3, ...) before the solution."""
        nb = add_exercise()
        nb["cells"][2:2] = [{"cell_type": "code", "metadata": {}, "outputs": [], "execution_count": None,
                             "source": code} for code in codes]
        return nb

    write(subs / "loops.ipynb", with_cells("while True:\n    pass"))
    write(subs / "crashes.ipynb", with_cells("import os\nos._exit(3)"))
    write(subs / "vandal.ipynb", with_cells(  # each misdeed in its own cell, so that all of them are tried
        f"open({str(outside)!r}, 'w').write('x')",
        f"import os\nos.remove({str(subs / 'good.ipynb')!r})",
        "import os\nos.kill(os.getppid(), 9)",
        "!rm -rf ..",
    ))
    before = {p.name: _sha256(p) for p in subs.iterdir()}

    results = tmp_path / "results"
    assert main(["grade", str(subs), str(results), "--exercise", str(source), "--timeout", "15", "--jobs", "2"]) == 0

    assert {p.name: _sha256(p) for p in subs.iterdir()} == before, "submitted files must never change"
    assert not outside.exists()
    with open(results / "grades.csv", newline="", encoding="utf-8") as f:
        rows = {row["student"]: row for row in csv.DictReader(f)}
    assert set(rows) == {"good", "empty", "invalid", "loops", "crashes", "vandal"}
    assert all(row["question"] == "q1" and row["max_points"] == "3" for row in rows.values())
    points = {student: row["points"] for student, row in rows.items()}
    assert points == {"good": "3", "empty": "0", "invalid": "0", "loops": "0", "crashes": "0", "vandal": "3"}
    assert rows["good"]["message"] == "all 2 tests passed"
    assert "NotImplementedError" in rows["empty"]["message"]
    assert "could not be read as a notebook" in rows["invalid"]["message"]
    assert "time limit of 15 s while running code cell 2" in rows["loops"]["message"]
    assert "exited with code 3" in rows["crashes"]["message"]
    feedback = (results / "feedback" / "vandal.txt").read_text()
    for blocked in ("writing to", "changing", "sending signals to other processes", "starting other programs"):
        assert blocked in feedback, f"the vandal's feedback should report the blocked action: {blocked}"
    assert "Total: 3 / 3 points" in (results / "feedback" / "good.txt").read_text()
    assert "adds_negative_numbers (hidden test)" in (results / "feedback" / "empty.txt").read_text()


def test_exercises_solutions_score_full_marks_and_student_versions_zero(tmp_path):
    """Every exercise in exercises/: the build verifies full marks; each built student version scores 0."""
    references = build(EXERCISES, tmp_path / "student", jobs=2)
    assert set(references) == {p.stem for p in source_notebooks(EXERCISES)}
    for name, reference in references.items():
        assert all(o["passed"] for o in reference.result.outcomes), name
        assert 2 <= len(reference.questions) <= 4, f"{name}: each exercise has 2-4 tasks"
        assert any(o["hidden"] for o in reference.result.outcomes), f"{name}: no hidden tests"
        submissions = tmp_path / "submissions" / name
        submissions.mkdir(parents=True)
        (submissions / "learner.ipynb").write_bytes((tmp_path / "student" / f"{name}.ipynb").read_bytes())
        rows = grade_folder(reference.source, submissions, tmp_path / "results" / name, jobs=2, reference=reference)
        assert [row["question"] for row in rows] == list(reference.questions), name
        for row in rows:
            assert row["points"] == "0", f"{name} {row['question']}: a student version scored {row['points']}"
            assert row["message"].startswith("not attempted"), f"{name} {row['question']}: {row['message']}"
        feedback = (tmp_path / "results" / name / "feedback" / "learner.txt").read_text(encoding="utf-8")
        assert "raised an error" not in feedback, f"{name}: a fresh copy must run to its end (demo cells too)"
