"""The sandbox a submission runs in: bubblewrap, a seccomp filter, resource limits, and a capped channel out.

``run_sandboxed(jobs, limits)`` starts ``runner.py`` inside ``bwrap`` and feeds it the jobs one at a time (the next only
after the runner reported the previous one done), reading its report lines only as fast as it handles them, with
a size cap, per-line bounds (``parse_report``) and a wall-clock deadline. Inside, the submission sees:

- no network, and new PID, IPC, UTS, user and cgroup namespaces: it runs as an unprivileged user with no
  capabilities, and every process in the sandbox dies with the run (``--die-with-parent``);
- read-only: the system (/usr), the Python installation and the installed ``course_lib`` package, nothing else
  of the host (no home folder, no exercise sources, no results folder, no other submission);
- one fresh, size-capped writable /tmp (and /dev/shm) that disappears with the run, and a cleared environment;
- a seccomp filter under which fork, vfork and clone without CLONE_THREAD fail: threads work, new processes
  do not, so nothing outlives the run and nothing forks the machine to death (RLIMIT_NPROC does not bind root);
  and under which memfd_create, memfd_secret, shmget, shmat and msgget fail too (memory that outlives its mappings);
- runner.py's limits on address space, CPU time, file size and open files.

So the memory a run can hold is bounded by RLIMIT_AS (``Limits.memory_mb``) for its mappings plus the capped /tmp
and /dev/shm tmpfs (``Limits.tmp_mb``, 256 MB each by default), with memfd and System V shared memory and message
queues refused. An unprivileged bwrap cannot set cgroup v2 memory limits here, so none bounds the run as a whole."""

from __future__ import annotations

import json
import math
import os
import platform
import queue
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import course_lib

INSTALL_HINT = ("install bubblewrap (Debian/Ubuntu: apt-get install bubblewrap; Fedora: dnf install bubblewrap) "
                "or grade inside a Linux container that has it")


@dataclass(frozen=True)
class Limits:
    """What one run may use. ``timeout`` is wall-clock seconds for the whole notebook and its tests."""

    timeout: float = 60.0
    memory_mb: int = 4096   # address space (torch alone maps about 1.5 GB)
    output_mb: int = 16     # report lines read back from the sandbox
    tmp_mb: int = 256       # the writable /tmp (and /dev/shm), in memory
    file_mb: int = 64       # the largest file the submission may write

    def __post_init__(self) -> None:
        if not (isinstance(self.timeout, (int, float)) and math.isfinite(self.timeout) and self.timeout > 0):
            raise ValueError(f"timeout must be a finite number of seconds > 0, got {self.timeout!r}")
        for name in ("memory_mb", "output_mb", "tmp_mb", "file_mb"):
            value = getattr(self, name)
            if not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
                raise ValueError(f"{name} must be a positive whole number of megabytes, got {value!r}")


@dataclass
class Run:
    """What came out of one run: report lines, each with how many jobs had been sent when it arrived."""

    entries: list[tuple[int, dict]] = field(default_factory=list)
    problem: str = ""        # why the run ended early ("" when every job was done)
    seconds: float = 0.0
    diagnostics: str = ""    # the start of bwrap's/runner's stderr, for the instructor's console only


# --- seccomp: no new processes, no memory outside mappings -----------------------------------------------------

_ARCH = {"x86_64": (0xC000003E, {"clone": 56, "fork": 57, "vfork": 58, "clone3": 435, "shmget": 29, "shmat": 30,
                                 "msgget": 68, "memfd_create": 319, "memfd_secret": 447}),
         "aarch64": (0xC00000B7, {"clone": 220, "clone3": 435, "shmget": 194, "shmat": 196, "msgget": 186,
                                  "memfd_create": 279, "memfd_secret": 447})}
_DENIED = ("fork", "vfork", "shmget", "shmat", "msgget", "memfd_create", "memfd_secret")  # where the arch has them
_LD, _JEQ, _JGE, _JSET, _RET = 0x20, 0x15, 0x35, 0x45, 0x06  # BPF_LD|W|ABS, BPF_JMP|{JEQ,JGE,JSET}|K, BPF_RET|K
_ALLOW, _ERRNO, _KILL = 0x7FFF0000, 0x00050000, 0x80000000
_EPERM, _ENOSYS, _CLONE_THREAD = 1, 38, 0x00010000


