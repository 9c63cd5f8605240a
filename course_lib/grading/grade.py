"""Grading a folder of submitted notebooks against an exercise's source notebook.

Each submission is copied into a fresh temporary folder and run there by ``runner.py`` in its own Python
subprocess, with a time limit and the hidden tests. The grader itself never executes learner code, reads every
submission into memory before the first one runs, and checks afterwards that none of the files changed.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])  # the folder holding course_lib/


class ExerciseError(ValueError):
    """The exercise's own solution does not pass its tests (or cannot run), so nothing can be graded."""


@dataclass
class Result:
    """What one run of a notebook produced."""

    outcomes: list[dict] = field(default_factory=list)     # one per test, see checks.Outcome (+ "hidden")
    cell_errors: list[dict] = field(default_factory=list)  # {"cell": number, "error": "Type: message"}
    problem: str = ""  # why the run stopped early (time limit, crash, unreadable file); "" when it finished
    seconds: float = 0.0

    def earned(self, question: str) -> float:
        return sum(o["points"] for o in self.outcomes if o["question"] == question)


def _child_env(workdir: Path) -> dict:
    env = dict(os.environ)
    # Everything a library might cache or write goes into the submission's own folder.
    env.update(HOME=str(workdir), TMPDIR=str(workdir), MPLCONFIGDIR=str(workdir), IPYTHONDIR=str(workdir),
               MPLBACKEND="Agg", PYTHONDONTWRITEBYTECODE="1", COURSE_STATIC="1", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join(filter(None, [_PACKAGE_ROOT, env.get("PYTHONPATH")])))
    return env


def _tail(path: Path, chars: int = 400) -> str:
    text = path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""
    return " ".join(text[-chars:].split())


