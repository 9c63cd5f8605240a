"""The markers an exercise's source notebook uses, and how the student version is cut from it.

A task cell hides its solution between two markers; the build replaces the block with a stub::

    def top_p_filter(scores, top_p):
        # BEGIN SOLUTION
        ...the instructor's code...
        # END SOLUTION

A tests cell starts with ``# BEGIN TESTS`` and ends with ``# END TESTS``; its tests register themselves with
``@test("q1", hint=...)``. Tests between ``# BEGIN HIDDEN`` and ``# END HIDDEN`` are removed from the student
version and only run when grading. A check cell is a cell of ``check("q1")`` lines.

A variants cell (a raw cell, so nothing runs it) holds plausible wrong implementations of the tasks, each after
a ``# variant qN: what is wrong`` line; the build checks that each one earns none of its task's points, and the
student version leaves the cell out::

    # BEGIN VARIANTS
    # variant q1: keeps the token that crosses top_p out
    def top_p_filter(scores, top_p):
        ...
    # END VARIANTS
"""

from __future__ import annotations

import ast
import copy
import re

STUB_MESSAGE = "your code here: replace this line with your solution"
STUB = f'raise NotImplementedError("{STUB_MESSAGE}")'

_BEGIN_SOLUTION, _END_SOLUTION = "# BEGIN SOLUTION", "# END SOLUTION"
_BEGIN_HIDDEN, _END_HIDDEN = "# BEGIN HIDDEN", "# END HIDDEN"
_BEGIN_TESTS, _END_TESTS = "# BEGIN TESTS", "# END TESTS"
_BEGIN_VARIANTS, _END_VARIANTS = "# BEGIN VARIANTS", "# END VARIANTS"
_VARIANT = re.compile(r"^# variant (?P<question>\w+): (?P<label>.+)$")
_TASK_HEADER = re.compile(r"##\s+(?P<question>\w+):[^\n]*\((?P<points>\d+(?:\.\d+)?) points?, "
                          r"about (?P<minutes>\d+) minutes?\)\s*$", re.MULTILINE)
_CHECK_LINE = re.compile(r"""^check\(\s*((['"])\w+\2)?\s*\)\s*(#.*)?$""")


class MarkerError(ValueError):
    """A cell's markers are unbalanced, nested or misplaced."""


def cell_source(cell: dict) -> str:
    """A notebook cell's text (nbformat allows a string or a list of lines)."""
    source = cell.get("source", "")
    return source if isinstance(source, str) else "".join(source)


def _blocks(source: str, begin: str, end: str, where: str) -> list[tuple[int, int]]:
    """(first, last) line numbers of each begin...end block, markers included."""
    blocks, start = [], None
    for number, line in enumerate(source.splitlines()):
        marker = line.strip()
        if marker == begin:
            if start is not None:
                raise MarkerError(f"{where}: line {number + 1}: '{begin}' inside another block (line {start + 1})")
            start = number
        elif marker == end:
            if start is None:
                raise MarkerError(f"{where}: line {number + 1}: '{end}' without a '{begin}' above it")
            blocks.append((start, number))
            start = None
    if start is not None:
        raise MarkerError(f"{where}: line {start + 1}: '{begin}' is never closed by '{end}'")
    return blocks


def strip_solutions(source: str, where: str = "cell") -> str:
    """The source with each solution block replaced by a ``raise NotImplementedError`` stub."""
    lines = source.splitlines()
    for first, last in reversed(_blocks(source, _BEGIN_SOLUTION, _END_SOLUTION, where)):
        indent = lines[first][: len(lines[first]) - len(lines[first].lstrip())]
        if not indent:
            # A stub at the top level of a cell would raise on "Run all" and stop every later cell.
            raise MarkerError(f"{where}: line {first + 1}: put the solution block inside a function body")
        lines[first:last + 1] = [indent + STUB]
    return "\n".join(lines)


def strip_hidden(source: str, where: str = "cell") -> str:
    """The source without its hidden-test blocks."""
    lines = source.splitlines()
    for first, last in reversed(_blocks(source, _BEGIN_HIDDEN, _END_HIDDEN, where)):
        while first > 0 and not lines[first - 1].strip():
            first -= 1  # the blank lines above the block go too
        del lines[first:last + 1]
    return "\n".join(lines)


def hidden_blocks(source: str, where: str = "cell") -> list[str]:
    """The code inside each hidden-test block (markers excluded)."""
    lines = source.splitlines()
    return ["\n".join(lines[first + 1:last]) for first, last in _blocks(source, _BEGIN_HIDDEN, _END_HIDDEN, where)]


def is_tests_cell(source: str) -> bool:
    """True for a cell whose first line is ``# BEGIN TESTS``."""
    lines = source.strip().splitlines()
    return bool(lines) and lines[0].strip() == _BEGIN_TESTS