def _assemble(program: list) -> bytes:
    """BPF bytes from (code, k, jump_if_true, jump_if_false) tuples whose jumps name labels (plain strings)."""
    where, n = {}, 0
    for item in program:
        if isinstance(item, str):
            where[item] = n
        else:
            n += 1
    out, n = b"", 0
    for item in program:
        if isinstance(item, str):
            continue
        code, k, jt, jf = item
        offset = lambda label: 0 if label is None else where[label] - n - 1  # noqa: E731
        out += struct.pack("<HBBI", code, offset(jt), offset(jf), k)
        n += 1
    return out


def sandbox_filter(machine: str | None = None) -> bytes | None:
    """A seccomp program that fails fork/vfork/clone-without-CLONE_THREAD and the memory calls of ``_DENIED``
    with EPERM (and clone3 with ENOSYS, so that the C library falls back to clone); None on an architecture it
    does not know. Any other architecture's calls (32-bit x86 on x86_64) kill the process."""
    machine = machine or platform.machine()
    arch, nr = _ARCH.get(machine, (None, None))
    if arch is None:
        return None
    program = [(_LD, 4, None, None), (_JEQ, arch, None, "kill"), (_LD, 0, None, None)]
    if machine == "x86_64":
        program.append((_JGE, 0x40000000, "deny", None))  # the x32 ABI's numbers
    program += [(_JEQ, nr[name], "deny", None) for name in _DENIED if name in nr]
    program += [(_JEQ, nr["clone3"], "enosys", None), (_JEQ, nr["clone"], None, "allow"),
                (_LD, 16, None, None), (_JSET, _CLONE_THREAD, "allow", "deny"),
                "allow", (_RET, _ALLOW, None, None), "deny", (_RET, _ERRNO | _EPERM, None, None),
                "enosys", (_RET, _ERRNO | _ENOSYS, None, None), "kill", (_RET, _KILL, None, None)]
    return _assemble(program)


# --- the bwrap command ----------------------------------------------------------------------------------------

def _read_only_paths() -> list[Path]:
    """The host folders the sandbox sees (read-only): the Python installation and the course package."""
    package = Path(course_lib.__file__).resolve().parent
    paths = {Path(p).resolve() for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix)}
    paths |= {Path(p).resolve() for p in sys.path if p.endswith(("site-packages", "dist-packages"))}
    paths |= {package, Path(sys.executable).resolve().parent}
    paths = sorted(p for p in paths if p.is_dir() and not p.is_relative_to("/usr"))
    return [p for p in paths if not any(p != q and p.is_relative_to(q) for q in paths)]


