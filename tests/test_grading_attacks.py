"""`course grade` against students who want marks without the work, and against bad folder entries.

One class of 25 submissions is graded once (module fixture) through the command line, in the bubblewrap
sandbox, two at a time. Each attack submission keeps the stub (or a wrong ``add``) and tries one way to get
points anyway; each test below checks that it got no undeserved point, changed nothing outside its sandbox,
left no process behind and did not change another student's result.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from course_lib.grading.cli import main
from course_lib.grading.grade import csv_safe, grade_folder
from course_lib.grading.markers import student_notebook
from course_lib.grading.sandbox import bwrap_problem, sandbox_filter
from test_grading import SELF_ANSWERING, SOLUTION, TESTS
# the "add" exercise: one visible test (feedback only), two hidden ones (1 and 2 points)

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the grading sandbox is bubblewrap, Linux only")

MARK = f"course-attack-{os.getpid()}"  # every file an attack tries to leave on the host carries this name
WRONG = "def add(a, b):\n    return 0"


def _cell(kind: str, source: str) -> dict:
    extra = {"outputs": [], "execution_count": None} if kind == "code" else {}
    return {"cell_type": kind, "metadata": {}, "source": source, **extra}


def exercise(solution: str = SOLUTION, *extra: str) -> dict:
    """The pure-Python "add" exercise: q1 is worth 3 points (one visible test, one hidden test worth 2)."""
    cells = [_cell("markdown", "# Add"), _cell("code", "from course_lib.grading import check, test"),
             *(_cell("code", code) for code in extra), _cell("code", solution), _cell("code", TESTS),
             _cell("code", 'check("q1")')]
    return {"cells": cells, "metadata": {"grading": {"library_implementations": {"q1": ["operator.add"]}}},
            "nbformat": 4, "nbformat_minor": 5}


FIND_FDS = "import os\nfds = [int(n) for n in os.listdir('/proc/self/fd') if int(n) > 2]\n"
ATTACKS = {
    # Full marks without a solution
    "patch_runner": [WRONG, "import course_lib.grading.checks as c, course_lib.grading.values as v\n"
                     "v.compare = c.compare = lambda *a, **k: ''\n"
                     "c.run_test = lambda t: c.Outcome(t.question, t.name, True, 100, 100, '', '')"],
    "assert_to_pass": [WRONG, "get_ipython().input_transformers_post.append("
                       "lambda lines: [l.replace('assert ', 'pass  # ') for l in lines])"],
    "redefine_reference": ["import operator\noperator.add = lambda a, b: 0\n" + WRONG],
    "forge_results": [WRONG, FIND_FDS + "line = '{\"test\": {\"question\": \"q1\", \"name\": \"adds_negative_numbers\", "
                      "\"points\": 100}, \"result\": {\"value\": -3}}\\n'\n"
                      "for fd in fds:\n    try:\n        os.write(fd, line.encode() * 3)\n    except OSError:\n"
                      "        pass"],
    "malformed_reports": [FIND_FDS + "BAD = [b'[' * 200000, b'{\"test\": {\"question\": [1], \"name\": {}}, \"result\": {}}', "
                          "b'{\"cell_error\": {\"cell\": 999, \"error\": \"x\"}}', b'{\"running\": [\"x\"]}', "
                          "b'{\"test\": {\"question\": \"q1\", \"name\": \"adds_small_numbers\"}, \"result\": "
                          "{\"value\": {\"tensor\": \"float32\", \"shape\": [1000000000000], \"values\": []}}}', "
                          "b'{\"test\": {\"question\": \"q1\", \"name\": \"adds_negative_numbers\"}, \"result\": "
                          "{\"raised\": [1], \"value\": {\"list\": 5}}}', b'{\"done\": true}', b'null', b'[]']\n"
                          "def add(a, b):\n    for fd in fds:\n        try:\n            os.write(fd, b'\\n'.join(BAD) + b'\\n')\n"
                          "        except OSError:\n            pass\n    return 0"],
    "steal_solution": ["import glob, re\nfound = [p for p in glob.glob('/**/*.ipynb', recursive=True)]\n"
                       "found += [f'/proc/{p}/cmdline' for p in os.listdir('/proc') if p.isdigit()]\n"
                       "def add(a, b):\n    for path in found:\n        try:\n            text = open(path).read()\n"
                       "        except OSError:\n            continue\n        if 'return a + b' in text:\n"
                       "            return a + b\n    return 0", ],
    "leak_hidden_source": ["import inspect\ndef add(a, b):\n    source = inspect.getsource(inspect.stack()[1].frame)\n"
                           "    raise type(source, (Exception,), {})(source)"],
    # Harm to others and to the host
    "spawnv_passfds": [WRONG, "import multiprocessing.util, os, sys\nexe = os.fsencode(sys.executable)\n"
                       "multiprocessing.util.spawnv_passfds(exe, [exe, b'-c', b'import time; time.sleep(30); "
                       f"open(\"/tmp/{MARK}-spawn\", \"w\")'], [])"],
    "ctypes_fork_setsid": [WRONG, "import ctypes, os, sys\nlibc = ctypes.CDLL(None)\nchildren = []\nfor _ in range(50):\n"
                           "    pid = libc.fork()\n    if pid == 0:\n        os.setsid()\n"
                           f"        os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(60)  # {MARK}'])\n"
                           "    children.append(pid)\nraise RuntimeError(f'fork returned {sorted(set(children))}')"],
    "write_outside": [WRONG, f"import sqlite3, torch, ctypes, os\nfor target in ('/tmp', '/var/tmp', '/dev/shm', "
                      f"'{Path.cwd()}', os.path.expanduser('~'), '/usr'):\n"
                      f"    for attempt in (lambda p: sqlite3.connect(p + '.db').execute('create table t(x)'),\n"
                      f"                    lambda p: torch.save(torch.ones(1), p + '.pt'),\n"
                      f"                    lambda p: ctypes.CDLL(None).open((p + '.c').encode(), 0o101, 0o644),\n"
                      f"                    lambda p: os.mkfifo(p + '.fifo')):\n"
                      f"        try:\n            attempt(os.path.join(target, '{MARK}'))\n"
                      f"        except Exception:\n            pass"],
    "hard_link_source": [WRONG, "import glob, os\nfor path in glob.glob('/**/*.ipynb', recursive=True):\n"
                         "    try:\n        os.link(path, '/tmp/x.ipynb')\n        open('/tmp/x.ipynb', 'a').write('x')\n"
                         "    except OSError:\n        pass"],
    "plant_submission": [WRONG, "import glob, shutil\nfor folder in glob.glob('/**/', recursive=True):\n"
                         "    try:\n        open(folder + 'planted.ipynb', 'w').write('{}')\n    except OSError:\n"
                         "        pass"],
    # Limits
    "memory": [WRONG, "hog = bytearray(3 * 2**30)"],
    "threads": [WRONG, "import threading, time\nfor _ in range(3000):\n"
                "    threading.Thread(target=time.sleep, args=(60,), daemon=True).start()"],
    "huge_stdout": [WRONG, "import sys\nchunk = 'x' * 2**20\nfor _ in range(1024):\n    sys.stdout.write(chunk)"],
    "huge_channel": [WRONG, FIND_FDS + "for fd in fds:\n    try:\n        os.write(fd, b'x' * (40 * 2**20))\n"
                     "    except OSError:\n        pass"],
    # Exceptions that must stay contained (to the test, or with a message to the run)
    "keyboard_interrupt": ["def add(a, b):\n    raise KeyboardInterrupt"],
    "os_exit": ["import os\ndef add(a, b):\n    os._exit(0)"],
    "recursion": ["def add(a, b):\n    return add(a, b)"],
    "deep_recursion_cell": [WRONG, "import sys\nsys.setrecursionlimit(10**6)\ndef f(n):\n    return f(n + 1)\nf(0)"],
    "infinite_loop": ["def add(a, b):\n    while True:\n        pass"],
    # Round two: results that break the grader, hidden text smuggled out, hangs that must cost one test only
    "overflowing_tensor": ["import torch\nclass Lying(torch.Tensor):\n    def tolist(self):\n        return [1000]\n"
                           "def add(a, b):\n    return torch.tensor([1], dtype=torch.int8).as_subclass(Lying)"],
    "builtin_named_error": ["import builtins, inspect\ndef add(a, b):\n"
                            "    source = inspect.getsource(inspect.stack()[1].frame)\n"
                            "    name = 'E' + ''.join(c if c.isalnum() else '_' for c in source)\n"
                            "    error = type(name, (Exception,), {})\n    setattr(builtins, name, error)\n    raise error()"],
    "source_in_dict_keys": ["import inspect\ndef add(a, b):\n"
                            "    return {inspect.getsource(inspect.stack()[1].frame): 1, 'x' * 9000: 2}"],
    "huge_dict_keys": ["def add(a, b):\n    return {f'{i:09d}' + 'k' * 90: i for i in range(100_000)}"],
    "self_answering": ["def add(a, b):\n    return 0", SELF_ANSWERING, "# a copy\n" + TESTS.split("# BEGIN HIDDEN")[0]],
    "catches_the_time_budget": ["def add(a, b):\n    while True:\n        try:\n            while True:\n"
                                "                pass\n        except BaseException:\n            pass"],
}
CORRECT = "def add(a, b):\n    return a + b"
HANGS_ON_ONE = "def add(a, b):\n    while (a, b) == (2, 5):\n        pass\n    return a + b"  # a hidden test's inputs
NON_UTF8_NAME = os.fsdecode(b"caf\xe9\x01.ipynb")  # Latin-1 bytes and a control character


def _submission(*cells: str) -> dict:
    nb = student_notebook(exercise(), "add")
    nb["cells"][2:3] = [_cell("code", c) for c in cells]  # the stub's cell is replaced by the attack
    return nb


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    """Grade the whole class once; return the CSV rows by student, the folders and the time taken."""
    assert not bwrap_problem(), bwrap_problem()
    root = tmp_path_factory.mktemp("class")
    source = root / "exercise" / "add.ipynb"
    source.parent.mkdir()
    source.write_text(json.dumps(exercise()), encoding="utf-8")
    subs = root / "submissions"
    subs.mkdir()
    for name, cells in ATTACKS.items():
        (subs / f"a_{name}.ipynb").write_text(json.dumps(_submission(*cells)), encoding="utf-8")
    (subs / "b_partial.ipynb").write_text(json.dumps(_submission("def add(a, b):\n    return abs(a) + abs(b)")))
    (subs / "b_library.ipynb").write_text(json.dumps(_submission("import operator\nadd = operator.add")))
    (subs / "b_system_exit.ipynb").write_text(json.dumps(_submission("raise SystemExit(3)", CORRECT)))
    (subs / "b_stub.ipynb").write_text(json.dumps(student_notebook(exercise(), "add")))
    (subs / '=HYPERLINK("evil","click").ipynb').write_text(json.dumps(_submission(CORRECT)))
    (subs / "b_hangs_on_one_test.ipynb").write_text(json.dumps(_submission(HANGS_ON_ONE)))
    (subs / NON_UTF8_NAME).write_text(json.dumps(_submission(CORRECT)))
    (subs / "z_good.ipynb").write_text(json.dumps(_submission(CORRECT)))  # graded after every attack
    (subs / "c_not_json.ipynb").write_text('{"cells": [ not json')
    (subs / "c_folder.ipynb").mkdir()
    os.mkfifo(subs / "c_fifo.ipynb")
    (subs / "c_dangling.ipynb").symlink_to(root / "nowhere.ipynb")
    (subs / "c_escaping.ipynb").symlink_to(source)
    before = {p.name: (_sha(p) if p.is_file() and not p.is_symlink() else None) for p in subs.iterdir()}
    source_sha = _sha(source)
    results = root / "results"
    start = time.perf_counter()
    code = main(["grade", str(subs), str(results), "--exercise", str(source), "--timeout", "20", "--jobs", "2",
                 "--memory-mb", "2048"])
    seconds = time.perf_counter() - start
    assert code == 0
    csv_sha = _sha(results / "grades.csv")
    with open(results / "grades.csv", newline="", encoding="utf-8") as f:
        rows = {row["student"]: row for row in csv.DictReader(f)}
    return {"rows": rows, "subs": subs, "results": results, "source": source, "before": before,
            "source_sha": source_sha, "csv_sha": csv_sha, "seconds": seconds}


def _feedback(graded, student: str) -> str:
    return (graded["results"] / "feedback" / f"{student}.txt").read_text(encoding="utf-8")


def test_honest_submissions_get_exactly_their_points(graded):
    rows = graded["rows"]
    assert rows["z_good"]["points"] == "3" and rows["z_good"]["message"] == "all 3 tests passed"
    assert rows["b_partial"]["points"] == "1"
    assert "adds_negative_numbers (hidden test): wrong values" in rows["b_partial"]["message"]
    assert rows["b_stub"]["points"] == "0" and "not attempted" in rows["b_stub"]["message"]
    assert all(row["max_points"] == "3" for row in rows.values())


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_an_attack_earns_nothing(graded, attack):
    row = graded["rows"][f"a_{attack}"]
    assert row["points"] == "0", f"{attack}: {row['message']}"


def test_a_submission_that_uses_the_library_is_flagged_not_failed(graded):
    row = graded["rows"]["b_library"]
    assert row["points"] == "3" and "flagged: uses operator.add" in row["message"]
    assert "flagged: your code uses operator.add" in _feedback(graded, "b_library")
    assert "flagged" not in graded["rows"]["z_good"]["message"]


def test_feedback_never_holds_hidden_test_source_or_the_solution(graded):
    for path in (graded["results"] / "feedback").iterdir():
        text = path.read_text(encoding="utf-8")
        assert "add(-1, -2)" not in text and "return a + b" not in text and "expect=" not in text, path.name
    assert "adds_small_numbers\n      raised an exception\n" in _feedback(graded, "a_leak_hidden_source")
    with open(graded["results"] / "grades.csv", encoding="utf-8") as f:
        text = f.read()
    assert "add(-1, -2)" not in text and "-3" not in text


def test_nothing_outside_the_sandbox_changed(graded):
    subs = graded["subs"]
    now = {p.name: (_sha(p) if p.is_file() and not p.is_symlink() else None) for p in subs.iterdir()}
    assert now == graded["before"], "the submissions folder changed (planted or edited files)"
    assert _sha(graded["source"]) == graded["source_sha"], "the exercise's source notebook changed"
    leftovers = [str(p) for d in ("/tmp", "/var/tmp", "/dev/shm", Path.cwd(), Path.home())
                 for p in Path(d).glob(f"{MARK}*")]
    assert leftovers == []


def test_no_process_outlives_the_run_and_the_results_stay_put(graded):
    time.sleep(3)  # a survivor of spawnv_passfds or fork would act now
    survivors = subprocess.run(["pgrep", "-f", MARK], capture_output=True, text=True).stdout.split()
    assert survivors == []
    assert _sha(graded["results"] / "grades.csv") == graded["csv_sha"]


def test_limits_stop_the_run_with_a_clear_message(graded):
    rows = graded["rows"]
    assert "MemoryError" in _feedback(graded, "a_memory")
    assert "adds_small_numbers: timed out" in rows["a_infinite_loop"]["message"]
    assert "time limit of 20 s while running test adds_small_numbers" in rows["a_catches_the_time_budget"]["message"]
    assert "wrote more than 16 MB of results" in rows["a_huge_channel"]["message"]
    assert rows["a_huge_stdout"]["message"].startswith("adds_small_numbers: the result is wrong: expected 3, got 0")
    assert rows["a_huge_stdout"]["message"].endswith("adds_negative_numbers (hidden test): wrong values")
    assert "the run ended before its work was done" in rows["a_os_exit"]["message"]
    assert "PermissionError" in _feedback(graded, "a_spawnv_passfds")
    assert "RuntimeError: fork returned [-1]" in _feedback(graded, "a_ctypes_fork_setsid")
    assert "RecursionError" in _feedback(graded, "a_deep_recursion_cell")
    assert "time limit" not in graded["rows"]["a_deep_recursion_cell"]["message"]


def test_malformed_reports_change_nothing(graded):
    row, feedback = graded["rows"]["a_malformed_reports"], _feedback(graded, "a_malformed_reports")
    assert "adds_small_numbers: wrong type" in row["message"] or "adds_small_numbers: the result could not be read" \
        in row["message"]
    assert "code cell 999" not in feedback and "running ['x']" not in row["message"]


def test_student_exceptions_cost_only_their_test(graded):
    rows = graded["rows"]
    assert "adds_small_numbers: your code raised KeyboardInterrupt" in rows["a_keyboard_interrupt"]["message"]
    assert "adds_negative_numbers (hidden test): raised an exception" in rows["a_keyboard_interrupt"]["message"]
    assert "adds_small_numbers: your code raised RecursionError" in rows["a_recursion"]["message"]
    assert "code cell 2 (`raise SystemExit(3)`): SystemExit: 3" in _feedback(graded, "b_system_exit")
    assert rows["b_system_exit"]["points"] == "3", "a cell that calls exit() costs that cell only"


def test_bad_folder_entries_are_skipped_with_a_reason(graded):
    rows = graded["rows"]
    assert "not graded: it is a folder" in rows["c_folder"]["message"]
    assert "not graded: it is not a regular file" in rows["c_fifo"]["message"]
    assert "not graded: it is a symbolic link" in rows["c_dangling"]["message"]
    assert "not graded: it is a symbolic link" in rows["c_escaping"]["message"]
    assert "not graded: it is not valid JSON" in rows["c_not_json"]["message"]
    assert all(rows[name]["points"] == "0" for name in ("c_folder", "c_fifo", "c_dangling", "c_escaping"))


def test_a_hostile_student_name_is_no_formula_in_the_csv(graded):
    name = '=HYPERLINK("evil","click")'
    with open(graded["results"] / "grades.csv", newline="", encoding="utf-8") as f:
        cells = [cell for row in csv.reader(f) for cell in row]
    assert "'" + name in cells and name not in cells
    assert graded["rows"]["'" + name]["points"] == "3"
    assert [p.name for p in (graded["results"] / "feedback").iterdir() if "HYPERLINK" in p.name] == \
           ["_HYPERLINK__evil___click__.txt"]
    assert csv_safe("-1+2") == "'-1+2" and csv_safe("+x") == "'+x" and csv_safe("@x") == "'@x"
    assert csv_safe("plain") == "plain"


def test_one_submission_never_stops_the_class(graded):
    """Results the grader cannot decode, and a file name that is not UTF-8, cost their own submission only."""
    rows = graded["rows"]
    assert rows["a_overflowing_tensor"]["points"] == "0"
    assert "adds_small_numbers: the result could not be read" in rows["a_overflowing_tensor"]["message"]
    shown = next(name for name in rows if name.startswith("caf"))
    assert shown == "caf\ufffd?" and rows[shown]["points"] == "3"
    assert (graded["results"] / "feedback" / "caf__.txt").is_file()
    assert rows["z_good"]["points"] == "3"


def test_hidden_tests_report_only_the_graders_categories(graded):
    """Nothing the submission chose (exception names, dict keys) is echoed for a hidden test; every field is capped."""
    for attack in ("builtin_named_error", "source_in_dict_keys"):
        feedback = _feedback(graded, f"a_{attack}")
        assert "return add" not in feedback and "add(-1, -2)" not in feedback and "expect=" not in feedback, feedback
        assert "adds_negative_numbers (hidden test)\n      " in feedback
    assert "adds_negative_numbers (hidden test)\n      raised an exception\n" in _feedback(graded, "a_builtin_named_error")
    assert "adds_negative_numbers (hidden test)\n      wrong type\n" in _feedback(graded, "a_source_in_dict_keys")
    size = (graded["results"] / "grades.csv").stat().st_size
    assert size < 100_000, f"grades.csv has {size} bytes"
    assert all(len(row["message"]) <= 2000 for row in graded["rows"].values())


def test_visible_tests_that_answer_themselves_earn_nothing(graded):
    """The submission wraps the test registration and answers each visible test with its own expect= value: the
    visible test passes, but only hidden tests give points."""
    row = graded["rows"]["a_self_answering"]
    assert "adds_small_numbers" not in row["message"], "the attack should pass the visible test"
    assert row["points"] == "0" and "adds_negative_numbers (hidden test): wrong values" in row["message"]


def test_a_test_that_hangs_costs_that_test_only(graded):
    row = graded["rows"]["b_hangs_on_one_test"]
    assert row["points"] == "2" and row["message"] == "adds_positive_numbers (hidden test): timed out"


def test_grading_the_class_is_quick(graded):
    print(f"graded {len(graded['rows'])} entries in {graded['seconds']:.1f} s")
    assert graded["seconds"] < 180


@pytest.mark.parametrize("option, value, message", [
    ("--timeout", "nan", "timeout must be a finite number"), ("--timeout", "inf", "timeout must be a finite"),
    ("--timeout", "0", "timeout must be"), ("--jobs", "0", "jobs must be a whole number >= 1"),
    ("--memory-mb", "-5", "memory_mb must be a positive"),
])
def test_bad_options_are_refused_before_anyone_is_graded(tmp_path, capsys, option, value, message):
    (tmp_path / "subs").mkdir()
    (tmp_path / "subs" / "x.ipynb").write_text(json.dumps(_submission(CORRECT)))
    start = time.perf_counter()
    code = main(["grade", str(tmp_path / "subs"), str(tmp_path / "results"), "--exercise",
                 str(tmp_path / "missing.ipynb"), option, value])
    assert code == 1 and message in capsys.readouterr().err
    assert time.perf_counter() - start < 5 and not (tmp_path / "results" / "grades.csv").exists()


def test_an_empty_folder_is_an_error_and_nothing_is_written(tmp_path, capsys):
    source = tmp_path / "add.ipynb"
    source.write_text(json.dumps(exercise()))
    (tmp_path / "subs").mkdir()
    (tmp_path / "subs" / "notes.txt").write_text("not a notebook")
    code = main(["grade", str(tmp_path / "subs"), str(tmp_path / "results"), "--exercise", str(source)])
    assert code == 1 and "holds no notebooks (*.ipynb); nothing to grade" in capsys.readouterr().err
    assert not (tmp_path / "results").exists()


def test_a_missing_exercise_is_refused_before_anything_is_written(tmp_path, capsys):
    (tmp_path / "subs").mkdir()
    (tmp_path / "subs" / "x.ipynb").write_text(json.dumps(_submission(CORRECT)))
    code = main(["grade", str(tmp_path / "subs"), str(tmp_path / "results"), "--exercise", str(tmp_path / "no.ipynb")])
    assert code == 1 and "exercise: " in capsys.readouterr().err
    assert not (tmp_path / "results").exists()
    with pytest.raises(SystemExit):  # argparse: --exercise is required
        main(["grade", str(tmp_path / "subs"), str(tmp_path / "results")])
    assert not (tmp_path / "results").exists()


def test_a_results_path_that_is_a_file_is_refused_before_anyone_is_graded(tmp_path, capsys):
    (tmp_path / "subs").mkdir()
    (tmp_path / "results").write_text("not a folder")
    code = main(["grade", str(tmp_path / "subs"), str(tmp_path / "results"), "--exercise", "x.ipynb"])
    assert code == 1 and "results: " in (err := capsys.readouterr().err) and "exists and is not a folder" in err
    assert (tmp_path / "results").read_text() == "not a folder"


def test_without_bubblewrap_grading_refuses_unless_told_no_sandbox(tmp_path, monkeypatch, capsys):
    source = tmp_path / "add.ipynb"
    source.write_text(json.dumps(exercise()))
    (tmp_path / "subs").mkdir()
    (tmp_path / "subs" / "x.ipynb").write_text(json.dumps(_submission(CORRECT)))
    monkeypatch.setenv("PATH", str(tmp_path))  # no bwrap on this PATH
    args = ["grade", str(tmp_path / "subs"), str(tmp_path / "results"), "--exercise", str(source)]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "bubblewrap (bwrap) is not installed" in err and "apt-get install bubblewrap" in err and "--no-sandbox" in err
    assert main(args + ["--no-sandbox"]) == 0
    assert "WARNING: --no-sandbox" in capsys.readouterr().err
    rows = list(csv.DictReader(open(tmp_path / "results" / "grades.csv", encoding="utf-8")))
    assert rows[0]["points"] == "3" and rows[0]["message"].startswith("graded without the sandbox")
    assert "WITHOUT the sandbox" in (tmp_path / "results" / "feedback" / "x.txt").read_text()


def test_the_seccomp_program_knows_this_machine():
    program = sandbox_filter()
    assert program is not None and len(program) % 8 == 0
    assert sandbox_filter("riscv64") is None


def test_a_correct_solution_in_a_thirty_student_class_is_graded_in_under_two_minutes(tmp_path):
    source = tmp_path / "add.ipynb"
    source.write_text(json.dumps(exercise()))
    subs = tmp_path / "subs"
    subs.mkdir()
    for n in range(30):
        (subs / f"student{n:02d}.ipynb").write_text(json.dumps(_submission(CORRECT if n % 3 else WRONG)))
    start = time.perf_counter()
    rows = grade_folder(source, subs, tmp_path / "results", timeout=30, jobs=2)
    seconds = time.perf_counter() - start
    print(f"30 submissions graded in {seconds:.1f} s ({seconds / 30:.2f} s each, 2 at a time)")
    assert [row["points"] for row in rows] == ["3" if n % 3 else "0" for n in range(30)]
    assert seconds < 120


def test_read_only_binds_come_after_the_tmpfs_they_may_lie_in(monkeypatch):
    """A Python installed under /tmp (CI's fresh venv) must stay visible: binds after the /tmp tmpfs."""
    from course_lib.grading import sandbox

    monkeypatch.setattr(sandbox, "_read_only_paths", lambda: [Path("/tmp/tmp.x/venv"), Path("/opt/py")])
    command = sandbox.bwrap_command(sandbox.Limits(), None)
    tmpfs = command.index("/tmp", command.index("--tmpfs"))
    binds = [i for i, arg in enumerate(command) if arg == "--ro-bind" and command[i + 1].startswith(("/tmp/", "/opt"))]
    assert len(binds) == 2 and all(i > tmpfs for i in binds)
    assert command.index("--remount-ro") > max(binds)
