"""Building the learner notebooks of the exercises from their instructor sources.

Every ``*.ipynb`` directly in the sources folder (``exercises/instructor``) is an exercise; adding a topic's
exercise is adding one file. The build checks each source's markers and task headers, runs its solutions
against all of its tests and refuses to write anything when one fails; then it writes the learner notebook
(``exercises/NN_topic_exercises.ipynb``): solutions stubbed out, hidden tests, variants and outputs removed, an
"Open in Colab" badge and a setup cell on top. It also replaces each task's functions with trivial stand-ins
(``trivial.STAND_INS``: return the input, None, zeros, the uniform distribution...) and with the source's wrong
variants (at least five per task), and refuses the exercise when one of them passes a hidden test: only hidden
tests give points, and none may give them for wrong code. Each variant's tests run right after it is defined (where
``check("qN")`` runs them) and again after the cells below the task (where grading runs them); a verdict that
differs refuses the exercise, so ``check()`` and grading agree. A learner notebook that imports or uses one of a
task's library implementations is refused too. The learner notebook is a pure function of its source,
so ``build --check`` can tell, without running anything, whether a committed learner notebook is out of date.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from course_lib.colab import (SETUP_TAG, Project, badge_source, find_project, notebook_json, setup_source,
                              with_setup_cells)
from course_lib.grading.grade import ExerciseError, Reference, check_jobs, verify
from course_lib.grading.markers import student_notebook, task_headers
from course_lib.grading.submissions import code_cells, library_imports, library_uses
from course_lib.grading.sandbox import Limits


def source_notebooks(source_dir: Path) -> list[Path]:
    """The exercise sources: every notebook directly inside ``source_dir``."""
    found = sorted(Path(source_dir).glob("*.ipynb"))
    if not found:
        raise ValueError(f"no exercise notebooks (*.ipynb) in {source_dir}")
    return found


def learner_notebook(source: dict, name: str, path_in_repo: str, project: Project) -> str:
    """The text of the learner notebook cut from ``source``: the student version with the Colab badge (for the
    learner notebook at ``path_in_repo``) and setup cell first, a cell on ``course exercises validate`` last,
    without execution timestamps."""
    notebook = student_notebook(source, name)
    for cell in notebook["cells"]:
        cell.get("metadata", {}).pop("execution", None)
    placeholders = [{"cell_type": kind, "id": f"course-setup-{kind}", "metadata": {"tags": [SETUP_TAG]}, "source": []}
                    for kind in ("markdown", "code")]
    placeholders[1].update(execution_count=None, outputs=[])
    file_name = Path(path_in_repo).name
    validate = f"""## Before you hand in

Save the notebook, then run, in a terminal in this notebook's folder:

    course exercises validate {file_name}

