"""Graded exercises: markers, the learner's check(), building student versions, grading submissions."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from course_lib.grading import checks, markers, values
from course_lib.grading.build import build, source_notebooks, student_notebook
from course_lib.grading.cli import main
from course_lib.grading.grade import grade_folder, without_expect
from course_lib.grading.submissions import library_uses

EXERCISES = Path(__file__).resolve().parent.parent / "exercises" / "instructor"


def notebook(*cells: tuple[str, str]) -> dict:
    """A minimal nbformat-4 notebook from (cell_type, source) pairs."""
    def cell(kind, source):
        extra = {"outputs": [], "execution_count": None} if kind == "code" else {}
        return {"cell_type": kind, "metadata": {}, "source": source, **extra}
    return {"cells": [cell(*c) for c in cells], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}


SOLUTION = "def add(a, b):\n    # BEGIN SOLUTION\n    return a + b\n    # END SOLUTION"
TESTS = """# BEGIN TESTS
import operator

@test("q1", hint="use +", expect=lambda: operator.add(1, 2))
def adds_small_numbers():
    return add(1, 2)
# BEGIN HIDDEN
@test("q1", expect=7)
def adds_positive_numbers():
    return add(2, 5)


@test("q1", points=2, expect=-3)
def adds_negative_numbers():
    return add(-1, -2)
# END HIDDEN
# END TESTS"""


VARIANTS = """# BEGIN VARIANTS
# variant q1: subtracts
def add(a, b):
    return a - b
# variant q1: subtracts the other way
def add(a, b):
    return b - a
# variant q1: multiplies
def add(a, b):
    return a * b
# variant q1: off by one
def add(a, b):
    return a + b + 1
# variant q1: glues the digits
def add(a, b):
    return int(str(a) + str(b))
# END VARIANTS"""


def add_exercise(solution: str = SOLUTION, variants: str = VARIANTS) -> dict:
    """A pure-Python exercise (fast to run): one question, one visible and two hidden tests, five wrong variants."""
    return notebook(("markdown", "# Add"), ("code", "from course_lib.grading import check, test"),
                    ("markdown", "## q1: add two numbers (3 points, about 15 minutes)"),
                    ("code", solution), ("code", TESTS), ("code", 'check("q1")'), ("raw", variants))


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


def test_hidden_blocks_are_removed_and_kept_apart():
    assert markers.strip_hidden(TESTS).count("@test") == 1
    assert "adds_negative_numbers" not in markers.strip_hidden(TESTS)
    (block,) = markers.hidden_blocks(TESTS)
    assert block.startswith('@test("q1", expect=7)') and "return add(-1, -2)" in block and "HIDDEN" not in block


def test_a_submission_receives_the_tests_without_their_expected_results():
    sent = without_expect(TESTS)
    assert "operator.add(1, 2)" not in sent and "-3" not in sent and "expect" not in sent
    assert "points=2" in sent and "return add(1, 2)" in sent and "hint='use +'" in sent


def test_tests_and_check_cells_are_recognised():
    assert markers.is_tests_cell(TESTS) and not markers.is_tests_cell(SOLUTION)
    markers.check_tests_cell(TESTS)
    with pytest.raises(markers.MarkerError, match="must start with"):
        markers.check_tests_cell("# BEGIN TESTS\n@test('q1')\ndef t():\n    pass\n")
    assert markers.is_check_cell('check("q1")\n# again\ncheck(\'q2\')')
    assert not markers.is_check_cell('check("q1")\nx = 1') and not markers.is_check_cell("# only a comment")


def test_student_version_hides_solutions_hidden_tests_and_outputs():
    source = add_exercise()
    source["cells"][3]["outputs"] = [{"output_type": "stream", "name": "stdout", "text": "secret"}]
    student = student_notebook(source, "add")
    text = json.dumps(student)
    assert "return a + b" not in text and "adds_negative_numbers" not in text and "secret" not in text
    assert "NotImplementedError" in text and "adds_small_numbers" in text
    assert source["cells"][3]["outputs"], "the source notebook itself must not change"


# --- the learner's check() -----------------------------------------------------------------------------------

