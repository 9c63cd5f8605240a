"""The real thing: the setup cell installs the course from a wheel into an environment that lacks it.

Builds the wheel, makes a fresh virtual environment with only a kernel, nbclient and torch (the CPU wheel pinned by
.ci/constraints.txt), puts the generated cells into a copy of notebook 00, and runs that copy there with
COURSE_INSTALL_SPEC pointing at the wheel. Skipped only when pip cannot reach any package index.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from course_lib import colab

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "00_setup_and_tour.ipynb"
CONSTRAINTS = ROOT / ".ci" / "constraints.txt"
# Build outputs and folders the wheel never holds stay out of the copy the wheel is built from.
NOT_IN_SOURCE = shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__", ".ipynb_checkpoints",
                                       "notebooks", "exercises", "executed", "grading-results", ".pytest_cache")

RUN_NOTEBOOK = """
import sys, nbformat
from nbclient import NotebookClient
notebook = nbformat.read(sys.argv[1], as_version=4)
NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": sys.argv[2]}}).execute()
nbformat.write(notebook, sys.argv[1])
"""


def _run(command: list, env: dict | None = None, cwd: Path | None = None, timeout: int = 600) -> str:
    result = subprocess.run([str(part) for part in command], env=env, cwd=cwd, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, f"{command[:4]} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def _pip_env() -> dict:
    constraints = " ".join(filter(None, [os.environ.get("PIP_CONSTRAINT"), str(CONSTRAINTS)]))
    return {**os.environ, "PIP_CONSTRAINT": constraints, "PIP_PROGRESS_BAR": "off"}


def _require_package_index(tmp_path: Path) -> None:
    probe = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--retries", "0", "--timeout", "20",
                            "--dest", tmp_path / "probe", "ipykernel", "transformers"],
                           env=_pip_env(), capture_output=True, text=True, timeout=300)
    if probe.returncode != 0:
        reason = (probe.stderr.strip().splitlines() or ["no output"])[-1]
        pytest.skip(f"pip cannot reach a package index to build a fresh environment: {reason}")


def _build_wheel(tmp_path: Path) -> Path:
    source = tmp_path / "source"  # a clean copy: a stale build/ in the checkout can leak old files into a wheel
    shutil.copytree(ROOT, source, ignore=NOT_IN_SOURCE)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", tmp_path / "dist", source], env=_pip_env())
    (wheel,) = (tmp_path / "dist").glob("accelerated_generation-*.whl")
    return wheel


def _requirements(wheel: Path) -> list[str]:
    """The wheel's own dependencies (Requires-Dist without extras), as pip arguments."""
    (name,) = [n for n in zipfile.ZipFile(wheel).namelist() if n.endswith(".dist-info/METADATA")]
    meta = zipfile.ZipFile(wheel).read(name).decode()
    return [line.split(": ", 1)[1] for line in meta.splitlines()
            if line.startswith("Requires-Dist: ") and "extra ==" not in line]


def _fresh_venv(tmp_path: Path, packages: list[str]) -> tuple[Path, dict]:
    """A virtual environment with ``packages`` and nothing else; its python and the environment to run it in."""
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", venv])
    python = venv / "bin" / "python"
    env = {key: value for key, value in _pip_env().items() if key not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(VIRTUAL_ENV=str(venv), PATH=f"{venv / 'bin'}{os.pathsep}{env['PATH']}",
               JUPYTER_DATA_DIR=str(tmp_path / "jupyter"), JUPYTER_CONFIG_DIR=str(tmp_path / "jupyter"),
               IPYTHONDIR=str(tmp_path / "ipython"), MPLCONFIGDIR=str(tmp_path / "mpl"), MPLBACKEND="Agg",
               HF_HUB_OFFLINE="1", COURSE_STATIC="1", TOKENIZERS_PARALLELISM="false")
    _run([python, "-m", "pip", "install", "-q", "--no-compile", *packages], env=env)
    return python, env


def _outputs_text(cell: dict) -> str:
    return "".join("".join(output.get("text", "")) for output in cell["outputs"])


def test_setup_cell_installs_the_course_from_a_wheel_in_a_fresh_venv(tmp_path):
    _require_package_index(tmp_path)
    wheel = _build_wheel(tmp_path)
    in_wheel = set(zipfile.ZipFile(wheel).namelist())
    assets = {p.relative_to(ROOT).as_posix() for p in (ROOT / "course_lib" / "assets").rglob("*") if p.is_file()}
    assert {"course_lib/assets/tokenizer/tokenizer.json", "course_lib/assets/heldout_stories.txt",
            "course_lib/assets/models/storyteller/model.safetensors"} <= assets
    assert assets - in_wheel == set(), "bundled files missing from the wheel: fix [tool.setuptools.package-data]"

    # Like Colab: a kernel, torch and the course's dependencies are there; the course itself is not.
    python, env = _fresh_venv(tmp_path, ["ipykernel", "nbclient", *_requirements(wheel)])
    before = subprocess.run([python, "-c", "import course_lib"], env=env, cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)
    assert before.returncode != 0 and "No module named 'course_lib'" in before.stderr

    folder = tmp_path / "notebooks"
    folder.mkdir()
    shutil.copy(NOTEBOOK, folder)
    copy = folder / NOTEBOOK.name
    colab.sync_setup(folder, project=colab.project_from_pyproject(ROOT / "pyproject.toml"))
    _run([python, "-c", RUN_NOTEBOOK, copy, folder], env={**env, colab.INSTALL_SPEC_VARIABLE: str(wheel)})

    executed = json.loads(copy.read_text(encoding="utf-8"))["cells"]
    code = [cell for cell in executed if cell["cell_type"] == "code"]
    assert all(cell["execution_count"] for cell in code), "every code cell ran"
    assert not [o for cell in code for o in cell["outputs"] if o["output_type"] == "error"]
    stored = {"".join(c["source"]): _outputs_text(c) for c in json.loads(NOTEBOOK.read_text())["cells"]
              if c["cell_type"] == "code"}
    model_list = next(c for c in code if "model_card(name)" in "".join(c["source"]))
    assert _outputs_text(model_list) == stored["".join(model_list["source"])], "bundled model cards differ"

    installed = _run([python, "-c", "import course_lib, importlib.metadata as m; print(course_lib.__file__); "
                      "print(m.distribution('accelerated-generation').read_text('direct_url.json'))"],
                     env=env, cwd=tmp_path)
    module_file, direct_url = installed.splitlines()[:2]
    assert module_file.startswith(str(tmp_path / "venv")) and wheel.name in direct_url