(or `!course exercises validate {file_name}` in a code cell). It runs the saved file from top to bottom in a fresh
process, as the grader will, and tells you which cells raise an error and which of the tests above fail; the grader
then adds hidden tests on other inputs. On Colab the notebook is not a file on the machine: download it (File >
Download > Download .ipynb) and validate it where the course is installed."""
    last = {"cell_type": "markdown", "id": "course-validate-markdown", "metadata": {},
            "source": validate.splitlines(keepends=True)}
    notebook["cells"] = placeholders + notebook["cells"] + [last]  # fixed ids: the same source, the same file
    return notebook_json(with_setup_cells(notebook, badge_source(project, path_in_repo), setup_source(project)))


def _learner_texts(sources: list[Path], student_dir: Path) -> dict[Path, str]:
    project = find_project(Path(__file__).parent)
    return {student_dir / p.name: learner_notebook(json.loads(p.read_text(encoding="utf-8")), p.stem,
                                                   f"{student_dir.name}/{p.name}", project) for p in sources}


def points_for(minutes: int) -> float:
    """The points a task of about ``minutes`` minutes is worth: one per 5 minutes, rounded, at least 1."""
    return float(max(1, round(minutes / 5)))


def _check_headers(reference: Reference) -> str:
    """"" when the task headers state each question's points, and the points follow the minutes, else what
    disagrees."""
    headers = task_headers(json.loads(reference.source.read_text(encoding="utf-8")))
    stated = {q: points for q, (points, _minutes) in headers.items()}
    if stated != reference.questions:
        return (f"{reference.source.name}: the task headers ('## qN: title (P points, about M minutes)') state "
                f"{stated}, the hidden tests give {reference.questions}")
    effort = {q: (points, points_for(minutes)) for q, (points, minutes) in headers.items()
              if points != points_for(minutes)}
    if effort:
        return (f"{reference.source.name}: points follow the minutes (one point per 5 minutes, at least 1): "
                + ", ".join(f"{q} states {p:g}, its minutes give {m:g}" for q, (p, m) in effort.items()))
    return ""


def _answers_in_learner_copy(source: dict, name: str) -> str:
    """"" when the learner notebook cut from ``source`` neither imports nor uses a library implementation of one
    of its tasks (the notebook's ``library_implementations``), else which ones it does: the references the tests
    need belong in hidden blocks, and visible tests compare with literal values or properties."""
    cells = code_cells(student_notebook(source, name))
    library = source.get("metadata", {}).get("grading", {}).get("library_implementations", {})
    found = {q: sorted(set(library_uses(cells, [], library).get(q, []) + library_imports(cells, library).get(q, [])))
             for q in library}
    found = {q: names for q, names in found.items() if names}
    if not found:
        return ""
    return (f"{name}: the learner notebook holds answers: " + "; ".join(f"{q}: {', '.join(n)}" for q, n in found.items())
            + " (move the references into a hidden block; visible tests compare with literal values or properties)")


def out_of_date(source_dir: Path, student_dir: Path) -> list[Path]:
    """The learner notebooks in ``student_dir`` that differ from what ``build`` would write (nothing runs)."""
    texts = _learner_texts(source_notebooks(source_dir), Path(student_dir))
    return [p for p, text in texts.items() if not p.is_file() or p.read_text(encoding="utf-8") != text]


def build(source_dir: Path, student_dir: Path, timeout: float = 600.0, jobs: int = 1) -> dict[str, Reference]:
    """Verify every exercise in ``source_dir`` and write its learner notebook to ``student_dir``.

    Raises ExerciseError (writing nothing) when a solution fails its tests, a stand-in or wrong variant passes a
    hidden test, a variant's verdicts change once the cells below its task ran, a task has too few variants, the
    learner copy holds a library implementation of a task, or a task header states other points than its hidden
    tests give or than its minutes are worth.
    Returns the verified references by notebook name, which ``grade_folder`` accepts to skip verifying again.
    """
    sources, student_dir = source_notebooks(source_dir), Path(student_dir)
    Limits(timeout=timeout)  # ValueError for a bad timeout before anything runs
    check_jobs(jobs)
    texts = _learner_texts(sources, student_dir)  # cheap checks of every notebook's markers first

    def try_verify(path: Path) -> Reference | str:
        if answers := _answers_in_learner_copy(json.loads(path.read_text(encoding="utf-8")), path.stem):
            return answers
        try:  # the instructor's own notebooks: no sandbox needed (and none on macOS)
            reference = verify(path, Limits(timeout=timeout), use_sandbox=False, check_wrong_code=True)
        except ExerciseError as exc:
            return str(exc)
        return _check_headers(reference) or reference

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        verified = dict(zip(sources, pool.map(try_verify, sources)))
    references = {p.stem: r for p, r in verified.items() if isinstance(r, Reference)}
    failures = [r for r in verified.values() if isinstance(r, str)]
    for name, reference in references.items():
        print(f"{name}: solutions pass all {len(reference.tests)} tests ({reference.seconds:.1f} s)", flush=True)
    if failures:
        raise ExerciseError("refusing to build the learner notebooks:\n" + "\n".join(failures))
    student_dir.mkdir(parents=True, exist_ok=True)
    for path, text in texts.items():
        path.write_text(text, encoding="utf-8")
    return references
