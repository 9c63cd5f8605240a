"""Building the student versions of the exercise notebooks from their sources.

Every ``*.ipynb`` directly in the source folder is an exercise; adding a topic's exercise is adding one file.
The build first runs each source notebook's solutions against all of its tests and refuses to write anything
when one fails; then it writes copies with the solutions stubbed out, the hidden tests and the outputs removed.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from course_lib.grading.grade import ExerciseError, Reference, verify
from course_lib.grading.sandbox import Limits
from course_lib.grading.markers import student_notebook


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
    Limits(timeout=timeout)  # ValueError for a bad timeout before anything runs
    if not (isinstance(jobs, int) and jobs >= 1):
        raise ValueError(f"jobs must be a whole number >= 1, got {jobs!r}")
    # Cheap checks of every notebook's markers first, then the slow runs.
    students = {p: student_notebook(json.loads(p.read_text(encoding="utf-8")), p.stem) for p in sources}
    def try_verify(path: Path) -> Reference | str:
        try:  # the instructor's own notebooks: no sandbox needed (and none on macOS)
            return verify(path, Limits(timeout=timeout), use_sandbox=False)
        except ExerciseError as exc:
            return str(exc)

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        verified = dict(zip(sources, pool.map(try_verify, sources)))
    references = {p.stem: r for p, r in verified.items() if isinstance(r, Reference)}
    failures = [r for r in verified.values() if isinstance(r, str)]
    for name, reference in references.items():
        print(f"{name}: solutions pass all {len(reference.tests)} tests ({reference.seconds:.1f} s)", flush=True)
    if failures:
        raise ExerciseError("refusing to build the student versions:\n" + "\n".join(failures))
    student_dir = Path(student_dir)
    student_dir.mkdir(parents=True, exist_ok=True)
    for path, notebook in students.items():
        text = json.dumps(notebook, indent=1, ensure_ascii=False, sort_keys=True) + "\n"
        (student_dir / path.name).write_text(text, encoding="utf-8")
    return references
