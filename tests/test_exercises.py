"""The exercise notebooks as learners and instructors get them.

Every topic notebook 01-14 has an exercise. Its instructor source (exercises/instructor/, with solutions and
hidden tests; nbval runs it) builds the learner notebook (exercises/), which is committed: it must equal what
`course exercises build` writes, hold no solution and no hidden test, and run to its end in a kernel with every
check() saying the task is not attempted yet.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from course_lib.grading.build import out_of_date, source_notebooks
from course_lib.grading.markers import cell_source, is_tests_cell, task_headers

ROOT = Path(__file__).resolve().parent.parent
INSTRUCTOR, LEARNER = ROOT / "exercises" / "instructor", ROOT / "exercises"
TOPICS = sorted(p for p in (ROOT / "notebooks").glob("[01][0-9]_*.ipynb") if not p.name.startswith("00_"))
SOURCES = source_notebooks(INSTRUCTOR)


def _exercise_name(topic: Path) -> str:
    return f"{topic.stem}_exercises.ipynb"


def _solution_lines(source: dict) -> set[str]:
    """The substantial lines that only the solution blocks of a source notebook hold: a line that the rest of
    the source also holds (`with torch.no_grad():`, a formula the task text states) is no solution text."""
    solution, elsewhere, inside = set(), [], False
    for cell in source["cells"]:
        for line in cell_source(cell).splitlines():
            marker = line.strip()
            if marker in ("# BEGIN SOLUTION", "# END SOLUTION"):
                inside = marker == "# BEGIN SOLUTION"
            elif inside and len(marker) >= 12 and not marker.startswith("#"):
                solution.add(marker)
            elif not inside:
                elsewhere.append(line)
    given = "\n".join(elsewhere)
    return {line for line in solution if line not in given}


def _hidden_test_names(source: dict) -> set[str]:
    names = set()
    for cell in source["cells"]:
        for block in re.findall(r"# BEGIN HIDDEN\n(.*?)# END HIDDEN", cell_source(cell), re.DOTALL):
            names |= set(re.findall(r"^def (\w+)\(", block, re.MULTILINE))
    return names


def test_every_topic_has_an_exercise_and_links_to_it():
    assert len(TOPICS) == 14
    for topic in TOPICS:
        name = _exercise_name(topic)
        assert (INSTRUCTOR / name).is_file() and (LEARNER / name).is_file(), f"{topic.name} has no exercise {name}"
        markdown = " ".join(cell_source(c) for c in json.loads(topic.read_text())["cells"] if c["cell_type"] == "markdown")
        assert f"../exercises/{name}" in markdown, f"{topic.name} does not link to ../exercises/{name}"
    assert {p.name for p in SOURCES} == {_exercise_name(t) for t in TOPICS}


def test_learner_notebooks_are_what_the_build_writes():
    assert out_of_date(INSTRUCTOR, LEARNER) == [], "run `course exercises build` and commit exercises/*.ipynb"


@pytest.mark.parametrize("source_path", SOURCES, ids=lambda p: p.stem[:2])
def test_learner_notebooks_hold_no_solution_and_no_hidden_test(source_path):
    source = json.loads(source_path.read_text(encoding="utf-8"))
    learner = json.loads((LEARNER / source_path.name).read_text(encoding="utf-8"))
    text = "\n".join(cell_source(c) for c in learner["cells"])
    for marker in ("BEGIN SOLUTION", "END SOLUTION", "BEGIN HIDDEN", "END HIDDEN", "BEGIN VARIANTS", "# variant q"):
        assert marker not in text
    solution, hidden = _solution_lines(source), _hidden_test_names(source)
    assert solution and hidden, "the source has solutions and hidden tests"
    assert [line for line in solution if line in text] == []
    assert [name for name in hidden if name in text] == []


@pytest.mark.parametrize("source_path", SOURCES, ids=lambda p: p.stem[:2])
def test_every_task_states_its_points_and_time(source_path):
    source = json.loads(source_path.read_text(encoding="utf-8"))
    questions = {q for c in source["cells"] if is_tests_cell(cell_source(c))
                 for q in re.findall(r"@test\(\s*['\"](\w+)['\"]", cell_source(c))}
    headers = task_headers(source)
    assert set(headers) == questions, f"task headers for {sorted(headers)}, tests for {sorted(questions)}"
    assert all(points > 0 and 1 <= minutes <= 60 for points, minutes in headers.values())


@pytest.mark.parametrize("source_path", SOURCES, ids=lambda p: p.stem[:2])
def test_a_fresh_learner_notebook_runs_to_its_end_and_says_not_attempted(source_path):
    notebook = nbformat.read(LEARNER / source_path.name, as_version=4)
    NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(LEARNER)}}).execute()
    outputs = {i: "".join(o.get("text", "") for o in cell.get("outputs", []) if o["output_type"] == "stream")
               for i, cell in enumerate(notebook.cells) if cell.cell_type == "code"}
    errors = [o for cell in notebook.cells for o in cell.get("outputs", []) if o["output_type"] == "error"]
    assert errors == []
    questions = task_headers(json.loads(source_path.read_text(encoding="utf-8")))
    for question in questions:
        cell = next(i for i, c in enumerate(notebook.cells) if c.cell_type == "code" and c.source.strip() == f'check("{question}")')
        assert outputs[cell].startswith(f"{question}: not started yet"), outputs[cell]
    summary = next(out for i, out in outputs.items() if notebook.cells[i].source.strip() == "check()")
    assert [line for line in summary.splitlines() if line.startswith("q")] == [f"{q}: not attempted" for q in questions]
