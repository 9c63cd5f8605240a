"""Code that must earn none of a task's points: trivial stand-ins and the instructor's wrong variants.

When the build verifies an exercise, it replaces the functions of each task (the ones whose body holds the
solution block) with each stand-in below in turn, and with each wrong variant of the source's variants cell,
runs that task's hidden tests, and refuses the exercise when one of them passes a test: a test that "return the
input" or "off by one" passes gives points for nothing. The stand-ins receive the task function's arguments
(without ``self``) and ignore what they mean; a variant is a full wrong definition, run as a cell.
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


def save(namespace: dict, targets: list[tuple[str | None, str]]) -> None:
    """Keep each ``(class or None, function)`` of ``namespace`` (and the class itself) for ``restore``."""
    originals = namespace.setdefault(_ORIGINALS, {})
    for owner, name in targets:
        holder = namespace[owner] if owner else None
        originals.setdefault((owner, name), getattr(holder, name) if holder is not None else namespace[name])
        if owner:
            originals.setdefault((None, owner), holder)


def replace(namespace: dict, targets: list[tuple[str | None, str]], kind: str) -> None:
    """Replace each ``(class or None, function)`` of ``namespace`` with the stand-in ``kind``, keeping the
    originals for ``restore``."""
    save(namespace, targets)
    stand_in = STAND_INS[kind]
    for owner, name in targets:
        holder = namespace[owner] if owner else None
        if holder is None:
            namespace[name] = lambda *args, **kwargs: stand_in(args + tuple(kwargs.values()))
        else:  # a method: drop self
            setattr(holder, name, lambda self, *args, **kwargs: stand_in(args + tuple(kwargs.values())))


def restore(namespace: dict) -> None:
    """Put back every class and function that ``save`` kept (classes first, then their methods)."""
    originals = namespace.pop(_ORIGINALS, {})
    for (owner, name), original in sorted(originals.items(), key=lambda item: item[0][0] is not None):
        if owner:
            setattr(namespace[owner], name, original)
        else:
            namespace[name] = original


def replace_source(targets: list[tuple[str | None, str]], kind: str) -> str:
    """The code cell that makes a notebook's namespace use the stand-in ``kind`` for ``targets``."""
    return (f"import course_lib.grading.trivial as _course_trivial\n"
            f"_course_trivial.replace(globals(), {targets!r}, {kind!r})")


def save_source(targets: list[tuple[str | None, str]]) -> str:
    """The code cell that keeps ``targets`` before a wrong variant redefines them."""
    return f"import course_lib.grading.trivial as _course_trivial\n_course_trivial.save(globals(), {targets!r})"


RESTORE_SOURCE = "import course_lib.grading.trivial as _course_trivial\n_course_trivial.restore(globals())"