def test_check_prints_which_test_failed_with_a_hint_and_no_traceback(registry, capsys):
    def top_token(scores):
        return sorted(scores)[0] + undefined_name  # noqa: F821 -- the learner's bug

    @checks.test("q1", hint="Sort from high to low.", expect=3)
    def returns_the_largest():
        return top_token([1, 3, 2])

    @checks.test("q1", hint="Compare with max().", expect=3)
    def matches_max():
        return 1

    @checks.test("q1", expect=lambda: [1, 2])
    def always_passes():
        return [1, 2]

    checks.check("q1")
    out = capsys.readouterr().out
    assert "q1: 1 of 3 tests passed" in out
    assert "FAILED returns the largest" in out and "NameError: name 'undefined_name' is not defined" in out
    assert "in top_token: `return sorted(scores)[0] + undefined_name" in out, "the learner's line is quoted"
    assert "hint: Sort from high to low." in out and "expected 3, got 1" in out and "hint: Compare with max()." in out
    assert "Traceback" not in out and "always passes" not in out


def test_check_says_when_nothing_is_implemented_or_the_question_is_unknown(registry, capsys):
    @checks.test("q2", expect=1)
    def stub():
        raise NotImplementedError(markers.STUB_MESSAGE)

    checks.check("q2")
    checks.check("q9")
    out = capsys.readouterr().out
    assert "q2: not started yet" in out and "No tests for 'q9'" in out and "q2" in out.splitlines()[-1]


def test_check_reports_success(registry, capsys):
    checks.test("q1", expect=None)(lambda: None)
    checks.check("q1")
    assert capsys.readouterr().out.strip() == "q1: all 1 tests passed"


def test_a_test_without_expect_fails_and_says_it_is_the_exercise(registry):
    checks.test("q1")(lambda: 1)
    (outcome,) = checks.run_tests("q1")
    assert not outcome.passed and "no expect=" in outcome.message


def test_expected_and_result_see_the_same_seeded_inputs_and_leave_the_callers_rng_alone(registry):
    import random

    import torch

    torch.manual_seed(123)
    random.seed(5)
    before = torch.rand(1), random.random()
    torch.manual_seed(123)
    random.seed(5)
    checks.test("q1", expect=lambda: [torch.randn(3), random.random()])(lambda: [torch.randn(3), random.random()])
    (outcome,) = checks.run_tests("q1")
    assert outcome.passed, outcome.message
    assert (torch.rand(1), random.random()) == before


def test_check_says_in_a_sentence_how_a_result_differs(registry, capsys):
    import torch

    inf = float("inf")
    cases = [(lambda: torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.5]]),
              lambda: torch.tensor([[1.0, 2.0, -inf], [0.0, 0.0, 0.0]])),
             (lambda: torch.zeros(2, 1), lambda: torch.zeros(2)),
             (lambda: torch.zeros(2, dtype=torch.long), lambda: torch.zeros(2)),
             ([1, 2], lambda: (1, 2, 3)), (3, lambda: 3.0), ({"a": 1}, lambda: {"a": 2}), (1, lambda: object())]
    for number, (expect, result) in enumerate(cases):
        result.__name__ = f"case_{number}"
        checks.test("q1", expect=expect)(result)
    checks.check("q1")
    out = capsys.readouterr().out
    assert "the result differs in 2 of 6 values; first at [0, 2]: expected 3, got -inf" in out
    assert "the result has shape (2,), expected (2, 1)" in out
    assert "the result has dtype torch.float32, expected torch.int64" in out
    assert "the result has 3 items, expected 2" in out
    assert "the result is a float, expected an int" in out
    assert "the result['a'] is wrong: expected 1, got 2" in out
    assert "the result holds an object of type object; a test can return None, bool, int, float, str, a tensor" in out


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


@pytest.mark.parametrize("question, points", [("", 1), (3, 1), ("q1", 0), ("q1", float("nan"))])
def test_test_decorator_rejects_bad_arguments(question, points):
    with pytest.raises(ValueError):
        checks.test(question, points=points)


# --- values: what travels out of a sandbox -----------------------------------------------------------------

@pytest.mark.parametrize("value", [None, True, 3, -2.5, float("inf"), "text", [1, [2.0, "x"]], {"a": (1, 2)}])
def test_values_survive_the_json_round_trip(value):
    expected = json.loads(json.dumps(values.encode(value)))
    assert values.compare_values(values.decode(expected), values.decode(values.encode(value))) == ""


