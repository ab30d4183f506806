"""How a wire spec's problems read: pydantic's validation errors, and the checks' own findings, turned into one
:class:`~cloudmodal.exception.InvalidError` that names the field (``spec.autoscaler.min_containers``), says what
is wrong, and what is expected (from the field's description in :mod:`cloudmodal.server.wire_spec_schema`)."""

from __future__ import annotations

import difflib
import re
from typing import Any, get_args

from pydantic import BaseModel, ValidationError

from cloudmodal.exception import InvalidError

SHORT = 40  # at most this many characters of a value go into an error message


def short(v: object) -> str:
    s = repr(v)
    return s if len(s) <= SHORT else s[: SHORT - 3] + "..."


def one_line(msg: str) -> str:
    """The first line of a message from the decorators' own checks, bounded."""
    msg = msg.split("\n", 1)[0]
    return msg if len(msg) <= 200 else msg[:197] + "..."


def kind_of(v: object) -> str:
    """How an error names the type of a value it got."""
    kinds = {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        bytes: "bytes",
        list: "a list",
        tuple: "a list",
        dict: "an object",
        type(None): "null",
    }
    return kinds.get(type(v), type(v).__name__)


_EXPECTED = {
    "int_type": "an integer",
    "float_type": "a number",
    "bool_type": "true or false",
    "string_type": "a string",
    "list_type": "a list",
    "tuple_type": "a list",
    "dict_type": "an object",
    "model_type": "an object",
    "model_attributes_type": "an object",
}


def field_path(prefix: str, loc: tuple[Any, ...]) -> str:
    """``spec.web_methods[0][1].port`` from pydantic's location of an error (odd keys shortened, quoted)."""
    out = prefix
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            s = str(part)
            out += "." + (s if len(s) <= SHORT and re.fullmatch(r"[A-Za-z0-9_]+", s) else short(s))
    return out


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _describe(model: type[BaseModel] | None, loc: tuple[Any, ...]) -> tuple[str | None, list[str]]:
    """The description of the field at ``loc`` (the nearest described one), and the keys its model knows."""
    desc: str | None = None
    keys: list[str] = list(model.model_fields) if model else []
    for part in loc:
        if isinstance(part, int):
            continue
        if model is None or part not in model.model_fields:
            break
        info = model.model_fields[part]
        desc = info.description or desc
        model = _model_in(info.annotation)
        keys = list(model.model_fields) if model else []
    return desc, keys


def _problem(err: Any, keys: list[str]) -> str:
    t = err["type"]
    ctx = err.get("ctx") or {}
    v = err.get("input")
    if t == "missing":
        return "is required but missing"
    if t == "extra_forbidden":
        key = str(err["loc"][-1]) if err["loc"] else ""
        close = difflib.get_close_matches(key, keys, n=1)
        return "is not a known key" + (f" (did you mean {close[0]!r}?)" if close else "")
    if t in _EXPECTED:
        return f"must be {_EXPECTED[t]}, not {kind_of(v)}"
    if t in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        return f"is out of range ({short(v)})"
    if t == "finite_number":
        return "must be a finite number"
    if t == "string_too_long":
        return f"is longer than {ctx.get('max_length')} characters"
    if t == "string_too_short":
        return "is empty"
    if t == "too_long":
        return f"has more than {ctx.get('max_length')} items"
    if t == "too_short":
        return f"has fewer than {ctx.get('min_length')} items"
    if t == "string_pattern_mismatch":
        return f"is {short(v)}, which has characters or a form that is not allowed"
    if t == "literal_error":
        return f"is {short(v)}, not one of {ctx.get('expected')}"
    if t == "value_error":
        return f"is not valid: {ctx.get('error') or err['msg']}"
    return str(err["msg"])


def invalid(path: str, problem: str, expected: str | None = None, more: int = 0) -> InvalidError:
    """The error for a problem at ``path``; ``more``: how many other problems were found."""
    msg = f"Invalid function spec: {path} {problem.rstrip('.')}."
    if expected:
        msg += f" Expected {expected}."
    if more:
        msg += f" ({more} more problem{'s' if more > 1 else ''} after this one.)"
    return InvalidError(msg)


def validate_model(model: type[BaseModel], data: Any, prefix: str) -> Any:
    """``model.model_validate(data)``, its first error raised as :func:`invalid` words it."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        errors = e.errors(include_url=False)
        err = errors[0]
        loc = tuple(err["loc"])
        desc, keys = _describe(model, loc[:-1] if err["type"] == "extra_forbidden" else loc)
        if err["type"] == "extra_forbidden":
            desc = None  # the parent's description, not the unknown key's
        raise invalid(field_path(prefix, loc), _problem(err, keys), desc, len(errors) - 1) from None