def check_tests_cell(source: str, where: str = "cell") -> None:
    """Raise MarkerError unless a tests cell ends with ``# END TESTS`` and has no other tests markers."""
    lines = [line.strip() for line in source.strip().splitlines()]
    if lines[-1] != _END_TESTS or lines.count(_BEGIN_TESTS) != 1 or lines.count(_END_TESTS) != 1:
        raise MarkerError(f"{where}: a tests cell must start with '{_BEGIN_TESTS}' and end with '{_END_TESTS}'")


def task_headers(notebook: dict) -> dict[str, tuple[float, int]]:
    """question -> (points, minutes) from the markdown cells that start ``## qN: title (P points, about M minutes)``."""
    found = {}
    for cell in notebook.get("cells", []):
        if cell.get("cell_type") == "markdown" and (match := _TASK_HEADER.match(cell_source(cell))):
            found[match["question"]] = (float(match["points"]), int(match["minutes"]))
    return found


def is_variants_cell(cell: dict) -> bool:
    """True for a raw cell whose first line is ``# BEGIN VARIANTS``."""
    lines = cell_source(cell).strip().splitlines()
    return cell.get("cell_type") == "raw" and bool(lines) and lines[0].strip() == _BEGIN_VARIANTS


def wrong_variants(notebook: dict) -> list[tuple[str, str, str]]:
    """(question, what is wrong, source) of every wrong variant in the notebook's variants cells."""
    found = []
    for number, cell in enumerate(notebook.get("cells", []), start=1):
        if not is_variants_cell(cell):
            continue
        lines = cell_source(cell).strip().splitlines()
        if lines[-1].strip() != _END_VARIANTS:
            raise MarkerError(f"cell {number}: a variants cell must end with '{_END_VARIANTS}'")
        for line in lines[1:-1]:
            if match := _VARIANT.match(line):
                found.append((match["question"], match["label"].strip(), []))
            elif found:
                found[-1][2].append(line)
            elif line.strip():
                raise MarkerError(f"cell {number}: code before the first '# variant qN: ...' line")
    return [(question, label, "\n".join(code)) for question, label, code in found]


def solution_functions(notebook: dict) -> dict[str, list[tuple[str | None, str]]]:
    """question -> the ``(class or None, function)`` whose body holds a solution block, in the code cells
    after that question's task header."""
    found: dict[str, list[tuple[str | None, str]]] = {}
    question = None
    for cell in notebook.get("cells", []):
        source = cell_source(cell)
        if cell.get("cell_type") == "markdown" and (match := _TASK_HEADER.match(source)):
            question = match["question"]
        if cell.get("cell_type") != "code" or question is None or _BEGIN_SOLUTION not in source:
            continue
        starts = {n + 1 for n, line in enumerate(source.splitlines()) if line.strip() == _BEGIN_SOLUTION}
        for node in ast.parse(source).body:
            methods = [(node.name, m) for m in node.body] if isinstance(node, ast.ClassDef) else [(None, node)]
            for owner, fn in methods:
                if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) and \
                        any(fn.lineno < line <= fn.end_lineno for line in starts):
                    found.setdefault(question, []).append((owner, fn.name))
    return found


def tests_questions(source: str) -> list[str]:
    """The questions a tests cell registers tests of (``@test("q1", ...)``, hidden blocks included), in order."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "test" and node.args and \
                isinstance(node.args[0], ast.Constant) and node.args[0].value not in found:
            found.append(node.args[0].value)
    return found


def cells_below_tests(notebook: dict) -> dict[str, list[str]]:
    """question -> the code cells (neither tests nor check cells) below the last tests cell of that question:
    what runs after ``check("qN")`` in the notebook and before the grader's tests."""
    sources = [cell_source(c) for c in notebook.get("cells", []) if c.get("cell_type") == "code"]
    below: dict[str, list[str]] = {}
    for number, source in enumerate(sources):
        if is_tests_cell(source):
            for question in tests_questions(source):
                below[question] = [s for s in sources[number + 1:] if not (is_tests_cell(s) or is_check_cell(s))]
    return below


def is_check_cell(source: str) -> bool:
    """True for a cell of nothing but ``check("qN")`` or ``check()`` calls (and comments)."""
    lines = [line.strip() for line in source.splitlines()]
    code = [line for line in lines if line and not line.startswith("#")]
    return bool(code) and all(_CHECK_LINE.match(line) for line in code)


def student_notebook(notebook: dict, name: str) -> dict:
    """The student version of a source notebook (a pure function of it, so builds are reproducible).

    ``name`` only labels marker errors.
    """
    student = copy.deepcopy(notebook)
    student["cells"] = [cell for cell in student["cells"] if not is_variants_cell(cell)]
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