def _environment() -> dict[str, str]:
    package_parent = str(Path(course_lib.__file__).resolve().parents[1])
    return {"HOME": "/tmp", "TMPDIR": "/tmp", "USER": "student", "LOGNAME": "student", "LANG": "C.UTF-8",
            "PATH": "/usr/local/bin:/usr/bin:/bin", "PYTHONPATH": package_parent, "PYTHONDONTWRITEBYTECODE": "1",
            "MPLBACKEND": "Agg", "MPLCONFIGDIR": "/tmp", "IPYTHONDIR": "/tmp/.ipython", "COURSE_STATIC": "1",
            "COURSE_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def bwrap_command(limits: Limits, seccomp_fd: int | None) -> list[str]:
    """The bwrap command line that runs runner.py under ``limits`` (see the module docstring)."""
    command = ["bwrap", "--unshare-all", "--unshare-user", "--disable-userns", "--uid", "65534", "--gid", "65534",
               "--hostname", "grader", "--die-with-parent", "--new-session", "--cap-drop", "ALL",
               "--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib64", "/lib32"):
        if os.path.islink(top):
            command += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            command += ["--ro-bind", top, top]
    size = str(limits.tmp_mb * 2**20)
    command += ["--proc", "/proc", "--dev", "/dev", "--size", size, "--tmpfs", "/tmp", "--size", size,
                "--tmpfs", "/dev/shm"]
    for etc in ("/etc/ld.so.cache", "/etc/fonts", "/etc/localtime"):
        command += ["--ro-bind-try", etc, etc]
    for path in _read_only_paths():  # after the /tmp tmpfs, which would hide a Python installed under /tmp
        command += ["--ro-bind", str(path), str(path)]
    command += ["--remount-ro", "/", "--chdir", "/tmp", "--clearenv"]
    for name, value in _environment().items():
        command += ["--setenv", name, value]
    if seccomp_fd is not None:
        command += ["--seccomp", str(seccomp_fd)]
    return command + ["--", *_runner(limits)]


def _runner(limits: Limits) -> list[str]:
    cpu_seconds = int(limits.timeout) + 30  # one thread: CPU time only binds a run that hides from the clock
    return [sys.executable, "-s", "-m", "course_lib.grading.runner", str(limits.memory_mb * 2**20),
            str(cpu_seconds), str(limits.file_mb * 2**20)]


def bwrap_problem() -> str:
    """"" when bubblewrap can build this sandbox here; otherwise what is wrong and what to install."""
    if shutil.which("bwrap") is None:
        return f"bubblewrap (bwrap) is not installed: {INSTALL_HINT}"
    command = bwrap_command(Limits(), None)
    command = command[:command.index("--")] + ["--", sys.executable, "-c", "import course_lib.grading.values"]
    try:
        done = subprocess.run(command, capture_output=True, timeout=60, text=True)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"bubblewrap could not start: {exc}"
    if done.returncode != 0:
        return (f"bubblewrap cannot build the sandbox here ({done.stderr.strip()[:300]}); user namespaces may be "
                "disabled (sysctl kernel.unprivileged_userns_clone=1) or the container forbids them")
    return ""


# --- reading the reports -------------------------------------------------------------------------------------

MAX_LINE_BYTES = 4 * 2**20  # one report line; a longer one is skipped (never stored whole)
MAX_ITEMS = 300_000         # "[", "{", "," and ":" in one line: what json.loads builds grows with them
MAX_DEPTH = 64              # nesting of one line (values.encode nests at most 2 * values.MAX_DEPTH + 3 deep)


def _deeper_than(value: object, depth: int) -> bool:
    """Whether ``value`` (parsed JSON) nests lists and dicts more than ``depth`` deep; one level at a time."""
    level = [value]
    for _ in range(depth):  # after k rounds: the containers k + 1 deep
        level = [child for item in level for child in (item.values() if isinstance(item, dict) else item)
                 if isinstance(child, (dict, list))]
        if not level:
            return False
    return True


def parse_report(line: bytes) -> dict | None:
    """The JSON object on one report line, or None for anything else: not ASCII (the runner's ``json.dumps``
    escapes the rest), over MAX_LINE_BYTES or MAX_ITEMS, nested deeper than MAX_DEPTH, not JSON, not an object.
    The bounds come before ``json.loads``: parsing one line peaks at about 43 MB (tests/test_grading_memory.py)."""
    if len(line) > MAX_LINE_BYTES or not line.isascii():
        return None
    brackets = line.count(b"[") + line.count(b"{")
    if brackets + line.count(b",") + line.count(b":") > MAX_ITEMS:
        return None
    try:
        entry = json.loads(line)
    except (ValueError, RecursionError):  # RecursionError: "[[[[..." nested deeper than json can go
        return None
    if not isinstance(entry, dict) or brackets > MAX_DEPTH and _deeper_than(entry, MAX_DEPTH):
        return None
    return entry


def _report_lines(stream, limits: Limits, deadline: float) -> Iterator[bytes | str]:
    """Each complete line of ``stream``, except those over MAX_LINE_BYTES (dropped as they arrive), and last the
    reason the reading stopped (a str): the deadline, the end of the stream, or more than ``limits.output_mb``.
    It reads only when asked for the next line, so what the grader has not handled yet waits in the pipe (and
    the writer with it), not in the grader's memory."""
    poll, total, parts, size = select.poll(), 0, [], 0  # parts: the line so far, unless it is already too long
    poll.register(stream.fileno(), select.POLLIN)
    while True:
        left = deadline - time.perf_counter()
        if left <= 0 or not poll.poll(left * 1000):
            yield f"stopped after the time limit of {limits.timeout:g} s"
            return
        if not (chunk := os.read(stream.fileno(), 65536)):
            yield "the run ended before its work was done"
            return
        total += len(chunk)
        if total > limits.output_mb * 2**20:
            yield f"stopped: it wrote more than {limits.output_mb} MB of results"
            return
        *ends, rest = chunk.split(b"\n")
        for end in ends:
            if size + len(end) <= MAX_LINE_BYTES:
                yield b"".join(parts) + end
            parts, size = [], 0
        size += len(rest)
        parts = [*parts, rest] if size <= MAX_LINE_BYTES else []


# --- running the jobs -----------------------------------------------------------------------------------------

def _read_capped(stream, sink: list[bytes], cap: int = 65536) -> None:
    """Keep the first ``cap`` bytes of ``stream`` and drain the rest, so the writer never blocks."""
    kept = 0
    while chunk := stream.read1(65536):
        if kept < cap:
            sink.append(chunk[:cap - kept])
            kept += len(sink[-1])


def _write_lines(stream, jobs: queue.Queue) -> None:
    while (job := jobs.get()) is not None:
        try:
            stream.write(job)
            stream.flush()
        except (BrokenPipeError, OSError):
            return
    stream.close()


def _start(limits: Limits, sandbox: bool, workdir: str) -> tuple[subprocess.Popen, int | None]:
    if not sandbox:  # the instructor trusts these submissions: same runner and limits, no isolation
        env = {**_environment(), "HOME": workdir, "TMPDIR": workdir, "MPLCONFIGDIR": workdir}
        return subprocess.Popen(_runner(limits), cwd=workdir, env=env, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True), None
    program = sandbox_filter()
    read_end = None
    if program is not None:
        read_end, write_end = os.pipe()
        os.write(write_end, program)
        os.close(write_end)
    try:
        return subprocess.Popen(bwrap_command(limits, read_end), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True,
                                pass_fds=() if read_end is None else (read_end,)), read_end
    except BaseException:
        if read_end is not None:
            os.close(read_end)
        raise


def run_sandboxed(jobs: list[dict], limits: Limits, sandbox: bool = True,
                  keep: Callable[[int, dict], bool] | None = None) -> Run:
    """Run ``runner.py`` on ``jobs`` (sending job k+1 once job k is reported done) and collect its reports.

    Each report (see ``parse_report``) goes to ``keep(sent, entry)`` first: ``Run.entries`` holds only those it
    returns True for (all of them without ``keep``), so a caller that decides each entry as it arrives holds none.
    The deadline holds even while reports keep coming.
    """
    result, start = Run(), time.perf_counter()
    outbox: queue.Queue = queue.Queue()
    stderr: list[bytes] = []
    with tempfile.TemporaryDirectory(prefix="course-grade-") as workdir:
        child, seccomp_fd = _start(limits, sandbox, workdir)
        threads = [threading.Thread(target=_read_capped, args=(child.stderr, stderr), daemon=True),
                   threading.Thread(target=_write_lines, args=(child.stdin, outbox), daemon=True)]
        for thread in threads:
            thread.start()
        outbox.put((json.dumps(jobs[0]) + "\n").encode())
        sent = 1
        try:
            for line in _report_lines(child.stdout, limits, start + limits.timeout):
                if isinstance(line, str):
                    result.problem = line
                    break
                if (entry := parse_report(line)) is None:
                    continue
                if keep is None or keep(sent, entry):
                    result.entries.append((sent, entry))
                done, entry = entry.get("done") == sent, None  # nothing dropped stays alive during the next parse
                if done:
                    if sent == len(jobs):
                        break
                    outbox.put((json.dumps(jobs[sent]) + "\n").encode())
                    sent += 1
        finally:
            outbox.put(None)
            _stop(child, grace=0 if result.problem else 2)
            if seccomp_fd is not None:
                os.close(seccomp_fd)
        threads[0].join(timeout=5)
    result.diagnostics = b"".join(stderr).decode("utf-8", "replace")
    if result.problem and child.returncode not in (0, None, -signal.SIGKILL):
        how = (f"killed by signal {signal.Signals(-child.returncode).name}" if child.returncode < 0
               else f"exit code {child.returncode}")
        result.problem += f" ({how})"
    result.seconds = time.perf_counter() - start
    return result


def _stop(child: subprocess.Popen, grace: float) -> None:
    """End the run: the runner exits by itself once stdin closes; whatever is left is killed with its group."""
    try:
        child.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(child.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    child.wait()
