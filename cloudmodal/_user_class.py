"""A user's ``@app.cls`` class as the runtime uses it: its parameters, instances and lifecycle hooks.

Parameters are declared on the class with :func:`parameter` (``size: int = cloudmodal.parameter(default=0)``);
:func:`instantiate` creates an instance with them set and without calling ``__init__``;
:func:`run_lifecycle_hooks` calls its ``@enter`` / ``@exit`` methods.
"""

from __future__ import annotations

import difflib
import inspect
import sys
from typing import TYPE_CHECKING, Any

from cloudmodal._partial import _Flags, find_partial_methods
from cloudmodal.exception import InvalidError

if TYPE_CHECKING:
    import asyncio

PARAMETER_TYPES: dict[str, type] = {"int": int, "str": str, "bytes": bytes, "bool": bool}


class _NoDefault:
    _instance: _NoDefault | None = None

    def __new__(cls) -> _NoDefault:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "NO_DEFAULT"

    def __reduce__(self) -> str:
        return "NO_DEFAULT"


NO_DEFAULT: Any = _NoDefault()
"""Marks a required class parameter (in :func:`get_parameters`). In a spec, required parameters carry ``None``."""


class _Parameter:
    """What ``cloudmodal.parameter()`` puts on the class; replaced per instance by the value."""

    __slots__ = ("default", "init")

    def __init__(self, default: Any, init: bool) -> None:
        self.default = default
        self.init = init

    def __repr__(self) -> str:
        return f"cloudmodal.parameter(default={self.default!r}, init={self.init})"


def parameter(*, default: Any = NO_DEFAULT, init: bool = True) -> Any:
    """Declare a class parameter: ``name: int = cloudmodal.parameter(default=0)``.

    Types: int, str, bytes, bool. Instances are created with ``Model(name=value)`` and each distinct set of
    values gets its own containers. ``init=False`` declares a typed attribute that is not a parameter
    (set it in ``@enter``).
    """
    if not isinstance(init, bool):
        raise InvalidError(f"cloudmodal.parameter(init=...) must be True or False, not {init!r}.")
    if default is None and init:
        raise InvalidError(
            "cloudmodal.parameter(default=None) is not supported: parameters are int, str, bytes or bool. "
            "Give a default of that type (e.g. default=''), or no default to make the parameter required."
        )
    return _Parameter(default, init)


def _type_ok(value: Any, t: type) -> bool:
    if t is bool:
        return isinstance(value, bool)
    if t is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, t)


def _resolve_annotation(user_cls: type, owner: type, name: str) -> type:
    ann = inspect.get_annotations(owner).get(name, inspect.Parameter.empty)
    if ann is inspect.Parameter.empty:
        raise InvalidError(
            f"Class parameter `{name}` of {user_cls.__name__} has no type annotation. "
            f"Write `{name}: int = cloudmodal.parameter(...)` (int, str, bytes or bool)."
        )
    if isinstance(ann, str):
        text = ann.strip()
        if text in PARAMETER_TYPES:
            return PARAMETER_TYPES[text]
        module = sys.modules.get(owner.__module__)
        try:
            ann = eval(text, dict(vars(module)) if module else {}, dict(vars(owner)))  # noqa: S307 - annotations
        except Exception:
            raise InvalidError(
                f"Class parameter `{name}` of {user_cls.__name__} has annotation {text!r}, which is not a supported "
                "cloudmodal.parameter() type. Use one of: int, str, bytes, bool."
            ) from None
    if ann not in PARAMETER_TYPES.values():
        tname = getattr(ann, "__name__", None) or repr(ann)
        raise InvalidError(
            f"{tname} is not a supported cloudmodal.parameter() type. Use one of: int, str, bytes, bool "
            f"(parameter `{name}` of {user_cls.__name__})."
        )
    return ann


def _declared_parameters(user_cls: type) -> list[tuple[str, type | None, _Parameter]]:
    found: dict[str, tuple[str, type | None, _Parameter]] = {}
    for owner in reversed(user_cls.__mro__):
        if owner is object:
            continue
        for name, value in vars(owner).items():
            if isinstance(value, _Parameter):
                t = _resolve_annotation(user_cls, owner, name) if value.init else None
                found[name] = (name, t, value)
    return list(found.values())


def get_parameters(user_cls: type) -> list[tuple[str, type, Any]]:
    """The class parameters of ``user_cls`` in declaration order (base classes first):
    ``[(name, type, default)]``, with :data:`NO_DEFAULT` for required ones. Validates types and defaults."""
    out: list[tuple[str, type, Any]] = []
    for name, t, p in _declared_parameters(user_cls):
        if not p.init:
            continue
        assert t is not None
        if p.default is not NO_DEFAULT and not _type_ok(p.default, t):
            raise InvalidError(
                f"The default of parameter `{name}` of {user_cls.__name__} is {p.default!r} "
                f"({type(p.default).__name__}), but the parameter is declared as {t.__name__}. Make them match."
            )
        out.append((name, t, p.default))
    return out