def test_tensors_keep_dtype_shape_and_special_values():
    import torch

    for tensor in (torch.tensor([[1.5, -float("inf")], [float("nan"), 0.0]]), torch.arange(6).reshape(2, 3),
                   torch.tensor([True, False]), torch.zeros(0, 4, dtype=torch.bfloat16)):
        back = values.decode(json.loads(json.dumps(values.encode(tensor))))
        assert back.dtype == tensor.dtype and back.shape == tensor.shape
        assert values.compare_values(back, tensor) == ""


@pytest.mark.parametrize("data", [
    {"tensor": "float32", "shape": [2], "values": [1.0]},          # shape and values disagree
    {"tensor": "complex64", "shape": [1], "values": [1.0]},        # not a dtype tests compare
    {"tensor": "int64", "shape": [1], "values": ["1"]},
    {"float": "1e999999"}, {"pickle": "gASV"}, {"str": 1}, [1, 2], "plain",
])
def test_decode_refuses_what_encode_cannot_have_made(data):
    with pytest.raises(ValueError):
        values.decode(data)


def test_hidden_differences_do_not_show_values():
    import torch

    message = values.compare_values(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 7.25]), show=False)
    assert message == "the result differs in 1 of 2 values" and "7.25" not in message


# --- build and grade ---------------------------------------------------------------------------------------

def refused_build(tmp_path: Path, capsys, source: dict) -> str:
    """Build ``source`` as the only exercise; assert that the build refuses and writes nothing; return its error."""
    write(tmp_path / "src" / "add.ipynb", source)
    assert main(["exercises", "build", str(tmp_path / "src"), str(tmp_path / "student")]) == 1
    assert not (tmp_path / "student").exists()
    return capsys.readouterr().err


def test_build_refuses_when_a_solution_fails_its_tests(tmp_path, capsys):
    err = refused_build(tmp_path, capsys, add_exercise(SOLUTION.replace("a + b", "a - b")))
    assert "refusing to build" in err and "adds_small_numbers" in err and "expected 3, got -1" in err


def test_build_refuses_when_a_task_header_states_other_points(tmp_path, capsys):
    nb = add_exercise()
    nb["cells"][2]["source"] = "## q1: add two numbers (5 points, about 25 minutes)"
    assert "the task headers ('## qN: title (P points, about M minutes)') state {'q1': 5.0}, the hidden tests give " \
           "{'q1': 3.0}" in refused_build(tmp_path, capsys, nb)


# The self-answering attack: the learner notebook holds the visible tests with their expect= references. A submission
# that records them (from a copy of the tests cells that is no tests cell) and wraps the registration of the tests the
# grader sends makes each visible test return its own expected value. Visible tests give no points, so it earns none.
SELF_ANSWERING = """import course_lib.grading.checks as _checks
_register, _answers = _checks.test, {}


def _answering(question, hint="", points=None, *, expect=_checks._NOTHING, atol=None, rtol=None):
    def register(fn):
        if expect is not _checks._NOTHING:
            _answers[fn.__name__] = expect
        elif fn.__name__ in _answers:
            answer, name = _answers[fn.__name__], fn.__name__
            fn = lambda: answer() if callable(answer) else answer  # noqa: E731
            fn.__name__ = name
        return _register(question, hint, points, expect=expect, atol=atol, rtol=rtol)(fn)
    return register


_checks.test = test = _answering"""


def self_answering(learner: dict) -> dict:
    """The learner notebook with the attack cell and a copy of every tests cell (as plain code) at its end."""
    attack = copy.deepcopy(learner)
    code = [c for c in attack["cells"] if c["cell_type"] == "code"]
    copies = [{**c, "source": "# a copy\n" + markers.cell_source(c)} for c in code
              if markers.is_tests_cell(markers.cell_source(c))]
    attack["cells"] += [{**code[0], "source": SELF_ANSWERING}, *copies]
    return attack


def test_build_refuses_when_trivial_code_passes_a_hidden_test(tmp_path, capsys):
    nb = add_exercise()
    nb["cells"][4]["source"] = TESTS.replace("add(-1, -2)", "add(0, 0)").replace("expect=-3", "expect=0")
    err = refused_build(tmp_path, capsys, nb)
    assert "add.ipynb: wrong code earns points: q1: a stand-in that returns its first input passes " \
           "adds_negative_numbers (2 points)" in err
    assert "q1: a stand-in that returns 0 passes adds_negative_numbers (2 points)" in err
    assert "returns zeros shaped like its first tensor passes adds_negative_numbers" in err  # 0 for no tensor


