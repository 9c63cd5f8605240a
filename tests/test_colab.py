"""The Colab badge and setup cell that `course notebooks sync-setup` puts first in every notebook."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from IPython.core.inputtransformer2 import TransformerManager

import course_lib
from course_lib import cli, colab

ROOT = Path(__file__).resolve().parents[1]
FORK_URL = "https://github.com/some-teacher/generation-course-fork"


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """A checkout of a fork: every course notebook, and a pyproject.toml with its own URL and version."""
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    real_url = colab.project_from_pyproject(ROOT / "pyproject.toml").repository
    assert pyproject.count(real_url) == 1, "the repository URL must be written once, in [project.urls]"
    pyproject = pyproject.replace(real_url, FORK_URL).replace(f'version = "{course_lib.__version__}"',
                                                              'version = "9.8.7"')
    (tmp_path / "pyproject.toml").write_text(pyproject, encoding="utf-8")
    shutil.copytree(ROOT / "notebooks", tmp_path / "notebooks", ignore=shutil.ignore_patterns(".*"))
    return tmp_path


def _cells(path: Path) -> list[dict]:
    return json.loads(path.read_text(encoding="utf-8"))["cells"]


def _source(cell: dict) -> str:
    return "".join(cell["source"])


def _run_setup_cell(source: str) -> tuple[list[str], Exception | None]:
    """Run the setup cell as IPython would, with a stand-in for get_ipython() that records the %pip lines;
    return those lines and the exception the cell raised (None when it finished)."""
    namespace: dict = {}
    pip_lines: list[str] = []

    class Shell:
        def run_line_magic(self, name: str, line: str) -> None:
            assert name == "pip"
            pip_lines.append(line.format(**namespace))  # IPython expands {name} from the user namespace

    namespace["get_ipython"] = Shell
    try:
        exec(compile(TransformerManager().transform_cell(source), "setup-cell", "exec"), namespace)
    except Exception as error:  # the test inspects it
        return pip_lines, error
    return pip_lines, None


def test_course_version_matches_pyproject():
    assert course_lib.__version__ == colab.project_from_pyproject(ROOT / "pyproject.toml").version


def test_installed_metadata_carries_the_pyproject_url(tmp_path):
    # Outside the checkout, so that only the installed package's metadata can answer.
    code = "from course_lib.colab import project_from_metadata as p; print(p().repository, p().version)"
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": ""}, timeout=120)
    assert result.returncode == 0, result.stderr
    expected = colab.project_from_pyproject(ROOT / "pyproject.toml")
    assert result.stdout.split() == [expected.repository, expected.version]


def test_sync_puts_badge_and_setup_first_from_the_pyproject_url(checkout):
    changed = colab.sync_setup(checkout / "notebooks")
    assert sorted(p.name for p in changed) == sorted(p.name for p in (ROOT / "notebooks").glob("*.ipynb"))
    for path in changed:
        badge, setup = _cells(path)[:2]
        assert badge["cell_type"] == "markdown" and setup["cell_type"] == "code"
        assert badge["metadata"]["tags"] == setup["metadata"]["tags"] == [colab.SETUP_TAG]
        colab_url = "https://colab.research.google.com/github/some-teacher/generation-course-fork/blob/main/notebooks/"
        assert f'href="{colab_url}{path.name}"' in _source(badge) and colab.BADGE_IMAGE in _source(badge)
        assert f'"git+{FORK_URL}"' in _source(setup) and '"9.8.7"' in _source(setup)
        assert "accelerated-generation/accelerated-generation" not in path.read_text(encoding="utf-8")
        nbformat.validate(nbformat.reads(path.read_text(encoding="utf-8"), as_version=4))


def _is_generated(cell: dict) -> bool:
    return colab.SETUP_TAG in cell["metadata"].get("tags", [])


def test_sync_keeps_everything_else_byte_for_byte(checkout):
    colab.sync_setup(checkout / "notebooks")
    for path in (checkout / "notebooks").glob("*.ipynb"):
        original_text = (ROOT / "notebooks" / path.name).read_text(encoding="utf-8")
        original = json.loads(original_text)
        assert colab.notebook_json(original) == original_text, "the JSON layout is nbformat's"
        original["cells"] = [cell for cell in original["cells"] if not _is_generated(cell)]
        synced = json.loads(path.read_text(encoding="utf-8"))
        assert [_is_generated(cell) for cell in synced["cells"]][:3] == [True, True, False]
        assert colab.notebook_json({**synced, "cells": synced["cells"][2:]}) == colab.notebook_json(original)
        ids = [cell["id"] for cell in synced["cells"]]
        assert len(set(ids)) == len(ids), "cell ids are unique"


def test_sync_twice_changes_nothing(checkout):
    colab.sync_setup(checkout / "notebooks")
    before = {p: p.read_bytes() for p in (checkout / "notebooks").glob("*.ipynb")}
    assert colab.sync_setup(checkout / "notebooks") == []
    assert colab.sync_setup(checkout / "notebooks", check=True) == []
    assert {p: p.read_bytes() for p in before} == before


def test_resync_updates_cells_in_place_and_moves_them_first(checkout):
    folder = checkout / "notebooks"
    path = folder / "00_setup_and_tour.ipynb"
    colab.sync_setup(folder)
    notebook = json.loads(path.read_text(encoding="utf-8"))
    badge, setup = notebook["cells"][:2]
    setup.update(execution_count=1, metadata={**setup["metadata"], "execution": {"note": "kept"}})
    duplicate = {**badge, "id": "dup00001"}
    notebook["cells"] = notebook["cells"][2:5] + [setup, badge, duplicate] + notebook["cells"][5:]
    path.write_text(colab.notebook_json(notebook), encoding="utf-8")
    pyproject = checkout / "pyproject.toml"
    pyproject.write_text(pyproject.read_text(encoding="utf-8").replace(FORK_URL, FORK_URL + "-2"), encoding="utf-8")

    assert colab.sync_setup(folder, check=True) == sorted(folder.glob("*.ipynb"))
    colab.sync_setup(folder)
    cells = _cells(path)
    assert [c["id"] for c in cells[:2]] == [badge["id"], setup["id"]]
    assert cells[1]["execution_count"] == 1 and cells[1]["metadata"]["execution"] == {"note": "kept"}
    assert f"git+{FORK_URL}-2" in _source(cells[1]) and "dup00001" not in {c["id"] for c in cells}
    assert cells[2:] == notebook["cells"][:3] + notebook["cells"][6:]


def test_setup_cell_is_silent_when_the_course_is_installed(capsys):
    source = colab.setup_source(colab.project_from_pyproject(ROOT / "pyproject.toml"))
    assert _run_setup_cell(source) == ([], None)
    assert capsys.readouterr() == ("", "")


def test_setup_cell_installs_the_override_spec_then_asks_for_a_restart(monkeypatch):
    wheel = "/wheels/accelerated_generation-9.8.7-py3-none-any.whl"
    monkeypatch.setenv(colab.INSTALL_SPEC_VARIABLE, wheel)
    pip_lines, error = _run_setup_cell(colab.setup_source(colab.Project(FORK_URL, "9.8.7")))
    assert pip_lines == [f"install -q {wheel}"]
    # The course_lib imported before the install (another version) stays loaded until the kernel restarts.
    assert isinstance(error, RuntimeError)
    assert f"course_lib {course_lib.__version__} is still loaded: restart the kernel" in str(error)


def test_setup_cell_installs_from_the_repository_and_fails_clearly(monkeypatch):
    monkeypatch.delenv(colab.INSTALL_SPEC_VARIABLE, raising=False)
    monkeypatch.setitem(sys.modules, "course_lib", None)  # `import course_lib` raises ImportError
    pip_lines, error = _run_setup_cell(colab.setup_source(colab.Project(FORK_URL, "9.8.7")))
    assert pip_lines == [f"install -q git+{FORK_URL}"]
    assert isinstance(error, RuntimeError)
    assert str(error) == f"pip install git+{FORK_URL} did not install course_lib: see pip's output"


def test_setup_cell_is_ipython_that_compiles():
    source = colab.setup_source(colab.project_from_pyproject(ROOT / "pyproject.toml"))
    python = TransformerManager().transform_cell(source)
    assert "get_ipython().run_line_magic('pip', 'install -q {course_spec}')" in python
    compile(python, "setup-cell", "exec")
    assert source.startswith("# ") and "print(" not in source


def test_cli_check_then_sync(checkout, capsys):
    folder = str(checkout / "notebooks")
    assert cli.main(["notebooks", "sync-setup", folder, "--check"]) == 1
    assert "out of date: " in capsys.readouterr().out
    assert cli.main(["notebooks", "sync-setup", folder]) == 0
    assert cli.main(["notebooks", "sync-setup", folder, "--check"]) == 0
    assert cli.main(["notebooks", "sync-setup", str(checkout / "missing")]) == 1
    assert "folder " in capsys.readouterr().err


def test_repository_must_be_a_github_url():
    with pytest.raises(ValueError, match=r"Repository must look like https://github.com/OWNER/REPO"):
        colab.Project("https://gitlab.com/someone/course", "1.0")


def test_course_notebooks_have_current_setup_cells():
    stale = colab.sync_setup(ROOT / "notebooks", check=True)
    assert stale == [], "run `course notebooks sync-setup` and re-execute the notebooks listed"
