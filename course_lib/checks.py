"""The one argument check the library shares: a clear ``ValueError`` naming the parameter and what it allows.

    check_arg("num_beams", num_beams, is_integer(num_beams) and num_beams >= 1, "an integer >= 1")
    # ValueError: num_beams=2.5 is not allowed; num_beams must be an integer >= 1

Decoding, processors, stopping criteria, speculative decoding and timing all use it, so every bad setting reads
the same way and fails before anything reaches torch. This module imports nothing from the library.
"""

from __future__ import annotations

import math


def is_number(value) -> bool:
    """A finite int or float (``bool``, NaN, infinities, strings and tensors are not)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def is_integer(value) -> bool:
    """An ``int`` that is not a ``bool`` (2.0 is not an integer here: counts are ints)."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_arg(name: str, value, ok: bool, allowed: str) -> None:
    """Raise ``ValueError`` naming ``name``, its ``value`` and what is ``allowed`` unless ``ok``.

    Start ``ok`` with ``is_number``/``is_integer`` (which refuse bools), so that comparing a string or None
    never runs: ``check_arg("k", k, is_integer(k) and k >= 1, "an integer >= 1")``.
    """
    if not ok:
        raise ValueError(f"{name}={value!r} is not allowed; {name} must be {allowed}")
