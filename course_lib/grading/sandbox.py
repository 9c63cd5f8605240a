"""The sandbox a submission runs in: bubblewrap, a seccomp filter, resource limits, and a capped channel out.

``run_sandboxed(jobs, limits)`` starts ``runner.py`` inside ``bwrap`` and feeds it the jobs one at a time (the next only
after the runner reported the previous one done), reading its report lines with a size cap and a wall-clock
deadline. Inside, the submission sees:

- no network, and new PID, IPC, UTS, user and cgroup namespaces: it runs as an unprivileged user with no
  capabilities, and every process in the sandbox dies with the run (``--die-with-parent``);
- read-only: the system (/usr), the Python installation and the installed ``course_lib`` package, nothing else
  of the host (no home folder, no exercise sources, no results folder, no other submission);
- one fresh, size-capped writable /tmp that disappears with the run, and a cleared environment;
- a seccomp filter under which fork, vfork and clone without CLONE_THREAD fail: threads work, new processes
  do not, so nothing outlives the run and nothing forks the machine to death (RLIMIT_NPROC does not bind root);
- runner.py's limits on address space, CPU time, file size and open files.
"""

from __future__ import annotations

import json
import math
import os
import platform
import queue
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
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


# --- seccomp: no new processes --------------------------------------------------------------------------------

_ARCH = {"x86_64": (0xC000003E, {"clone": 56, "fork": 57, "vfork": 58, "clone3": 435}),
         "aarch64": (0xC00000B7, {"clone": 220, "clone3": 435})}
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


def no_fork_filter(machine: str | None = None) -> bytes | None:
    """A seccomp program that fails fork/vfork/clone-without-CLONE_THREAD with EPERM (and clone3 with ENOSYS,
    so that the C library falls back to clone); None on an architecture it does not know."""
    arch, nr = _ARCH.get(machine or platform.machine(), (None, None))
    if arch is None:
        return None
    program = [(_LD, 4, None, None), (_JEQ, arch, None, "kill"), (_LD, 0, None, None)]
    if machine in (None, "x86_64") and "fork" in nr:
        program += [(_JGE, 0x40000000, "deny", None),  # the x32 ABI's numbers
                    (_JEQ, nr["fork"], "deny", None), (_JEQ, nr["vfork"], "deny", None)]
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


# --- running the jobs -----------------------------------------------------------------------------------------

def _read_lines(stream, lines: queue.Queue, cap: int) -> None:
    """Put each complete line of ``stream`` on ``lines``; after ``cap`` bytes put "overflow"; at the end None."""
    total, pending = 0, b""
    while chunk := stream.read1(65536):
        total += len(chunk)
        if total > cap:
            lines.put("overflow")
            return
        *complete, pending = (pending + chunk).split(b"\n")
        for line in complete:
            lines.put(line)
    lines.put(None)


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
    program = no_fork_filter()
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


def run_sandboxed(jobs: list[dict], limits: Limits, sandbox: bool = True) -> Run:
    """Run ``runner.py`` on ``jobs`` (sending job k+1 once job k is reported done) and collect its reports."""
    result, start = Run(), time.perf_counter()
    lines: queue.Queue = queue.Queue()
    outbox: queue.Queue = queue.Queue()
    stderr: list[bytes] = []
    with tempfile.TemporaryDirectory(prefix="course-grade-") as workdir:
        child, seccomp_fd = _start(limits, sandbox, workdir)
        threads = [threading.Thread(target=_read_lines, args=(child.stdout, lines, limits.output_mb * 2**20)),
                   threading.Thread(target=_read_capped, args=(child.stderr, stderr)),
                   threading.Thread(target=_write_lines, args=(child.stdin, outbox))]
        for thread in threads:
            thread.daemon = True
            thread.start()
        sent, deadline = 0, start + limits.timeout
        outbox.put((json.dumps(jobs[0]) + "\n").encode())
        sent = 1
        try:
            while True:
                try:
                    line = lines.get(timeout=max(0.0, deadline - time.perf_counter()))
                except queue.Empty:
                    result.problem = f"stopped after the time limit of {limits.timeout:g} s"
                    break
                if line is None:
                    result.problem = "the run ended before its work was done"
                    break
                if line == "overflow":
                    result.problem = f"stopped: it wrote more than {limits.output_mb} MB of results"
                    break
                try:
                    entry = json.loads(line)
                except (ValueError, RecursionError):  # RecursionError: "[[[[..." nested deeper than json can go
                    continue
                if not isinstance(entry, dict):
                    continue
                result.entries.append((sent, entry))
                if entry.get("done") == sent:
                    if sent == len(jobs):
                        break
                    outbox.put((json.dumps(jobs[sent]) + "\n").encode())
                    sent += 1
        finally:
            outbox.put(None)
            _stop(child, grace=0 if result.problem else 2)
            if seccomp_fd is not None:
                os.close(seccomp_fd)
        for thread in threads[:2]:
            thread.join(timeout=5)
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
