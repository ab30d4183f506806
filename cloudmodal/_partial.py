"""Markers that cloudmodal's decorators put on user code, and how ``@app.function`` / ``@app.cls`` find them.

``@cloudmodal.method``, ``@cloudmodal.enter``, ``@cloudmodal.batched``, the web decorators and the others
return a :class:`_PartialFunction`: the raw function (or, for ``@concurrent``, the class) plus flags and
parameters. The decorators stack by merging flags and parameters; the App unwraps the result.

:class:`Decorated` is the base of the handles ``@app.function`` / ``@app.cls`` return, so that a marker can
refuse to go on top of one without this module knowing the handle classes.
"""

from __future__ import annotations

import enum
import inspect
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

from cloudmodal.exception import InvalidError
from cloudmodal.spec import WebConfig


class Decorated:
    """Base of :class:`~cloudmodal.functions.Function` and :class:`~cloudmodal.functions.Cls`: what
    ``@app.function`` / ``@app.cls`` return. ``_decorator_name`` names the decorator, for error messages."""

    _decorator_name: str = "@app.function"


class _Flags(enum.IntFlag):
    ENTER_PRE_SNAPSHOT = 1
    ENTER_POST_SNAPSHOT = 2
    EXIT = 4
    CALLABLE_INTERFACE = 8  # @method and @batched: callable with .remote()
    WEB_INTERFACE = 16
    BATCHED = 32
    CONCURRENT = 64
    METHOD = 128  # @method itself (meaningless under @app.function)

    @staticmethod
    def lifecycle() -> _Flags:
        return _Flags.ENTER_PRE_SNAPSHOT | _Flags.ENTER_POST_SNAPSHOT | _Flags.EXIT

    @staticmethod
    def interface() -> _Flags:
        return _Flags.CALLABLE_INTERFACE | _Flags.WEB_INTERFACE


@dataclass
class _Params:
    web: WebConfig | None = None
    is_generator: bool | None = None
    max_batch_size: int | None = None
    wait_ms: int | None = None
    max_inputs: int | None = None
    target_inputs: int | None = None

    def update(self, other: _Params) -> None:
        for f in fields(other):
            value = getattr(other, f.name)
            if value is not None:
                if getattr(self, f.name) is not None:
                    raise InvalidError(f"`{f.name}` is set twice by stacked decorators. Keep one of them.")
                setattr(self, f.name, value)


