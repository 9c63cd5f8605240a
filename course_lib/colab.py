"""Colab support: an "Open in Colab" badge and a setup cell at the top of every notebook.

``course notebooks sync-setup [FOLDER]`` makes each notebook in FOLDER start with two generated cells, both
tagged ``course-setup``: a markdown cell with the badge, and a code cell that installs the course when
``course_lib`` is missing or at another version (Colab, a fresh machine) and prints nothing when it is there.
Everything else in a notebook is kept as it was. The repository URL (pyproject's ``[project.urls] Repository``,
the course's one URL) and the version come from pyproject.toml when FOLDER lies in a checkout of the course, else
from the installed package's metadata.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import uuid
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

DISTRIBUTION = "accelerated-generation"
SETUP_TAG = "course-setup"
BADGE_IMAGE = "https://colab.research.google.com/assets/colab-badge.svg"
INSTALL_SPEC_VARIABLE = "COURSE_INSTALL_SPEC"
_GITHUB_URL = re.compile(r"https://github\.com/(?P<owner>[\w.-]+)/(?P<repo>[\w.-]+)")

BADGE_TEMPLATE = ('<a href="https://colab.research.google.com/github/{owner}/{repo}/blob/main/{path}" '
                  'target="_parent"><img src="' + BADGE_IMAGE + '" alt="Open In Colab"/></a>')

SETUP_TEMPLATE = '''\
# Setup: installs the course's library (course_lib {version}) on Colab or a fresh machine; silent when it is here.
import importlib
import os

try:
    import course_lib
    course_ready = course_lib.__version__ == "{version}"
except ImportError:
    course_ready = False
if not course_ready:
    course_spec = os.environ.get("{variable}", "git+{repository}")
    %pip install -q {{course_spec}}
    importlib.invalidate_caches()
    try:
        import course_lib
    except ImportError as error:
        raise RuntimeError(f"pip install {{course_spec}} did not install course_lib: see pip's output") from error
    if course_lib.__version__ != "{version}":
        raise RuntimeError(f"course_lib {{course_lib.__version__}} is still loaded: restart the kernel "
                           "(Colab: Runtime > Restart session), then run this notebook again")'''


@dataclass(frozen=True)
class Project:
    """The course's repository URL and version, and the checkout they were read from (None: installed metadata)."""

    repository: str
    version: str
    root: Path | None = None

    def __post_init__(self) -> None:
        if not _GITHUB_URL.fullmatch(self.repository):
            raise ValueError(f"[project.urls] Repository must look like https://github.com/OWNER/REPO for the "
                             f"Colab badge, got {self.repository!r}")

    @property
    def owner_and_repo(self) -> tuple[str, str]:
        match = _GITHUB_URL.fullmatch(self.repository)
        return match["owner"], match["repo"]


def project_from_pyproject(pyproject: Path) -> Project:
    """Read the repository URL and version from a checkout's pyproject.toml."""
    table = tomllib.loads(pyproject.read_text(encoding="utf-8")).get("project", {})
    urls = table.get("urls", {})
    if "Repository" not in urls:
        raise ValueError(f"{pyproject} has no [project.urls] Repository entry: add the course's GitHub URL there")
    return Project(urls["Repository"], table["version"], pyproject.resolve().parent)


