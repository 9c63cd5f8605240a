"""Trivial implementations of a task, which must earn none of its points.

When the build verifies an exercise, it replaces the functions of each task (the ones whose body holds the
solution block) with each stand-in below in turn, runs that task's hidden tests, and refuses the exercise when a
stand-in passes one of them: a test that "return the input" or "return False" passes gives points for nothing.
The stand-ins receive the task function's arguments (without ``self``) and ignore what they mean.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

_ORIGINALS = "__course_originals__"


def _first_tensor(args: tuple) -> torch.Tensor | None:
    return next((a for a in args if isinstance(a, torch.Tensor)), None)


def _zeros(args: tuple) -> Any:
    tensor = _first_tensor(args)
    return 0 if tensor is None else torch.zeros_like(tensor)


def _uniform(args: tuple) -> Any:
    tensor = _first_tensor(args)
    if tensor is None or tensor.dim() == 0:
        return 0.5
    return torch.full(tensor.shape, 1.0 / tensor.shape[-1])


STAND_INS: dict[str, Callable[[tuple], Any]] = {
    "returns its first input": lambda args: args[0] if args else None,
    "returns None": lambda args: None,
    "returns 0": lambda args: 0,
    "returns True": lambda args: True,
    "returns False": lambda args: False,
    "returns an empty list": lambda args: [],
    "returns zeros shaped like its first tensor": _zeros,
    "returns the uniform distribution": _uniform,
}


def replace(namespace: dict, targets: list[tuple[str | None, str]], kind: str) -> None:
    """Replace each ``(class or None, function)`` of ``namespace`` with the stand-in ``kind``, keeping the
    originals for ``restore``."""
    originals = namespace.setdefault(_ORIGINALS, {})
    stand_in = STAND_INS[kind]
    for owner, name in targets:
        holder = namespace[owner] if owner else None
        original = getattr(holder, name) if holder is not None else namespace[name]
        originals.setdefault((owner, name), original)
        if holder is None:
            namespace[name] = lambda *args, **kwargs: stand_in(args + tuple(kwargs.values()))
        else:  # a method: drop self
            setattr(holder, name, lambda self, *args, **kwargs: stand_in(args + tuple(kwargs.values())))


def restore(namespace: dict) -> None:
    """Put back every function that ``replace`` replaced."""
    for (owner, name), original in namespace.pop(_ORIGINALS, {}).items():
        if owner:
            setattr(namespace[owner], name, original)
        else:
            namespace[name] = original


def replace_source(targets: list[tuple[str | None, str]], kind: str) -> str:
    """The code cell that makes a notebook's namespace use the stand-in ``kind`` for ``targets``."""
    return (f"import course_lib.grading.trivial as _course_trivial\n"
            f"_course_trivial.replace(globals(), {targets!r}, {kind!r})")


RESTORE_SOURCE = "import course_lib.grading.trivial as _course_trivial\n_course_trivial.restore(globals())"
