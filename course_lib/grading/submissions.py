"""Reading a folder of submitted notebooks without trusting any entry in it, and what a submission's own code is.

The grader reads every submission itself before anything runs: regular files only (no symbolic link is
followed, no FIFO is opened for a blocking read), at most ``MAX_BYTES``, and only valid notebooks. Every other
entry gets a message instead of stopping the others. The sandbox receives code cells, never a path.
"""

from __future__ import annotations

import json
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from course_lib.grading.markers import cell_source, is_check_cell, is_tests_cell

MAX_BYTES = 20 * 2**20


@dataclass
class Submission:
    """One entry of the submissions folder: its student name and code cells, or why it cannot be graded."""

    student: str
    cells: list[str] | None  # the code cells the submission's sandbox runs (tests and check cells left out)
    skipped: str = ""        # why it is not graded ("" when cells is not None)


def code_cells(notebook: object) -> list[str]:
    """The sources of a notebook's code cells; ValueError unless ``notebook`` is shaped like nbformat 4."""
    if not isinstance(notebook, dict) or notebook.get("nbformat") != 4 or not isinstance(notebook.get("cells"), list):
        raise ValueError("it is not a Jupyter notebook (nbformat 4 with a list of cells)")
    for cell in notebook["cells"]:
        source = cell.get("source") if isinstance(cell, dict) else None
        if (not isinstance(source, (str, list)) or isinstance(source, list) and
                not all(isinstance(line, str) for line in source) or cell.get("cell_type") not in
                ("code", "markdown", "raw")):
            raise ValueError("it is not a valid notebook: a cell has no cell_type or no text source")
    return [cell_source(c) for c in notebook["cells"] if c["cell_type"] == "code"]


def learner_cells(notebook: object) -> list[str]:
    """The code cells a submission runs: all but tests and check cells (the instructor's tests run instead)."""
    return [c for c in code_cells(notebook) if not (is_tests_cell(c) or is_check_cell(c))]


def _read_regular_file(folder_fd: int, name: str) -> bytes:
    """The bytes of the entry ``name`` if it is a regular file of at most MAX_BYTES; ValueError saying what it is."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=folder_fd)
    except OSError as exc:
        raise ValueError(f"it cannot be opened ({exc.strerror})") from None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise ValueError("it is not a regular file")
        if info.st_size > MAX_BYTES:
            raise ValueError(f"it is larger than {MAX_BYTES // 2**20} MB")
        return f.read(MAX_BYTES + 1)[:MAX_BYTES]


def _kind(entry: os.DirEntry) -> str:
    if entry.is_symlink():
        return "it is a symbolic link (submit the notebook itself)"
    if entry.is_dir(follow_symlinks=False):
        return "it is a folder, not a notebook file"
    if not entry.is_file(follow_symlinks=False):
        return "it is not a regular file (a FIFO, socket or device)"
    return ""


def read_folder(folder: Path) -> list[Submission]:
    """Every ``*.ipynb`` entry of ``folder``, in name order, read into memory or with the reason it is skipped."""
    found = []
    folder_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    with os.scandir(folder_fd) as entries:
        listed = sorted(entries, key=lambda e: e.name)
    try:
        for entry in listed:
            if not entry.name.endswith(".ipynb") or entry.name == ".ipynb":
                continue
            student = entry.name[:-len(".ipynb")]
            skipped = _kind(entry)
            if skipped:
                found.append(Submission(student, None, skipped))
                continue
            try:
                data = _read_regular_file(folder_fd, entry.name)
                cells = learner_cells(json.loads(data.decode("utf-8")))
            except UnicodeDecodeError:
                found.append(Submission(student, None, "it is not UTF-8 text"))
            except ValueError as exc:  # also json.JSONDecodeError
                reason = str(exc) if str(exc).startswith("it ") else f"it is not valid JSON ({exc})"
                found.append(Submission(student, None, reason[:200]))
            else:
                found.append(Submission(student, cells))
    finally:
        os.close(folder_fd)
    return found


def library_uses(cells: list[str], template: list[str], names: dict[str, list[str]]) -> dict[str, list[str]]:
    """For each question, the names from ``names[question]`` (dotted, e.g. "course_lib.decoding.TopP") that a
    line the learner wrote uses: a line of ``cells`` that is not a line of ``template`` (the code cells of the
    learner's starting notebook). A name the template itself defines (the learner's own ``Temperature``) counts
    only qualified (``decoding.Temperature``) or imported. Finds direct use, not deliberately disguised use."""
    given = {line.strip() for cell in template for line in cell.splitlines()}
    defined = set(re.findall(r"^\s*(?:def|class)\s+(\w+)", "\n".join(template), re.MULTILINE))
    written = "\n".join(line for cell in cells for line in cell.splitlines() if line.strip() not in given)
    uses = {}
    for question, dotted in names.items():
        found = []
        for name in dotted:
            module, _, attr = name.rpartition(".")
            pattern = rf"\b{re.escape(attr)}\b"
            if attr in defined:
                package, parent = re.escape(module.split(".")[0]), re.escape(module.rsplit(".", 1)[-1])
                pattern = rf"\b{parent}\.{re.escape(attr)}\b|^\s*(from|import)\s.*\b{package}\b.*\b{re.escape(attr)}\b"
            if re.search(pattern, written, re.MULTILINE):
                found.append(name)
        if found:
            uses[question] = found
    return uses