def run_notebook(notebook: bytes, source: Path, timeout: float) -> Result:
    """Run one notebook's bytes against ``source``'s tests in a subprocess; never raises for bad notebooks."""
    with tempfile.TemporaryDirectory(prefix="course-grade-") as tmp:
        workdir = Path(tmp) / "work"
        workdir.mkdir()
        (workdir / "submission.ipynb").write_bytes(notebook)
        results, log = Path(tmp) / "results.jsonl", Path(tmp) / "output.log"
        command = [sys.executable, "-m", "course_lib.grading.runner", "submission.ipynb",
                   str(source.resolve()), str(results)]
        start = time.perf_counter()
        with open(log, "wb") as output:
            # A new session: on a time limit the whole process group is killed, whatever it started.
            child = subprocess.Popen(command, cwd=workdir, env=_child_env(workdir), stdin=subprocess.DEVNULL,
                                     stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                child.wait(timeout=timeout)
                timed_out = False
            except subprocess.TimeoutExpired:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
                timed_out = True
        result = Result(seconds=time.perf_counter() - start)
        running, done = "the start", False
        lines = results.read_text(encoding="utf-8", errors="replace").splitlines() if results.exists() else []
        for line in lines:
            try:
                entry = json.loads(line)
            except ValueError:
                continue  # a half-written last line of a killed run
            running = entry.get("running", running)
            done = done or entry.get("done", False)
            result.problem = entry.get("fatal", result.problem)
            if "cell_error" in entry:
                result.cell_errors.append(entry["cell_error"])
            if "outcome" in entry:
                result.outcomes.append(entry["outcome"])
        if timed_out and not done:
            result.problem = f"stopped after the time limit of {timeout:g} s while running {running}"
        elif not done and not result.problem:
            how = (f"killed by signal {signal.Signals(-child.returncode).name}" if child.returncode < 0
                   else f"exited with code {child.returncode}")
            output = _tail(log)
            result.problem = (f"the notebook stopped the grading run ({how}) while running {running}"
                              + (f"; last output: {output}" if output else ""))
        return result


@dataclass
class Reference:
    """An exercise's source notebook after its solutions passed all their tests."""

    source: Path
    questions: dict[str, float]  # question -> max points, in notebook order
    result: Result


def verify(source: Path, timeout: float = 120.0) -> Reference:
    """Run the source notebook's solutions against all its tests; ExerciseError unless everything passes."""
    source = Path(source)
    result = run_notebook(source.read_bytes(), source, timeout)
    failures = [f"cell {e['cell']}: {e['error']}" for e in result.cell_errors]
    failures += [f"test {o['name']} of {o['question']}: {o['message']}" for o in result.outcomes if not o["passed"]]
    if result.problem or failures or not result.outcomes:
        details = "; ".join(filter(None, [result.problem, *failures])) or "it defines no tests"
        raise ExerciseError(f"{source.name}: the solution does not pass its own tests: {details}")
    questions: dict[str, float] = {}
    for o in result.outcomes:
        questions[o["question"]] = questions.get(o["question"], 0.0) + o["max_points"]
    return Reference(source, questions, result)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _message(result: Result, question: str) -> str:
    mine = [o for o in result.outcomes if o["question"] == question]
    failed = [o for o in mine if not o["passed"]]
    parts = [result.problem] if result.problem else []
    if mine and not failed:
        parts.append(f"all {len(mine)} tests passed")
    elif mine and all(o["not_started"] for o in mine):
        return " | ".join(parts + ["not attempted: the code still raises NotImplementedError"])
    for o in failed:
        hidden = " (hidden test)" if o.get("hidden") else ""
        parts.append(f"{o['name']}{hidden}: {o['message'].splitlines()[0] if o['message'] else 'failed'}")
    return " | ".join(parts) or "no test of this question ran"


def _feedback(student: str, reference: Reference, result: Result) -> str:
    earned = sum(result.earned(q) for q in reference.questions)
    lines = [f"Feedback for {student} on {reference.source.stem}",
             f"Total: {earned:g} / {sum(reference.questions.values()):g} points", ""]
    if result.problem:
        lines += [f"Problem: {result.problem}", ""]
    for question, max_points in reference.questions.items():
        lines.append(f"{question}: {result.earned(question):g} / {max_points:g}")
        for o in (o for o in result.outcomes if o["question"] == question):
            hidden = " (hidden test)" if o.get("hidden") else ""
            lines.append(f"  {'passed' if o['passed'] else 'FAILED'}  {o['name']}{hidden}")
            if not o["passed"]:
                lines += [f"      {line}" for line in o["message"].splitlines()]
                lines += [f"      hint: {o['hint']}"] if o["hint"] else []
    if result.cell_errors:
        lines += ["", "Cells of your notebook that raised an error:"]
        lines += [f"  code cell {e['cell']}: {e['error']}" for e in result.cell_errors]
    return "\n".join(lines) + "\n"


def grade_folder(source: Path, submissions: Path, results: Path, timeout: float = 60.0, jobs: int = 1,
                 reference: Reference | None = None) -> list[dict]:
    """Grade every ``*.ipynb`` in ``submissions``; write ``grades.csv`` and ``feedback/<student>.txt``.

    ``jobs`` submissions run at a time. Returns the CSV rows. ``reference`` skips re-verifying the source
    when the caller has just done it.
    """
    source, submissions, results = Path(source), Path(submissions), Path(results)
    if not submissions.is_dir():
        raise ValueError(f"{submissions} is not a folder of submitted notebooks")
    if timeout <= 0 or jobs < 1:
        raise ValueError(f"timeout must be positive and jobs at least 1, got timeout={timeout}, jobs={jobs}")
    reference = reference or verify(source, timeout=max(timeout, 120.0))
    files = sorted(submissions.glob("*.ipynb"))
    # Read everything first: a submission that misbehaves cannot change what the others are graded on.
    snapshot = {path: path.read_bytes() for path in files}
    rows, feedback = [], {}
    with ThreadPoolExecutor(max_workers=jobs) as pool:  # threads only wait; the work is in the subprocesses
        graded = list(pool.map(lambda path: run_notebook(snapshot[path], source, timeout), files))
    for path, result in zip(files, graded):
        print(f"{path.stem}: {sum(result.earned(q) for q in reference.questions):g} / "
              f"{sum(reference.questions.values()):g} points in {result.seconds:.1f} s"
              f"{' (' + result.problem.split(';')[0] + ')' if result.problem else ''}", flush=True)
        feedback[path.stem] = _feedback(path.stem, reference, result)
        for question, max_points in reference.questions.items():
            rows.append({"student": path.stem, "question": question, "points": f"{result.earned(question):g}",
                         "max_points": f"{max_points:g}", "message": _message(result, question)})
    for path in files:  # the guard should make this impossible; if it ever happens, undo it and say so
        if not path.exists() or _sha256(path.read_bytes()) != _sha256(snapshot[path]):
            path.write_bytes(snapshot[path])
            print(f"WARNING: {path} was changed during grading; restored the submitted version", file=sys.stderr)
    (results / "feedback").mkdir(parents=True, exist_ok=True)
    for student, text in feedback.items():
        (results / "feedback" / f"{student}.txt").write_text(text, encoding="utf-8")
    with open(results / "grades.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["student", "question", "points", "max_points", "message"])
        writer.writeheader()
        writer.writerows(rows)
    return rows
