"""What a test's result is made of, how it travels as JSON, and how two results are compared.

A test returns plain data: ``None``, booleans, numbers, strings, tensors, and lists, tuples or
string-keyed dicts of those. ``encode`` turns that into JSON-ready data (never pickle), ``decode`` turns it back,
and ``compare_values`` says in one sentence how a result differs from the expected one. The learner's ``check()`` and
the instructor's grader use the same three functions, so a test passes in the notebook exactly when it passes
in grading.
"""

from __future__ import annotations

import math
from typing import Any

import torch

MAX_ELEMENTS = 100_000    # numbers and items in one result (a report line holds at most 300,000 items)
MAX_STRING = 10_000       # characters in one string
MAX_DEPTH = 20            # nesting of lists and dicts
_DTYPES = {str(t).removeprefix("torch."): t for t in (
    torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
    torch.float16, torch.bfloat16, torch.float32, torch.float64)}


class ValueTypeError(TypeError):
    """A result holds something a test cannot return (a model, a generator, a string too long...)."""


def _number(x: float) -> float | str:
    """JSON has no inf or nan; they travel as strings."""
    return x if math.isfinite(x) else repr(x)


def encode(value: Any, _depth: int = 0, _budget: list[int] | None = None) -> Any:
    """``value`` as JSON-ready data; ValueTypeError for anything a test cannot return."""
    budget = [MAX_ELEMENTS] if _budget is None else _budget
    if _depth > MAX_DEPTH:
        raise ValueTypeError(f"the result is nested more than {MAX_DEPTH} levels deep")
    if value is None or isinstance(value, (bool, int)) and abs(value) < 2 ** 63:
        return value
    if isinstance(value, float):
        return {"float": _number(value)}
    if isinstance(value, str):
        if len(value) > MAX_STRING:
            raise ValueTypeError(f"the result holds a string of {len(value)} characters (at most {MAX_STRING})")
        return {"str": value}
    if isinstance(value, torch.Tensor):
        if str(value.dtype).removeprefix("torch.") not in _DTYPES:
            raise ValueTypeError(f"the result holds a tensor of dtype {value.dtype}, which the tests do not compare")
        budget[0] -= value.numel()
        if budget[0] < 0:
            raise ValueTypeError(f"the result holds more than {MAX_ELEMENTS} numbers")
        flat = value.detach().cpu().reshape(-1)
        items = flat.tolist() if not flat.is_floating_point() else [_number(x) for x in flat.double().tolist()]
        return {"tensor": str(value.dtype).removeprefix("torch."), "shape": list(value.shape), "values": items}
    if isinstance(value, (list, tuple, torch.Size)):
        budget[0] -= len(value)
        if budget[0] < 0:
            raise ValueTypeError(f"the result holds more than {MAX_ELEMENTS} items")
        return {"list": [encode(v, _depth + 1, budget) for v in value]}
    if isinstance(value, dict) and all(isinstance(k, str) and len(k) <= MAX_STRING for k in value):
        budget[0] -= len(value)
        if budget[0] < 0:
            raise ValueTypeError(f"the result holds more than {MAX_ELEMENTS} items")
        return {"dict": {k: encode(v, _depth + 1, budget) for k, v in value.items()}}
    raise ValueTypeError(f"the result holds an object of type {type(value).__name__}; a test can return None, bool, "
                         "int, float, str, a tensor, or a list/tuple/dict of those")


def _float(x: Any) -> float:
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return float(x)
    if x in ("inf", "-inf", "nan"):
        return float(x)
    raise ValueError(f"not a number: {str(x)[:40]!r}")


def decode(data: Any, _depth: int = 0) -> Any:
    """The value that ``encode`` made ``data`` from; ValueError for anything ``encode`` cannot have made."""
    if _depth > MAX_DEPTH + 1:
        raise ValueError("nested too deeply")
    if data is None or isinstance(data, (bool, int)):
        return data
    if not isinstance(data, dict) or len(data) not in (1, 3):
        raise ValueError("not an encoded value")
    if "float" in data:
        return _float(data["float"])
    if "str" in data and isinstance(data["str"], str):
        return data["str"][:MAX_STRING]
    if "list" in data and isinstance(data["list"], list):
        return [decode(v, _depth + 1) for v in data["list"]]
    if "dict" in data and isinstance(data["dict"], dict):
        return {str(k): decode(v, _depth + 1) for k, v in data["dict"].items()}
    if set(data) == {"tensor", "shape", "values"} and data["tensor"] in _DTYPES:
        dtype, shape, values = _DTYPES[data["tensor"]], data["shape"], data["values"]
        if not (isinstance(shape, list) and all(isinstance(n, int) and n >= 0 for n in shape)
                and isinstance(values, list) and math.prod(shape) == len(values) <= MAX_ELEMENTS):
            raise ValueError("a tensor whose shape and values disagree")
        if dtype.is_floating_point:
            values = [_float(x) for x in values]
        elif not all(isinstance(x, (bool, int)) for x in values):
            raise ValueError("an integer tensor with values that are not integers")
        return torch.tensor(values, dtype=dtype).reshape(shape)
    raise ValueError("not an encoded value")


