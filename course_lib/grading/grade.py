"""Grading a folder of submitted notebooks against an exercise's source notebook.

The instructor's run (``verify``) executes the source notebook, solutions and all tests, and keeps what each test
expects. Each submission then runs in its own sandbox (``sandbox.run_sandboxed``) on the same tests with
``expect=`` removed, and returns only the data its functions produced. This process, which never runs a
submission's code, compares that data with the expected results and awards the points. Only hidden tests give
points: a visible test's expected result can be computed from the learner notebook, so a submission can always
forge it; visible tests give feedback. Every text in the feedback and the CSVs is written here and capped; a hidden
test's verdict is one of a fixed list of categories, so nothing the submission chose (exception names, keys,
strings) leaves with it. The only text taken from a submission is the error of its own cells, read before any
test was sent into its sandbox. One submission's trouble costs that submission only.
"""

from __future__ import annotations

import ast
import builtins
import csv
import io
import json
import os
import re
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from course_lib.grading import sandbox, trivial
from course_lib.grading.markers import (cells_below_tests, hidden_blocks, is_check_cell, is_tests_cell,
                                        solution_functions, strip_hidden, student_notebook, wrong_variants)
from course_lib.grading.submissions import Submission, code_cells, learner_cells, library_uses, read_folder
from course_lib.grading.values import compare_values, decode, difference

_RUNNING = re.compile(r"^(code cell \d+|test \w+)$")
# The only words feedback gives about a hidden test: the submission chose every other text it could send.
RAISED, TIMED_OUT, NOT_ATTEMPTED, NOT_RUN = "raised an exception", "timed out", "not attempted", "not run"
_BUILTIN_ERRORS = frozenset(name for name, value in vars(builtins).items()
                            if isinstance(value, type) and issubclass(value, BaseException))
MAX_FIELD = 2000       # characters of one CSV field or feedback message
TEST_SECONDS = 20.0    # one test's time budget inside a run (at most a quarter of the run's)


class ExerciseError(ValueError):
    """The exercise's own solution does not pass its tests (or cannot run), so nothing can be graded."""


@dataclass
class RefTest:
    """One test as the instructor's run defined it: the only source of points, tolerances and expectations."""

    question: str
    name: str
    points: float
    hint: str
    hidden: bool
    expected: object
    atol: float | None
    rtol: float | None


@dataclass
class Reference:
    """An exercise's source notebook after its solutions passed all their tests."""

    source: Path
    tests: list[RefTest]
    submission_jobs: list[dict]       # the tests jobs a submission receives: visible parts, then hidden ones
    visible_jobs: int
    template: list[str]               # the learner's starting code cells (for library_uses)
    library: dict[str, list[str]]     # question -> library implementations to flag
    sandboxed: bool
    seconds: float

    @property
    def questions(self) -> dict[str, float]:
        """question -> max points, in notebook order."""
        points: dict[str, float] = {}
        for t in self.tests:
            points[t.question] = points.get(t.question, 0.0) + t.points
        return points