class _PartialFunction:
    """A function (or, for ``@concurrent``, a class) marked by a cloudmodal decorator, waiting for
    ``@app.function`` / ``@app.cls`` to turn it into a handle."""

    raw_f: Callable[..., Any] | None
    user_cls: type | None
    flags: _Flags
    params: _Params

    def __init__(self, obj: Callable[..., Any] | type, flags: _Flags, params: _Params) -> None:
        if isinstance(obj, type):
            self.user_cls, self.raw_f = obj, None
        else:
            self.raw_f, self.user_cls = obj, None
        self.flags = flags
        self.params = params
        self._validate_flag_composition()

    @property
    def obj(self) -> Callable[..., Any] | type:
        return self.raw_f if self.raw_f is not None else self.user_cls  # type: ignore[return-value]

    def _stack(self, flags: _Flags, params: _Params) -> _PartialFunction:
        self.flags |= flags
        self.params.update(params)
        self._validate_flag_composition()
        return self

    def _validate_flag_composition(self) -> None:
        if self.flags & _Flags.interface() and self.flags & _Flags.lifecycle():
            raise InvalidError(
                f"{self._name()}: interface decorators (@method, @batched, web endpoints) cannot be combined with "
                "lifecycle decorators (@enter, @exit). Put them on separate methods."
            )
        if self.flags & _Flags.WEB_INTERFACE and self.flags & _Flags.CALLABLE_INTERFACE:
            raise InvalidError(
                f"{self._name()}: callable decorators (@method, @batched) cannot be combined with web interface "
                "decorators. A web method is already exposed; remove @cloudmodal.method."
            )

    def _name(self) -> str:
        return getattr(self.obj, "__qualname__", repr(self.obj))

    def _validate_obj(
        self, decorator: str, *, require_sync: bool = False, require_nullary: bool = False
    ) -> None:
        if self.user_cls is not None and self.flags & (_Flags.interface() | _Flags.lifecycle()):
            raise InvalidError(
                f"Cannot apply `@cloudmodal.{decorator}` to a class ({self.user_cls.__name__}). "
                "Apply it to a method instead."
            )
        if isinstance(self.raw_f, Decorated):
            outer = self.raw_f._decorator_name
            target = "class C" if outer == "@app.cls" else "def f()"
            raise InvalidError(
                f"Cannot stack `@cloudmodal.{decorator}` on top of `{outer}`. Swap the order:\n\n"
                f"{outer}()\n@cloudmodal.{decorator}(...)\n{target}: ..."
            )
        if self.raw_f is not None:
            if not callable(self.raw_f):
                raise InvalidError(
                    f"The object wrapped by `@cloudmodal.{decorator}` must be callable, not {self.raw_f!r}."
                )
            if require_sync and (
                inspect.iscoroutinefunction(self.raw_f) or inspect.isasyncgenfunction(self.raw_f)
            ):
                raise InvalidError(
                    f"`@cloudmodal.{decorator}` cannot wrap the async function {self._name()}: it must be a plain "
                    "`def` that returns the app (the app itself may be async)."
                )
            if require_nullary and not is_nullary(self.raw_f, skip_self=True):
                raise InvalidError(
                    f"Functions decorated by `@cloudmodal.{decorator}` can't have parameters ({self._name()} has "
                    "some without defaults). The function is a factory called once with no arguments."
                )

    @property
    def is_generator(self) -> bool:
        if self.params.is_generator is not None:
            return self.params.is_generator
        f = self.raw_f
        return bool(f is not None and (inspect.isgeneratorfunction(f) or inspect.isasyncgenfunction(f)))

    @property
    def is_async(self) -> bool:
        f = self.raw_f
        return bool(f is not None and (inspect.iscoroutinefunction(f) or inspect.isasyncgenfunction(f)))

    def __get__(self, obj: Any, objtype: type | None = None) -> Any:
        # On an instance (e.g. one built by `instantiate`), a decorated method is just the bound method.
        if obj is not None and self.raw_f is not None:
            return self.raw_f.__get__(obj, objtype)
        return self

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.raw_f is None:
            raise TypeError(
                f"{self._name()} is a class marked by a cloudmodal decorator; decorate it with @app.cls()."
            )
        return self.raw_f(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<cloudmodal partial function {self._name()} flags={self.flags!r}>"


def _wrap(obj: Any, flags: _Flags, params: _Params) -> _PartialFunction:
    if isinstance(obj, _PartialFunction):
        return obj._stack(flags, params)
    return _PartialFunction(obj, flags, params)


def _no_positional(decorator: str, arg: object, example: str = "") -> None:
    if arg is not None:
        raise InvalidError(
            f"Positional arguments are not allowed. Did you forget parentheses? Suggestion: "
            f"`@cloudmodal.{decorator}({example})`."
        )


def is_nullary(f: Callable[..., Any], *, skip_self: bool = False) -> bool:
    """True if ``f`` can be called with no arguments (besides ``self`` when ``skip_self``)."""
    try:
        params = list(inspect.signature(f).parameters.values())
    except (TypeError, ValueError):
        return True
    if skip_self and params and params[0].name == "self":
        params = params[1:]
    return all(
        p.default is not inspect.Parameter.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        for p in params
    )


def find_partial_methods(user_cls: type, flags: int) -> dict[str, _PartialFunction]:
    """Members of ``user_cls`` (base classes first, subclasses override) marked with any of ``flags``."""
    found: dict[str, _PartialFunction] = {}
    for owner in reversed(user_cls.__mro__):
        if owner is object:
            continue
        for name, value in vars(owner).items():
            if isinstance(value, _PartialFunction):
                if value.flags & flags:
                    found[name] = value
                else:
                    found.pop(name, None)
            elif name in found:
                found.pop(name)  # overridden by a plain attribute
    return found