def test_build_refuses_a_wrong_variant_that_earns_points_and_too_few_variants(tmp_path, capsys):
    err = refused_build(tmp_path, capsys, add_exercise(variants=VARIANTS.replace("a + b + 1", "a + b + 0")))
    assert "q1: the wrong variant 'off by one' passes adds_positive_numbers, adds_negative_numbers (3 points)" in err
    few = add_exercise(variants=VARIANTS.split("# variant q1: multiplies")[0] + "# END VARIANTS")
    assert "q1 has 2 wrong variants in the variants cell; write at least 5" in refused_build(tmp_path, capsys, few)


def test_build_refuses_a_later_cell_that_changes_what_the_tests_see(tmp_path, capsys):
    """check("q1") runs below the task, grading after the whole notebook: a cell in between that changes what the
    tests see (here it replaces the learner's function when it gets 2 + 2 wrong) makes the two disagree."""
    only_two_plus_two = "# variant q1: wrong for 2 + 2 only\ndef add(a, b):\n    return 5 if (a, b) == (2, 2) else a + b\n"
    nb = add_exercise(variants=VARIANTS.replace("# END VARIANTS", only_two_plus_two + "# END VARIANTS"))
    demo = {"cell_type": "code", "metadata": {}, "outputs": [], "execution_count": None,
            "source": "if add(2, 2) != 4:\n    add = lambda a, b: 0  # a demo that replaces a wrong function"}
    nb["cells"].insert(6, demo)
    err = refused_build(tmp_path, capsys, nb)
    assert "q1: with the wrong variant 'wrong for 2 + 2 only', test adds_small_numbers passes right after the task " \
           "but not once the cells below it ran again: check() and grading would disagree" in err
    assert "'off by one', test" not in err  # a variant that fails everywhere fails the same way at both places


def test_build_refuses_a_learner_copy_that_holds_an_answer(tmp_path, capsys):
    nb = add_exercise()
    nb["metadata"]["grading"] = {"library_implementations": {"q1": ["operator.add"]}}
    assert "add: the learner notebook holds answers: q1: operator.add" in refused_build(tmp_path, capsys, nb)
    nb["cells"][4]["source"] = TESTS.replace("expect=lambda: operator.add(1, 2)", "expect=3")
    nb["cells"][1]["source"] += "\nfrom operator import add as plus"
    assert "q1: operator.add" in refused_build(tmp_path, capsys, nb)  # imported, even if never used


def test_build_refuses_points_that_do_not_follow_the_minutes(tmp_path, capsys):
    nb = add_exercise()
    nb["cells"][2]["source"] = "## q1: add two numbers (3 points, about 40 minutes)"
    assert "points follow the minutes (one point per 5 minutes, at least 1): q1 states 3, its minutes give 8" \
        in refused_build(tmp_path, capsys, nb)


def test_the_learner_copy_leaves_the_variants_out():
    learner = student_notebook(add_exercise(), "add")
    assert "BEGIN VARIANTS" not in json.dumps(learner) and "a + b + 1" not in json.dumps(learner)
    assert [(q, label) for q, label, _code in markers.wrong_variants(add_exercise())] == [
        ("q1", "subtracts"), ("q1", "subtracts the other way"), ("q1", "multiplies"), ("q1", "off by one"),
        ("q1", "glues the digits")]


def test_build_refuses_points_on_a_visible_test_and_a_question_without_hidden_tests(tmp_path, capsys):
    nb = add_exercise()
    nb["cells"][4]["source"] = TESTS.replace('@test("q1", hint="use +"', '@test("q1", points=1, hint="use +"')
    nb["cells"][4]["source"] = nb["cells"][4]["source"].split("# BEGIN HIDDEN")[0] + "# END TESTS"
    err = refused_build(tmp_path, capsys, nb)
    assert "test adds_small_numbers of q1 is visible and states points=" in err
    assert "q1 has no hidden test, and only hidden tests give points" in err