def without_expect(source: str) -> str:
    """A tests cell's source with every ``expect=`` removed from its ``@test(...)`` decorators (what a
    submission's sandbox receives: the expected results exist only in the instructor's run)."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "test":
            node.keywords = [k for k in node.keywords if k.arg != "expect"]
    return ast.unparse(tree)


def _test_parts(tests_cells: list[str], where: Path) -> tuple[list[str], int]:
    """The sources of the tests jobs (all visible parts, then all hidden parts) and how many are visible."""
    visible = [strip_hidden(c) for c in tests_cells]
    parts = visible + [h for c in tests_cells for h in hidden_blocks(c)]
    for part in parts:
        try:
            ast.parse(part)
        except SyntaxError as exc:
            raise ExerciseError(f"{where.name}: a tests cell (or one of its hidden blocks) is not valid Python on "
                                f"its own: {exc}") from None
    return parts, len(visible)


def _load_source(source: Path) -> tuple[dict, list[str], list[str]]:
    try:
        notebook = json.loads(Path(source).read_text(encoding="utf-8"))
        cells = code_cells(notebook)
    except (OSError, ValueError) as exc:
        raise ExerciseError(f"{source}: cannot read the exercise's source notebook: {exc}") from None
    tests = [c for c in cells if is_tests_cell(c)]
    if not tests:
        raise ExerciseError(f"{source}: the exercise has no tests cell ('# BEGIN TESTS' ... '# END TESTS')")
    return notebook, [c for c in cells if not (is_tests_cell(c) or is_check_cell(c))], tests


MIN_VARIANTS = 5  # wrong variants each task's source must hold


def result_problem(entry: dict) -> str:
    """"" when a test report holds a result equal to the expected value computed in the same run (the
    instructor's run, ``course exercises validate``), else what is wrong."""
    test, result, expected = entry["test"], entry["result"], entry.get("expected", {})
    if "value" not in expected:
        return f"no expect= value could be computed ({expected.get('raised') or 'the test has no expect='})"
    if result.get("stub"):
        return f"{NOT_ATTEMPTED}: the code still raises NotImplementedError"
    if "value" not in result:
        return (f"your code raised {result['raised']}" if "raised" in result
                else TIMED_OUT if result.get("timed_out") else str(result.get("unsupported")))
    return compare_values(decode(result["value"]), decode(expected["value"]), test["atol"], test["rtol"])


@dataclass
class _WrongJob:
    """One job of the wrong-code check: for ``question``, the cell that puts ``what`` in place of the task's
    functions (``defines``), one of the question's tests parts, the notebook's cells below the question's tests,
    or the cell that puts the functions back. ``phase`` names when a tests part runs: "place" right after the
    definition (as ``check("qN")`` does below the task), "end" after the cells below it ran again (as grading
    does, after the whole notebook)."""

    question: str
    what: str
    job: dict
    defines: bool = False
    phase: str = ""


def _wrong_code_jobs(tasks: dict[str, list[tuple[str | None, str]]], variants: list[tuple[str, str, str]],
                     parts: list[str], visible: int, below: dict[str, list[str]]) -> list[_WrongJob]:
    """The jobs that run each task's tests (that question only) on each trivial stand-in (hidden tests) and wrong
    variant of the task's functions, putting the functions back after each. A variant's tests run twice: right
    after it is defined and again after the cells below the question's tests ran with it (``below``), so that
    the build sees whether a later cell changes what the tests see."""
    def tests(question: str, what: str, chosen: list[str], phase: str) -> list[_WrongJob]:
        return [_WrongJob(question, what, {"tests": without_expect(part), "only": question, "seconds": 10.0},
                          phase=phase) for part in chosen]

    jobs = []
    for q, targets in tasks.items():
        for kind in trivial.STAND_INS:
            what = f"a stand-in that {kind}"
            jobs += [_WrongJob(q, what, {"cells": [trivial.replace_source(targets, kind)]}, defines=True),
                     *tests(q, what, parts[visible:], "place"), _WrongJob(q, what, {"cells": [trivial.RESTORE_SOURCE]})]
    for q, label, code in variants:
        what = f"the wrong variant '{label}'"
        jobs += [_WrongJob(q, what, {"cells": [trivial.save_source(tasks.get(q, [])) + "\n" + code]}, defines=True),
                 *tests(q, what, parts, "place"), _WrongJob(q, what, {"cells": below.get(q, [])}),
                 *tests(q, what, parts, "end"), _WrongJob(q, what, {"cells": [trivial.RESTORE_SOURCE]})]
    return jobs


def _variant_count_problems(tasks: dict[str, list], variants: list[tuple[str, str, str]]) -> list[str]:
    """A line for each task with fewer than MIN_VARIANTS wrong variants."""
    counts = {q: sum(v[0] == q for v in variants) for q in tasks}
    return [f"{q} has {n} wrong variants in the variants cell; write at least {MIN_VARIANTS}"
            for q, n in counts.items() if n < MIN_VARIANTS]


def _wrong_code_problems(run: sandbox.Run, first: int, jobs: list[_WrongJob], tests: list[RefTest]) -> list[str]:
    """What wrong code earned (one line per stand-in or variant that passed a hidden test of its task), each
    test whose verdict on a variant changes between right after the task and after the cells below it
    (``check()`` in the notebook and grading would disagree), and each variant that raised when it was defined."""
    by_key = {(t.question, t.name): t for t in tests}
    passed: dict[tuple[str, str, str], dict[str, bool]] = {}  # (question, what, test) -> phase -> passed
    broken = set()
    for sent, entry in run.entries:
        if sent <= first:
            continue
        job = jobs[sent - first - 1]
        if "cell_error" in entry and job.defines:
            broken.add(f"{job.question}: {job.what} raises when it is defined: {entry['cell_error']['error']}")
        t = by_key.get((entry["test"]["question"], entry["test"]["name"])) if "test" in entry else None
        if t is not None and t.question == job.question:
            ok = "value" in entry["result"] and \
                not compare_values(decode(entry["result"]["value"]), t.expected, t.atol, t.rtol)
            passed.setdefault((job.question, job.what, t.name), {})[job.phase] = ok
    earned: dict[tuple[str, str], list[RefTest]] = {}
    for (q, what, name), phases in passed.items():
        if by_key[(q, name)].hidden and any(phases.values()):
            earned.setdefault((q, what), []).append(by_key[(q, name)])
    problems = [f"{q}: {what} passes {', '.join(t.name for t in won)} ({sum(t.points for t in won):g} points): "
                "make the hidden tests fail it" for (q, what), won in earned.items()]
    problems += [f"{q}: with {what}, test {name} {'passes' if phases.get('place') else 'fails'} right after the "
                 "task but not once the cells below it ran again: check() and grading would disagree"
                 for (q, what, name), phases in passed.items() if len(set(phases.values())) > 1]
    return problems + sorted(broken)


def _rule_problems(reported: list[tuple[dict, bool]]) -> list[str]:
    """The exercise's points rule, for (test, hidden) pairs: visible tests give feedback only, and every question
    has a hidden test."""
    problems = [f"test {t['name']} of {t['question']} is visible and states points=: a visible test's expected "
                "result can be looked up by the learner, so points belong to hidden tests only"
                for t, hidden in reported if not hidden and t["points"] is not None]
    questions = dict.fromkeys(t["question"] for t, _hidden in reported)
    problems += [f"{q} has no hidden test, and only hidden tests give points" for q in questions
                 if not any(hidden for t, hidden in reported if t["question"] == q)]
    return problems


def verify(source: Path, limits: sandbox.Limits | None = None, use_sandbox: bool = True,
           check_wrong_code: bool = False) -> Reference:
    """Run the source notebook's solutions against all its tests; ExerciseError unless everything passes.

    With ``check_wrong_code``, also run each task's hidden tests on trivial stand-ins (``trivial.STAND_INS``) and
    on the source's wrong variants, and refuse the exercise when one of them passes a hidden test or a task has
    fewer than MIN_VARIANTS variants (mutation testing of the tests)."""
    source, limits = Path(source), limits or sandbox.Limits(timeout=120.0)
    notebook, cells, tests_cells = _load_source(source)
    parts, visible = _test_parts(tests_cells, source)
    first_run = [{"cells": cells}, *({"tests": p} for p in parts)]
    tasks, variants = solution_functions(notebook), wrong_variants(notebook)
    wrong_jobs = _wrong_code_jobs(tasks, variants, parts, visible, cells_below_tests(notebook)) \
        if check_wrong_code else []
    run = sandbox.run_sandboxed(first_run + [w.job for w in wrong_jobs], limits, sandbox=use_sandbox)
    mine = [(sent, e) for sent, e in run.entries if sent <= len(first_run)]
    failures = [f"cell {e['cell_error']['cell']}: {e['cell_error']['error']}" for _, e in mine
                if "cell_error" in e] + [f"tests cell: {e['tests_error']}" for _, e in mine if "tests_error" in e]
    tests, reported = [], []
    for sent, entry in mine:
        if "test" not in entry:
            continue
        t, hidden = entry["test"], sent - 1 > visible
        reported.append((t, hidden))
        if problem := result_problem(entry):
            failures.append(f"test {t['name']} of {t['question']}: {problem}")
        if "value" not in entry.get("expected", {}):
            continue
        points = (1.0 if t["points"] is None else float(t["points"])) if hidden else 0.0
        tests.append(RefTest(t["question"], t["name"], points, t["hint"], hidden, decode(entry["expected"]["value"]),
                             t["atol"], t["rtol"]))
    failures += _rule_problems(reported)
    names = [(t.question, t.name) for t in tests]
    if len(set(names)) != len(names):
        failures.append("two tests of one question have the same name")
    if run.problem or failures or not tests:
        details = "; ".join(filter(None, [run.problem, *failures])) or "it defines no tests"
        raise ExerciseError(f"{source.name}: the solution does not pass its own tests: {details}"
                            + (f"\n{run.diagnostics[-2000:]}" if run.problem and run.diagnostics else ""))
    problems = (_wrong_code_problems(run, len(first_run), wrong_jobs, tests)
                + _variant_count_problems(tasks, variants)) if check_wrong_code else []
    if problems:
        raise ExerciseError(f"{source.name}: wrong code earns points: " + "; ".join(problems))
    template = learner_cells(student_notebook(notebook, source.stem))
    library = notebook.get("metadata", {}).get("grading", {}).get("library_implementations", {})
    return Reference(source, tests, [{"tests": without_expect(p)} for p in parts], visible,
                     template, library, use_sandbox, run.seconds)


@dataclass
class Verdict:
    """One test's result for one submission, decided here."""

    test: RefTest
    passed: bool = False
    message: str = f"{NOT_RUN} (the run ended before this test)"
    not_started: bool = False


@dataclass
class Graded:
    student: str
    verdicts: list[Verdict] = field(default_factory=list)
    cell_errors: list[str] = field(default_factory=list)
    problem: str = ""
    flags: dict[str, list[str]] = field(default_factory=dict)
    seconds: float = 0.0

    def earned(self, question: str) -> float:
        return sum(v.test.points for v in self.verdicts if v.passed and v.test.question == question)


def _verdict(test: RefTest, result: dict, trusted_text: bool) -> Verdict:
    """Compare what a submission returned for ``test`` with the instructor's expectation. A hidden test's message
    is one of the grader's categories; a visible test's message may show values, capped."""
    verdict = Verdict(test)
    if "value" in result:
        try:
            kind, text = difference(decode(result["value"]), test.expected, test.atol, test.rtol,
                                    show=not test.hidden)
        except Exception:  # noqa: BLE001 -- data the submission made: whatever decoding it raises costs this test
            kind, text = "wrong type", "the result could not be read"
        verdict.passed, verdict.message = not kind, text
        if kind and test.hidden:
            verdict.message = kind
    elif result.get("stub") is True:
        verdict.not_started, verdict.message = True, f"{NOT_ATTEMPTED}: the code still raises NotImplementedError"
    elif result.get("timed_out") is True:
        verdict.message = TIMED_OUT
    elif "raised" in result:
        name = result["raised"]
        shown = not test.hidden and isinstance(name, str) and name in _BUILTIN_ERRORS
        verdict.message = f"your code raised {name}" if shown else RAISED
    elif isinstance(result.get("unsupported"), str) and trusted_text and not test.hidden:
        verdict.message = result["unsupported"][:300]
    else:
        verdict.message = "wrong type" if test.hidden else "the result could not be read"
    return verdict


def first_line(cell: str) -> str:
    """A code cell's first line of code, to tell the learner which cell (the grader numbers code cells without
    the tests and check cells)."""
    line = next((line.strip() for line in cell.splitlines() if line.strip() and not line.strip().startswith("#")),
                "")
    return f"`{line[:60]}`" if len(line) <= 60 else f"`{line[:57]}...`"


def grade_submission(submission: Submission, reference: Reference, limits: sandbox.Limits) -> Graded:
    """Run one submission in its sandbox and decide every test of the reference here, each report as it arrives
    (nothing the submission sends is kept, so the grader's memory stays bounded)."""
    graded = Graded(submission.student, [Verdict(t) for t in reference.tests])
    by_name = {(t.question, t.name): v for t, v in zip(reference.tests, graded.verdicts)}
    seen, errors, running = set(), {}, "the start"

    def decide(sent: int, entry: dict) -> bool:
        nonlocal running
        error = entry.get("cell_error")
        if sent == 1 and isinstance(error, dict) and error.get("cell") in range(1, len(submission.cells) + 1):
            errors.setdefault(error["cell"], str(error.get("error"))[:300])  # read before any test was sent
        if isinstance(entry.get("running"), str) and _RUNNING.match(entry["running"]):
            running = entry["running"]
        test, result = entry.get("test"), entry.get("result")
        if sent >= 2 and isinstance(test, dict) and isinstance(result, dict):  # earlier "results" are forged
            key = (str(test.get("question")), str(test.get("name")))
            if key in by_name and key not in seen:  # one verdict per test the grader asked for; the rest is ignored
                seen.add(key)
                by_name[key] = _verdict(by_name[key].test, result, trusted_text=sent - 1 <= reference.visible_jobs)
        return False

    seconds = min(TEST_SECONDS, limits.timeout / 4)  # a test that hangs costs that test, not the run
    run = sandbox.run_sandboxed([{"cells": submission.cells}, *({**job, "seconds": seconds}
                                                                for job in reference.submission_jobs)],
                                limits, sandbox=reference.sandboxed, keep=decide)
    graded.seconds = run.seconds
    graded.cell_errors = [f"code cell {cell} ({first_line(submission.cells[int(cell) - 1])}): {text}"
                          for cell, text in sorted(errors.items())]
    if run.problem:
        names = {t.name for t in reference.tests}
        known = running if running.startswith("code cell") or running[5:] in names else "the start"
        graded.problem = f"{run.problem} while running {known}"
        for key, verdict in by_name.items():
            if known == f"test {key[1]}" and key not in seen:
                verdict.message = TIMED_OUT if run.problem.startswith("stopped after the time limit") else RAISED
    graded.verdicts = list(by_name.values())
    graded.flags = library_uses(submission.cells, reference.template, reference.library)
    return graded


def _graded_safely(submission: Submission, reference: Reference, limits: sandbox.Limits) -> Graded:
    """``grade_submission``, but anything that goes wrong while grading it costs this submission only."""
    try:
        return grade_submission(submission, reference, limits)
    except Exception as exc:  # noqa: BLE001 -- one submission must never stop the class
        failed = Graded(submission.student, [Verdict(t, message=NOT_RUN) for t in reference.tests])
        failed.problem = f"the grader could not grade this submission ({type(exc).__name__}); 0 points"
        return failed


def _cap(text: str) -> str:
    return text if len(text) <= MAX_FIELD else text[:MAX_FIELD - 5] + "[...]"


def _message(graded: Graded, question: str) -> str:
    mine = [v for v in graded.verdicts if v.test.question == question]
    parts = [graded.problem] if graded.problem else []
    parts += [f"flagged: uses {', '.join(graded.flags[question])} (the library's own implementation of this task)"] \
        if question in graded.flags else []
    if all(v.not_started for v in mine):
        return _cap(" | ".join(parts + [f"{NOT_ATTEMPTED}: the code still raises NotImplementedError"]))
    failed = [v for v in mine if not v.passed]
    if not failed:
        return _cap(" | ".join(parts + [f"all {len(mine)} tests passed"]))
    return _cap(" | ".join(parts + [f"{v.test.name}{' (hidden test)' if v.test.hidden else ''}: {v.message}"
                                    for v in failed]))


def feedback_text(graded: Graded, reference: Reference) -> str:
    """The feedback a student reads: points per question, each test's verdict, hints, the cells that raised."""
    total = sum(graded.earned(q) for q in reference.questions)
    lines = [f"Feedback for {graded.student} on {reference.source.stem}",
             f"Total: {total:g} / {sum(reference.questions.values()):g} points", "",
             "Points come from the hidden tests (other inputs than the ones you saw); the visible tests give "
             "feedback.", ""]
    if not reference.sandboxed:
        lines += ["Note: graded WITHOUT the sandbox (--no-sandbox).", ""]
    if graded.problem:
        lines += [f"Problem: {graded.problem}", ""]
    for question, max_points in reference.questions.items():
        lines.append(f"{question}: {graded.earned(question):g} / {max_points:g}")
        if question in graded.flags:
            lines.append(f"  flagged: your code uses {', '.join(graded.flags[question])}, the library's own "
                         "implementation of this task; your instructor decides whether it counts")
        for v in (v for v in graded.verdicts if v.test.question == question):
            hidden = " (hidden test)" if v.test.hidden else ""
            lines.append(f"  {'passed' if v.passed else 'FAILED'}  {v.test.name}{hidden}")
            if not v.passed:
                lines.append(f"      {_cap(v.message)}")
                lines += [f"      hint: {v.test.hint}"] if v.test.hint else []
    if graded.cell_errors:
        lines += ["", "Cells of your notebook that raised an error:"] + [f"  {_cap(e)}" for e in graded.cell_errors]
    return "\n".join(lines) + "\n"


def csv_safe(text: str) -> str:
    """A CSV cell that no spreadsheet runs as a formula: text starting with = + - @ or a control character
    gets a leading apostrophe."""
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r", "\n") else text


def _write_atomically(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _distinct(bases: list[str], key=lambda name: name) -> list[str]:
    """``bases`` with a suffix -2, -3... where a name's ``key`` equals an earlier one's."""
    names, used = [], set()
    for base in bases:
        name, n = base, 1
        while key(name) in used:
            n += 1
            name = f"{base}-{n}"
        used.add(key(name))
        names.append(name)
    return names


def display_names(students: list[str]) -> list[str]:
    """Each student name as plain printable text: undecodable bytes and control characters replaced, at most
    100 characters, made distinct where that made two names equal."""
    texts = (student.encode("utf-8", "surrogateescape").decode("utf-8", "replace") for student in students)
    return _distinct(["".join(c if c.isprintable() else "?" for c in text)[:100] or "?" for text in texts])


def _feedback_names(students: list[str]) -> dict[str, str]:
    """student -> a plain file name for their feedback (letters, digits, . _ -), distinct for distinct students
    (also on file systems that ignore case)."""
    bases = [re.sub(r"[^\w.-]", "_", student, flags=re.ASCII).lstrip(".")[:100] or "_" for student in students]
    return dict(zip(students, _distinct(bases, key=str.lower)))


def check_jobs(jobs: int) -> None:
    """ValueError unless ``jobs`` (notebooks run at a time) is a whole number >= 1."""
    if not (isinstance(jobs, int) and not isinstance(jobs, bool) and jobs >= 1):
        raise ValueError(f"jobs must be a whole number >= 1, got {jobs!r}")


def _check_results(results: Path, submissions: Path) -> None:
    """ValueError unless the results folder could be made and written (nothing is created yet)."""
    if results.resolve() == submissions.resolve():
        raise ValueError("results must be a different folder from the submissions")
    if results.exists() and not results.is_dir():
        raise ValueError(f"results: {results} exists and is not a folder")
    existing = next(p for p in [results, *results.resolve().parents] if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"results: cannot write to {results} ({existing} is not writable)")


def _prepare_results(results: Path) -> None:
    try:
        (results / "feedback").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"results: cannot write to {results} ({exc.strerror})") from None


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
        writer.writerow([csv_safe(student), f"{sum(float(c) for c in cells):g}", *cells])
    return out.getvalue()


def _write_results(results: Path, rows: list[dict], feedback: dict[str, str], questions: dict[str, float]) -> None:
    """``feedback/<student>.txt`` for each student (a file that cannot be written is reported, not fatal), then
    ``gradebook.csv`` (one row per student) and ``grades.csv`` (one row per student and question)."""
    for student, name in _feedback_names(list(feedback)).items():
        try:
            _write_atomically(results / "feedback" / f"{name}.txt", feedback[student])
        except OSError as exc:
            print(f"{student}: could not write the feedback file ({exc.strerror})", flush=True)
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=["student", "question", "points", "max_points", "message"])
    writer.writeheader()
    writer.writerows({k: csv_safe(_cap(v)) for k, v in row.items()} for row in rows)
    _write_atomically(results / "gradebook.csv", gradebook_csv(rows, questions))
    _write_atomically(results / "grades.csv", out.getvalue())


