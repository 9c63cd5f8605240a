"""Reading a folder of submitted notebooks without trusting any entry in it, and what a submission's own code is.

The grader reads every submission itself before anything runs: regular files only (no symbolic link is
followed, no FIFO is opened for a blocking read), at most ``MAX_BYTES``, and only valid notebooks. Every other
entry gets a message instead of stopping the others. The sandbox receives code cells, never a path.
"""

from __future__ import annotations

import ast
import builtins
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


_NEWLINE = re.compile(r"\r\n|\r|\n")  # the line breaks Python's parser counts
_DEFINES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


def _parse(cell: str) -> ast.Module | None:
    """A cell's syntax tree, or None if it does not parse. IPython's ``!shell`` and ``%magic`` lines are blanked
    first (a line magic's Python argument, as in ``%time x = f()``, is kept), so line numbers stay the cell's."""
    lines = []
    for line in _NEWLINE.split(cell):
        if magic := re.match(r"(\s*)([%!])%?\w*\s*(.*)", line):
            indent, kind, argument = magic.groups()
            line = indent + argument if kind == "%" and _parse_code(argument) else ""
        lines.append(line)
    return _parse_code("\n".join(lines))


def _parse_code(code: str) -> ast.Module | None:
    """``code``'s syntax tree, or None if it does not parse."""
    try:
        return ast.parse(code)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None


def _attribute(node: ast.AST) -> tuple[ast.expr, str] | None:
    """(object, name) of ``object.name`` or ``getattr(object, "name")``; None for any other node."""
    if isinstance(node, ast.Attribute):
        return node.value, node.attr
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr"
            and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)):
        return node.args[0], node.args[1].value
    return None


def _bindings(nodes: list[ast.AST]) -> dict[str, list[ast.expr | str]]:
    """Every name the cells' nodes bind -> what imports and assignments bind it to (a dotted name or an
    expression); [] for a name only defined in the learner's code (def, class, argument, loop variable)."""
    bound: dict[str, list[ast.expr | str]] = {}
    for node in nodes:
        pairs: list[tuple[str, ast.expr | str | None]] = []
        if isinstance(node, ast.Import):
            pairs = [(a.asname, a.name) if a.asname else (a.name.split(".")[0],) * 2 for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = None if node.level or not node.module else node.module  # a relative import binds local names
            pairs = [(a.asname or a.name, module and f"{module}.{a.name}") for a in node.names if a.name != "*"]
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.NamedExpr)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            pairs = [(t.id, node.value) for t in targets if isinstance(t, ast.Name)]
        elif isinstance(node, (*_DEFINES, ast.ExceptHandler)) and node.name:
            pairs = [(node.name, None)]
        elif isinstance(node, ast.arg) or isinstance(node, ast.Name) and not isinstance(node.ctx, ast.Load):
            pairs = [(getattr(node, "arg", None) or node.id, None)]
        for name, value in pairs:
            bound.setdefault(name, []).extend([value] if value is not None else [])
    return bound


class _Resolver:
    """The dotted names an expression may stand for: "transformers.TopPLogitsWarper" through imports, aliases
    and assignments, or ".decoding.TopP" (leading dot) when its first name is bound nowhere in the cells."""

    def __init__(self, bound: dict[str, list[ast.expr | str]]) -> None:
        self.bound, self.names = bound, {}

    def __call__(self, node: ast.AST, depth: int = 0) -> set[str]:
        if depth > 50:
            return set()
        if isinstance(node, ast.Name):
            return self.name(node.id, depth)
        if attribute := _attribute(node):
            return {f"{dotted}.{attribute[1]}" for dotted in self(attribute[0], depth + 1)}
        return set()

    def name(self, name: str, depth: int) -> set[str]:
        if name not in self.bound:
            return {f"builtins.{name}"} if hasattr(builtins, name) else {f".{name}"}
        if name not in self.names:
            self.names[name] = set()  # a cycle (a = b; b = a) resolves to nothing
            self.names[name] = {dotted for value in self.bound[name]
                                for dotted in ({value} if isinstance(value, str) else self(value, depth + 1))}
        return self.names[name]


def library_uses(cells: list[str], template: list[str], names: dict[str, list[str]]) -> dict[str, list[str]]:
    """For each question, the names from ``names[question]`` (dotted, e.g. "course_lib.decoding.TopP") that code
    the learner wrote uses: a name, attribute or ``getattr`` in ``cells`` on a line that is not, byte for byte, a
    line of ``template`` (the learner's starting code cells), resolved through the imports and assignments of all
    cells. A class's method ("transformers.GenerationMixin.generate") counts as any ``.generate``. An import counts
    only when the name imported or its alias is one the learner's code defines (``Temperature``). Comments and
    strings never count; a cell that does not parse is skipped. Finds direct use, not deliberately disguised use."""
    given = {line for cell in template for line in _NEWLINE.split(cell)}
    trees = {cell: _parse(cell) for cell in dict.fromkeys([*cells, *template])}  # each distinct cell parsed once
    nodes = {cell: list(ast.walk(tree)) for cell, tree in trees.items() if tree}
    every_node = [node for cell_nodes in nodes.values() for node in cell_nodes]
    resolve = _Resolver(_bindings(every_node))
    defined = {node.name for node in every_node if isinstance(node, _DEFINES)}
    found: set[str] = set()       # what the learner's names, attributes and getattr calls resolve to
    attributes: set[str] = set()  # the attribute names the learner accesses (for methods)
    for cell in dict.fromkeys(cells):
        lines = _NEWLINE.split(cell)
        for node in nodes.get(cell, []):
            use = isinstance(node, (ast.Name, ast.Attribute)) and isinstance(node.ctx, ast.Load) or \
                isinstance(node, ast.Call) and _attribute(node)
            imports = isinstance(node, ast.ImportFrom) and node.module and not node.level
            if not (use or imports) or all(line in given for line in lines[node.lineno - 1:node.end_lineno]):
                continue
            if imports:  # the library's own Temperature, or any library name over the learner's own
                found |= {f"{node.module}.{a.name}" for a in node.names if {a.name, a.asname} & defined}
                found |= {f"{node.module}.{name}" for name in defined if any(a.name == "*" for a in node.names)}
            else:
                found |= resolve(node)
                attributes |= {attribute[1]} if (attribute := _attribute(node)) else set()

    def used(name: str) -> bool:
        *_, owner, last = f".{name}".split(".")
        return (name in found or any(d.startswith(".") and f".{name}".endswith(d) for d in found)
                or owner[:1].isupper() and last in attributes)

    return {question: hit for question, dotted in names.items()
            if (hit := [name for name in dotted if isinstance(name, str) and used(name)])}


def library_imports(cells: list[str], names: dict[str, list[str]]) -> dict[str, list[str]]:
    """For each question, the imports in ``cells`` that bring one of ``names[question]`` into the notebook: the
    name itself (``from transformers import TopPLogitsWarper``) or the course_lib module that holds it
    (``from course_lib import prompting``). Other libraries' modules (``torch.nn.functional``) hold far more than
    a task's answer and do not count."""
    imported = set()
    for tree in filter(None, map(_parse, cells)):
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                imported |= {f"{node.module}.{a.name}" for a in node.names}
            elif isinstance(node, ast.Import):
                imported |= {a.name for a in node.names}

    def brings(name: str) -> bool:
        return name in imported or any(name.startswith(f"{module}.") and module.startswith("course_lib.")
                                       for module in imported)

    return {question: hit for question, dotted in names.items()
            if (hit := [name for name in dotted if isinstance(name, str) and brings(name)])}