def test_exercises_solutions_score_full_marks_and_student_versions_zero(tmp_path):
    """Every exercise in exercises/: the build verifies its solutions (and that trivial stand-ins earn nothing);
    graded in the sandbox, the source notebook itself scores full marks, its built student version scores 0 with
    no cell raising an error, and the self-answering attack passes visible tests but earns 0."""
    references = build(EXERCISES, tmp_path / "student", jobs=2)
    assert set(references) == {p.stem for p in source_notebooks(EXERCISES)}
    for name, reference in references.items():
        assert 2 <= len(reference.questions) <= 4, f"{name}: each exercise has 2-4 tasks"
        assert any(t.hidden for t in reference.tests), f"{name}: no hidden tests"
        submissions = tmp_path / "submissions" / name
        submissions.mkdir(parents=True)
        (submissions / "learner.ipynb").write_bytes((tmp_path / "student" / f"{name}.ipynb").read_bytes())
        (submissions / "solution.ipynb").write_bytes(reference.source.read_bytes())
        learner_nb = json.loads((tmp_path / "student" / f"{name}.ipynb").read_text(encoding="utf-8"))
        (submissions / "self_answering.ipynb").write_text(json.dumps(self_answering(learner_nb)), encoding="utf-8")
        rows = grade_folder(reference.source, submissions, tmp_path / "results" / name, jobs=2)
        attack = (tmp_path / "results" / name / "feedback" / "self_answering.txt").read_text(encoding="utf-8")
        visible = [t.name for t in reference.tests if not t.hidden]
        assert any(f"passed  {n}\n" in attack for n in visible), f"{name}: the attack did not work at all:\n{attack}"
        assert all(row["points"] == "0" for row in rows if row["student"] == "self_answering"), attack
        learner = [row for row in rows if row["student"] == "learner"]
        assert [row["question"] for row in learner] == list(reference.questions), name
        for row in learner:
            assert row["points"] == "0", f"{name} {row['question']}: a student version scored {row['points']}"
            assert row["message"].startswith("not attempted"), f"{name} {row['question']}: {row['message']}"
        for row in (row for row in rows if row["student"] == "solution"):
            assert row["points"] == row["max_points"], f"{name} {row['question']}: {row['message']}"
            assert "flagged" not in row["message"], f"{name}: the solution itself is flagged: {row['message']}"
        for student in ("learner", "solution"):
            feedback = (tmp_path / "results" / name / "feedback" / f"{student}.txt").read_text(encoding="utf-8")
            assert "raised an error" not in feedback, f"{name}: {student}'s cells must run to their end"


def test_library_use_is_found_in_the_lines_a_learner_wrote():
    template = ["from transformers import TopPLogitsWarper",
                "class Temperature:\n    def __call__(self, ids, scores):\n        " + markers.STUB,
                "def top_p_filter(scores, top_p):\n    " + markers.STUB]
    names = {"q1": ["course_lib.decoding.Temperature", "transformers.TemperatureLogitsWarper"],
             "q2": ["course_lib.decoding.TopP", "transformers.TopPLogitsWarper"]}
    own = ["class Temperature:\n    def __call__(self, ids, scores):\n        return scores / self.t",
           "def top_p_filter(scores, top_p):\n    return Temperature()(None, scores)  # TopPish"]
    assert library_uses(own + template[:1], template, names) == {}
    uses = library_uses(["from course_lib.decoding import Temperature as T",
                         "def top_p_filter(scores, top_p):\n    return TopPLogitsWarper(top_p)(None, scores)"],
                        template, names)
    assert uses == {"q1": ["course_lib.decoding.Temperature"], "q2": ["transformers.TopPLogitsWarper"]}
    assert library_uses(["x = decoding.Temperature(0.5)"], template, names) == {"q1": ["course_lib.decoding.Temperature"]}


def test_check_without_a_question_sums_up_every_task(registry, capsys):
    checks.test("q1", points=2, expect=1)(lambda: 1)
    wrong = lambda: 2  # noqa: E731
    wrong.__name__ = "wrong"
    checks.test("q2", expect=1)(wrong)
    right = lambda: 1  # noqa: E731
    right.__name__ = "right"
    checks.test("q2", expect=1)(right)

    def stub():
        raise NotImplementedError(markers.STUB_MESSAGE)

    checks.test("q3", points=3, expect=1)(stub)
    checks.check()
    assert capsys.readouterr().out.splitlines() == [
        "q1: done, all 1 tests pass",
        "q2: 1 of 2 tests failing: run check('q2') for details",
        "q3: not attempted",
        "These tests show whether your code works; the points come from the grader's tests of the same behaviour "
        "on other inputs."]


def test_check_without_tests_says_to_run_the_notebook(registry, capsys):
    checks.check()
    assert "No tests yet: run the notebook's cells from the top" in capsys.readouterr().out