def grade_folder(source: Path, submissions: Path, results: Path, timeout: float = 60.0, jobs: int = 1,
                 reference: Reference | None = None, use_sandbox: bool = True,
                 memory_mb: int = 4096) -> list[dict]:
    """Grade every ``*.ipynb`` entry of ``submissions``; write ``grades.csv``, ``gradebook.csv`` and
    ``feedback/<student>.txt``.

    Every option, the folders and the exercise are checked before anything is written; one submission's
    trouble costs that submission only, so ``grades.csv`` is always written. ``jobs`` submissions run at a time.
    Returns the CSV rows.
    """
    source, submissions, results = Path(source), Path(submissions), Path(results)
    limits = sandbox.Limits(timeout=timeout, memory_mb=memory_mb)  # ValueError for a bad timeout or memory
    check_jobs(jobs)
    if not submissions.is_dir():
        raise ValueError(f"submissions: {submissions} is not a folder of submitted notebooks")
    _check_results(results, submissions)
    if reference is None and not source.is_file():
        raise ValueError(f"exercise: {source} is not a file (give the exercise's instructor source notebook)")
    entries = read_folder(submissions)  # everything read before the first submission runs
    if not entries:
        raise ValueError(f"submissions: {submissions} holds no notebooks (*.ipynb); nothing to grade")
    for entry, name in zip(entries, display_names([e.student for e in entries])):
        entry.student = name
    if use_sandbox and (problem := sandbox.bwrap_problem()):
        raise ValueError(f"cannot grade safely: {problem}. Only for submissions you trust: --no-sandbox")
    reference = reference or verify(source, sandbox.Limits(timeout=max(timeout, 120.0), memory_mb=memory_mb),
                                    use_sandbox)
    _prepare_results(results)
    gradable = [s for s in entries if s.cells is not None]
    with ThreadPoolExecutor(max_workers=jobs) as pool:  # threads only wait; the work is in the sandboxes
        graded = dict(zip((s.student for s in gradable),
                          pool.map(lambda s: _graded_safely(s, reference, limits), gradable)))
    rows, feedback = [], {}
    warning = "" if use_sandbox else "graded without the sandbox | "
    for entry in entries:
        result = graded.get(entry.student)
        if result is None:
            print(f"{entry.student}: not graded: {entry.skipped}", flush=True)
        else:
            total = sum(result.earned(q) for q in reference.questions)
            print(f"{entry.student}: {total:g} / {sum(reference.questions.values()):g} points in "
                  f"{result.seconds:.1f} s{' (' + result.problem + ')' if result.problem else ''}", flush=True)
            feedback[entry.student] = feedback_text(result, reference)
        for question, max_points in reference.questions.items():
            message = _message(result, question) if result else f"not graded: {entry.skipped}"
            rows.append({"student": entry.student, "question": question,
                         "points": f"{result.earned(question):g}" if result else "0",
                         "max_points": f"{max_points:g}", "message": warning + message})
    _write_results(results, rows, feedback, reference.questions)
    return rows