def bind_parameters(
    user_cls: type, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Map constructor arguments (``Model(1, name="x")``) to parameter values, with defaults filled in and
    types checked; raises ``InvalidError`` naming what is missing, unknown or mistyped."""
    kwargs = dict(kwargs or {})
    params = get_parameters(user_cls)
    names = [n for n, _, _ in params]
    cls_name = user_cls.__name__
    if len(args) > len(names):
        raise InvalidError(
            f"{cls_name}() takes {len(names)} parameter(s) ({', '.join(names) or 'none'}) but {len(args)} "
            "positional arguments were given. Pass parameters by name, e.g. "
            f"{cls_name}({names[0] if names else 'x'}=...)."
        )
    for name, value in zip(names, args, strict=False):
        if name in kwargs:
            raise InvalidError(f"{cls_name}() got parameter `{name}` twice (by position and by name).")
        kwargs[name] = value
    unknown = [k for k in kwargs if k not in names]
    if unknown:
        k = unknown[0]
        close = difflib.get_close_matches(k, names, n=3)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        valid = ", ".join(names) if names else "none (declare them with `name: int = cloudmodal.parameter()`)"
        raise InvalidError(f"{cls_name}() got an unknown parameter `{k}`.{hint} Its parameters: {valid}.")
    values: dict[str, Any] = {}
    for name, t, default in params:
        if name in kwargs:
            value = kwargs[name]
            if not _type_ok(value, t):
                raise InvalidError(
                    f"{cls_name}() parameter `{name}` must be {t.__name__}, got {type(value).__name__} ({value!r})."
                )
            values[name] = value
        elif default is NO_DEFAULT:
            raise InvalidError(
                f"{cls_name}() is missing the required parameter `{name}` ({t.__name__}). "
                f"Pass it when instantiating: {cls_name}({name}=...)."
            )
        else:
            values[name] = default
    return values


def instantiate(user_cls: type[object], /, *args: Any, **params: Any) -> Any:
    """Create an instance of an ``@app.cls`` user class with its parameters set, without calling
    ``__init__`` (which such classes may not define). ``init=False`` attributes get their defaults."""
    values = bind_parameters(user_cls, args, params)
    obj = user_cls.__new__(user_cls)
    for name, _t, p in _declared_parameters(user_cls):
        if not p.init and p.default is not NO_DEFAULT:
            setattr(obj, name, p.default)
    for name, value in values.items():
        setattr(obj, name, value)
    return obj


LIFECYCLE_KINDS = ("enter", "enter_pre_snapshot", "enter_post_snapshot", "exit")


def find_lifecycle_hooks(user_cls: type, kind: str) -> list[str]:
    """Names of the lifecycle methods of ``user_cls``, in the order to call them.

    kinds: ``"enter_pre_snapshot"`` (``@enter(snap=True)``), ``"enter_post_snapshot"`` (``@enter()``),
    ``"enter"`` (both: pre-snapshot hooks first — what a runtime without snapshots runs at start),
    ``"exit"`` (``@exit()``). Call them with ``getattr(instance, name)()``.
    """
    if kind == "enter":
        return find_lifecycle_hooks(user_cls, "enter_pre_snapshot") + find_lifecycle_hooks(
            user_cls, "enter_post_snapshot"
        )
    flag = {
        "enter_pre_snapshot": _Flags.ENTER_PRE_SNAPSHOT,
        "enter_post_snapshot": _Flags.ENTER_POST_SNAPSHOT,
        "exit": _Flags.EXIT,
    }.get(kind)
    if flag is None:
        raise ValueError(f"unknown lifecycle kind {kind!r}; use one of {LIFECYCLE_KINDS}")
    return list(find_partial_methods(user_cls, flag))


def run_lifecycle_hooks(instance: Any, kind: str, *, loop: asyncio.AbstractEventLoop | None = None) -> None:
    """Call the lifecycle hooks of ``kind`` (see :func:`find_lifecycle_hooks`) on ``instance``, in order.

    Async hooks are awaited: on ``loop`` if given (a loop running in another thread, e.g. the worker's), else
    in a fresh event loop. ``enter`` hooks stop at the first exception (it propagates); ``exit`` hooks all
    run, and the first exception is raised after the last one.
    """
    import asyncio

    first_error: BaseException | None = None
    for name in find_lifecycle_hooks(type(instance), kind):
        try:
            result = getattr(instance, name)()
            if inspect.isawaitable(result):
                if loop is not None:
                    asyncio.run_coroutine_threadsafe(_await(result), loop).result()
                else:
                    asyncio.run(_await(result))
        except Exception as e:
            if kind != "exit":
                raise
            first_error = first_error or e
    if first_error is not None:
        raise first_error


async def _await(awaitable: Any) -> Any:
    return await awaitable