def project_from_metadata() -> Project:
    """Read the repository URL and version from the installed package's metadata."""
    try:
        meta = metadata.metadata(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        raise ValueError(f"{DISTRIBUTION} is not installed and no checkout was found: run from the course's "
                         "checkout or install the course") from None
    urls = dict(entry.split(", ", 1) for entry in meta.get_all("Project-URL") or [])
    repository = next((url for label, url in urls.items() if label.lower() == "repository"), None)
    if repository is None:
        raise ValueError(f"the installed {DISTRIBUTION} {meta['Version']} has no Repository URL in its metadata: "
                         "reinstall it from a checkout whose pyproject.toml has [project.urls] Repository")
    return Project(repository, meta["Version"])


def find_project(folder: Path) -> Project:
    """The project for notebooks in ``folder``: the enclosing checkout's pyproject.toml, else installed metadata."""
    for directory in [folder.resolve(), *folder.resolve().parents]:
        pyproject = directory / "pyproject.toml"
        if pyproject.is_file() and _project_name(pyproject) == DISTRIBUTION:
            return project_from_pyproject(pyproject)
    return project_from_metadata()


def _project_name(pyproject: Path) -> str | None:
    return tomllib.loads(pyproject.read_text(encoding="utf-8")).get("project", {}).get("name")


def badge_source(project: Project, path_in_repo: str) -> str:
    """Markdown of the "Open in Colab" badge for the notebook at ``path_in_repo`` (e.g. notebooks/00_x.ipynb)."""
    owner, repo = project.owner_and_repo
    return BADGE_TEMPLATE.format(owner=owner, repo=repo, path=path_in_repo)


def setup_source(project: Project) -> str:
    """The setup cell: install the course unless ``course_lib`` at ``project.version`` is importable."""
    return SETUP_TEMPLATE.format(version=project.version, repository=project.repository,
                                 variable=INSTALL_SPEC_VARIABLE)


def with_setup_cells(notebook: dict, badge: str, setup: str) -> dict:
    """``notebook`` with the badge and setup cells first: existing tagged cells are updated (id, metadata and
    outputs kept) and moved to the top, missing ones are created, every other cell is left as it was."""
    tagged, others = [], []
    for cell in notebook["cells"]:
        (tagged if SETUP_TAG in cell.get("metadata", {}).get("tags", []) else others).append(cell)
    used_ids = {cell.get("id") for cell in notebook["cells"]}
    first = [_generated_cell(kind, source, tagged, used_ids) for kind, source in [("markdown", badge), ("code", setup)]]
    return {**notebook, "cells": first + others}


def _generated_cell(kind: str, source: str, tagged: list[dict], used_ids: set) -> dict:
    lines = source.splitlines(keepends=True)
    existing = next((cell for cell in tagged if cell["cell_type"] == kind), None)
    if existing is not None:
        return {**existing, "source": lines}
    cell_id = uuid.uuid4().hex[:8]  # nbformat's own kind of id
    while cell_id in used_ids:
        cell_id = uuid.uuid4().hex[:8]
    used_ids.add(cell_id)
    cell = {"cell_type": kind, "id": cell_id, "metadata": {"tags": [SETUP_TAG]}, "source": lines}
    if kind == "code":
        cell.update(execution_count=None, outputs=[])
    return cell


def notebook_json(notebook: dict) -> str:
    """The notebook as nbformat writes it: sorted keys, indent 1, UTF-8 as is, trailing newline."""
    return json.dumps(notebook, indent=1, sort_keys=True, ensure_ascii=False) + "\n"


def sync_setup(folder: Path, check: bool = False, project: Project | None = None) -> list[Path]:
    """Give every notebook in ``folder`` the current badge and setup cells; return the notebooks that changed
    (with ``check=True``: that would change, writing nothing). ``project`` defaults to ``find_project(folder)``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"folder {folder} does not exist: pass the folder that holds the notebooks")
    project = project or find_project(folder)
    setup = setup_source(project)
    changed = []
    for path in sorted(folder.glob("*.ipynb")):
        text = path.read_text(encoding="utf-8")
        notebook = json.loads(text)
        if notebook.get("nbformat", 0) < 4 or notebook.get("nbformat_minor", 0) < 5:
            raise ValueError(f"{path} is nbformat {notebook.get('nbformat')}.{notebook.get('nbformat_minor')}: "
                             "cell ids need 4.5 or later (open and save it in JupyterLab to upgrade)")
        new_text = notebook_json(with_setup_cells(notebook, badge_source(project, _path_in_repo(path, project)), setup))
        if new_text != text:
            changed.append(path)
            if not check:
                path.write_text(new_text, encoding="utf-8")
    return changed


def _path_in_repo(path: Path, project: Project) -> str:
    """The notebook's path inside the repository: relative to the checkout when inside it, else FOLDER/NAME."""
    if project.root is not None and path.resolve().is_relative_to(project.root):
        return path.resolve().relative_to(project.root).as_posix()
    return f"{path.parent.name}/{path.name}"


def _sync_command(args: argparse.Namespace) -> int:
    try:
        changed = sync_setup(args.folder, check=args.check)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    verb = "out of date" if args.check else "updated"
    for path in changed:
        print(f"{verb}: {path}")
    if args.check and changed:
        print("run `course notebooks sync-setup` to update them", file=sys.stderr)
        return 1
    print(f"{len(changed)} notebook(s) {verb} in {args.folder}")
    return 0


def register_notebook_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``notebooks sync-setup`` to a CLI's subcommands."""
    notebooks = subparsers.add_parser("notebooks", help="maintain the course notebooks")
    actions = notebooks.add_subparsers(dest="notebooks_command", required=True)
    sync = actions.add_parser("sync-setup", help="put the Open-in-Colab badge and the setup cell first in every "
                                                 "notebook of FOLDER")
    sync.add_argument("folder", nargs="?", type=Path, default=Path("notebooks"),
                      help="folder of .ipynb files (default: notebooks)")
    sync.add_argument("--check", action="store_true", help="write nothing; exit 1 when a notebook is out of date")
    sync.set_defaults(func=_sync_command)