def _show(x: Any) -> str:
    text = f"{x:.4g}" if isinstance(x, float) else repr(x)
    return text if len(text) <= 80 else text[:77] + "..."


def _kind(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"a tensor of shape {tuple(x.shape)}"
    return {bool: "a bool", int: "an int", float: "a float", str: "a string", list: "a list", dict: "a dict",
            type(None): "None"}.get(type(x), type(x).__name__)


WRONG_TYPE, WRONG_SHAPE, WRONG_VALUES = "wrong type", "wrong shape", "wrong values"
MAX_MESSAGE = 300  # characters of one difference's sentence


def _tensors(actual: torch.Tensor, expected: torch.Tensor, where: str, atol: float | None, rtol: float | None,
             show: bool) -> tuple[str, str]:
    if actual.shape != expected.shape:
        return WRONG_SHAPE, f"{where}has shape {tuple(actual.shape)}, expected {tuple(expected.shape)}"
    if actual.dtype != expected.dtype:
        return WRONG_TYPE, f"{where}has dtype {actual.dtype}, expected {expected.dtype}"
    if expected.is_floating_point():
        default_rtol, default_atol = {torch.float16: (1e-3, 1e-5), torch.bfloat16: (1.6e-2, 1e-5),
                                      torch.float64: (1e-7, 1e-7)}.get(expected.dtype, (1.3e-6, 1e-5))
        a, e = actual.double(), expected.double()
        close = torch.isclose(a, e, rtol=default_rtol if rtol is None else rtol,
                              atol=default_atol if atol is None else atol, equal_nan=True)
    else:
        close = actual == expected
    wrong = (~close).nonzero()
    if len(wrong) == 0:
        return "", ""
    index = tuple(wrong[0].tolist())
    text = f"{where}differs in {len(wrong)} of {expected.numel()} values"
    if show:
        text += (f"; first at [{', '.join(map(str, index))}]: expected {_show(expected[index].item())}, "
                 f"got {_show(actual[index].item())}")
    return WRONG_VALUES, text


def difference(actual: Any, expected: Any, atol: float | None = None, rtol: float | None = None,
               show: bool = True, _where: str = "") -> tuple[str, str]:
    """("", "") when ``actual`` matches ``expected``, else (kind, sentence): the kind is one of WRONG_TYPE,
    WRONG_SHAPE and WRONG_VALUES, the sentence (at most MAX_MESSAGE characters) says where and how it differs.

    Tensors must agree in shape and dtype; floats (also inside tensors) within ``atol + rtol * |expected|``
    (torch.testing's defaults for the dtype when None), with inf and nan in the same places; everything else
    exactly, ints and floats never mixed. ``show=False`` leaves the values and keys out.
    """
    where = f"the result{_where} " if _where else "the result "
    if isinstance(expected, torch.Tensor) and isinstance(actual, torch.Tensor):
        kind, text = _tensors(actual, expected, where, atol, rtol, show)
    elif type(actual) is not type(expected):
        kind, text = WRONG_TYPE, f"{where}is {_kind(actual)}, expected {_kind(expected)}"
    elif isinstance(expected, list):
        if len(actual) != len(expected):
            return WRONG_SHAPE, f"{where}has {len(actual)} items, expected {len(expected)}"
        found = (difference(a, e, atol, rtol, show, f"{_where}[{i}]") for i, (a, e) in enumerate(zip(actual, expected)))
        kind, text = next((d for d in found if d[0]), ("", ""))
    elif isinstance(expected, dict):
        if set(actual) != set(expected):
            return WRONG_TYPE, (f"{where}has keys {sorted(actual)}, expected {sorted(expected)}" if show
                                else f"{where}has other keys than expected")[:MAX_MESSAGE]
        found = (difference(actual[k], expected[k], atol, rtol, show, f"{_where}[{k!r}]") for k in expected)
        kind, text = next((d for d in found if d[0]), ("", ""))
    else:
        if isinstance(expected, float):
            same = math.isclose(actual, expected, rel_tol=1.3e-6 if rtol is None else rtol,
                                abs_tol=1e-5 if atol is None else atol) or (math.isnan(actual) and math.isnan(expected))
        else:
            same = actual == expected
        kind, text = ("", "") if same else (
            WRONG_VALUES, f"{where}is wrong" + (f": expected {_show(expected)}, got {_show(actual)}" if show else ""))
    return kind, text[:MAX_MESSAGE]


def compare_values(actual: Any, expected: Any, atol: float | None = None, rtol: float | None = None,
                   show: bool = True) -> str:
    """"" when ``actual`` matches ``expected``, else one sentence saying where and how it differs (see
    ``difference``)."""
    return difference(actual, expected, atol, rtol, show)[1]
