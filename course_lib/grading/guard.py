"""A seatbelt for running a submission: no writes outside its own folder, no new processes, no signals to others.

Installed with ``sys.addaudithook`` in the grading subprocess before the learner's code runs; an audit hook
cannot be removed again from Python. It stops the accidents and casual misbehaviour a course sees (saving
files next to the submissions, ``!rm``, killing the grader). It is not a sandbox against a determined
attacker (ctypes can still do anything): grade untrusted code inside a container or a throwaway account.
"""

from __future__ import annotations

import os
import sys

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
# Audit events that change the file system, and which of their arguments are paths.
_PATH_EVENTS = {
    "os.remove": (0,), "os.rmdir": (0,), "os.mkdir": (0,), "os.rename": (0, 1), "os.link": (1,),
    "os.symlink": (1,), "os.truncate": (0,), "os.chmod": (0,), "os.chown": (0,), "os.utime": (0,),
    "os.setxattr": (0,), "os.removexattr": (0,), "shutil.rmtree": (0,), "shutil.copyfile": (1,),
    "shutil.copytree": (1,), "shutil.move": (0, 1),
}
_SPAWN_EVENTS = {"subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
                 "os.forkpty", "pty.spawn"}
_DIR_FD_ARG = {"os.remove": 1, "os.rmdir": 1, "os.mkdir": 2, "os.chmod": 2, "os.utime": 3}


def confine(workdir: str | os.PathLike) -> None:
    """From now on, this process may write only under ``workdir``, start no process and signal no other."""
    root = os.path.realpath(workdir)
    allowed = (root + os.sep, os.devnull)

    def inside(path, dir_fd: int | None = None) -> bool:
        if isinstance(path, int):  # an already open file descriptor
            return True
        path = os.fsdecode(path)
        if dir_fd not in (None, -1) and not os.path.isabs(path):
            path = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), path)  # shutil.rmtree works by fd
        full = os.path.realpath(path)
        return full == root or full.startswith(allowed) or full == os.devnull

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, _mode, flags = args
            if flags is not None and flags & _WRITE_FLAGS and not inside(path):
                raise PermissionError(f"grading: writing to {path} is not allowed; write inside your own folder")
        elif event in _PATH_EVENTS:
            dir_fd = args[_DIR_FD_ARG[event]] if event in _DIR_FD_ARG else None
            for i in _PATH_EVENTS[event]:
                if not inside(args[i], dir_fd):
                    raise PermissionError(f"grading: changing {args[i]} is not allowed ({event})")
        elif event in _SPAWN_EVENTS:
            raise PermissionError(f"grading: starting other programs is not allowed ({event})")
        elif event in ("os.kill", "os.killpg") and args[0] not in (os.getpid(), 0):
            raise PermissionError(f"grading: sending signals to other processes is not allowed ({event})")

    sys.addaudithook(hook)
