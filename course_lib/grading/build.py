"""Building the student versions of the exercise notebooks from their sources.

Every ``*.ipynb`` directly in the source folder is an exercise; adding a topic's exercise is adding one file.
The build first runs each source notebook's solutions against all of its tests and refuses to write anything
when one fails; then it writes copies with the solutions stubbed out, the hidden tests and the outputs removed.
"""

from __future__ import annotations

import copy
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from course_lib.grading.grade import ExerciseError, Reference, verify
from course_lib.grading.markers import (MarkerError, cell_source, check_tests_cell, is_tests_cell, strip_hidden,
                                        strip_solutions)


def student_notebook(notebook: dict, name: str) -> dict:
    """The student version of a source notebook (a pure function of it, so builds are reproducible).

    ``name`` only labels marker errors.
    """
    student = copy.deepcopy(notebook)
    for number, cell in enumerate(student["cells"], start=1):
        if cell.get("cell_type") != "code":
            continue
        where = f"{name}, cell {number}"
        source = cell_source(cell)
        if is_tests_cell(source):
            check_tests_cell(source, where)
            source = strip_hidden(source, where)
        elif "# BEGIN HIDDEN" in source:
            raise MarkerError(f"{where}: hidden tests belong inside a '# BEGIN TESTS' cell")
        source = strip_solutions(source, where)
        cell["source"] = source.splitlines(keepends=True)
        cell["outputs"], cell["execution_count"] = [], None
    return student


def source_notebooks(source_dir: Path) -> list[Path]:
    """The exercise sources: every notebook directly inside ``source_dir``."""
    found = sorted(Path(source_dir).glob("*.ipynb"))
    if not found:
        raise ValueError(f"no exercise notebooks (*.ipynb) in {source_dir}")
    return found


def build(source_dir: Path, student_dir: Path, timeout: float = 120.0, jobs: int = 1) -> dict[str, Reference]:
    """Verify every exercise in ``source_dir`` and write its student version to ``student_dir``.

    Raises ExerciseError (writing nothing) when a solution fails its tests. Returns the verified references
    by notebook name, which ``grade_folder`` accepts to skip verifying again.
    """
    sources = source_notebooks(source_dir)
    # Cheap checks of every notebook's markers first, then the slow runs.
    students = {p: student_notebook(json.loads(p.read_text(encoding="utf-8")), p.stem) for p in sources}
    def try_verify(path: Path) -> Reference | str:
        try:
            return verify(path, timeout)
        except ExerciseError as exc:
            return str(exc)

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        verified = dict(zip(sources, pool.map(try_verify, sources)))
    references = {p.stem: r for p, r in verified.items() if isinstance(r, Reference)}
    failures = [r for r in verified.values() if isinstance(r, str)]
    for name, reference in references.items():
        print(f"{name}: solutions pass all {len(reference.result.outcomes)} tests "
              f"({reference.result.seconds:.1f} s)", flush=True)
    if failures:
        raise ExerciseError("refusing to build the student versions:\n" + "\n".join(failures))
    student_dir = Path(student_dir)
    student_dir.mkdir(parents=True, exist_ok=True)
    for path, notebook in students.items():
        text = json.dumps(notebook, indent=1, ensure_ascii=False, sort_keys=True) + "\n"
        (student_dir / path.name).write_text(text, encoding="utf-8")
    return references
