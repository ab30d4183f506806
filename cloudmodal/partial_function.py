"""Decorators that go *under* ``@app.function`` / inside ``@app.cls`` classes, and the class helpers the
runtime uses (lifecycle hooks, parameters, instantiation without ``__init__``).

``@cloudmodal.concurrent``, ``@cloudmodal.batched``, the web decorators, ``@cloudmodal.method``,
``@cloudmodal.enter`` and ``@cloudmodal.exit`` return a :class:`_PartialFunction`: the raw function plus
flags and parameters. ``@app.function`` / ``@app.cls`` unwrap it (see :mod:`cloudmodal.app`).
"""

from __future__ import annotations

import difflib
import enum
import inspect
import re
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

from cloudmodal.exception import DeprecationError, InvalidError
from cloudmodal.spec import WebConfig

if TYPE_CHECKING:
    import asyncio

MAX_BATCH_SIZE = 1000
MAX_BATCH_WAIT_MS = 10 * 60 * 1000  # 10 minutes
HTTP_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS")
_LABEL_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


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
        from cloudmodal.functions import Cls, Function

        if self.user_cls is not None and self.flags & (_Flags.interface() | _Flags.lifecycle()):
            raise InvalidError(
                f"Cannot apply `@cloudmodal.{decorator}` to a class ({self.user_cls.__name__}). "
                "Apply it to a method instead."
            )
        if isinstance(self.raw_f, Function):
            raise InvalidError(
                f"Cannot stack `@cloudmodal.{decorator}` on top of `@app.function`. Swap the order:\n\n"
                f"@app.function()\n@cloudmodal.{decorator}(...)\ndef f(): ..."
            )
        if isinstance(self.raw_f, Cls):
            raise InvalidError(
                f"Cannot stack `@cloudmodal.{decorator}` on top of `@app.cls`. Swap the order:\n\n"
                f"@app.cls()\n@cloudmodal.{decorator}(...)\nclass C: ..."
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


# ------------------------------------------------------------------------------------------ decorators


def method(
    _warn_parentheses_missing: Any = None, *, is_generator: bool | None = None
) -> Callable[[Any], _PartialFunction]:
    """Expose a method of an ``@app.cls`` class as a remotely callable function.

    ```python
    @app.cls(gpu="H100")
    class Model:
        @cloudmodal.method()
        def predict(self, x): ...
    ```
    """
    _no_positional("method", _warn_parentheses_missing)
    if is_generator is not None and not isinstance(is_generator, bool):
        raise InvalidError(
            f"@cloudmodal.method(is_generator=...) must be True, False or None, not {is_generator!r}."
        )

    def wrapper(obj: Any) -> _PartialFunction:
        pf = _wrap(obj, _Flags.CALLABLE_INTERFACE | _Flags.METHOD, _Params(is_generator=is_generator))
        pf._validate_obj("method")
        return pf

    return wrapper


def enter(_warn_parentheses_missing: Any = None, *, snap: bool = False) -> Callable[[Any], _PartialFunction]:
    """Run a method once when a container starts, before it takes inputs (load models here).

    ``snap=True`` runs it before the memory snapshot is taken (needs ``enable_memory_snapshot=True``).
    """
    _no_positional("enter", _warn_parentheses_missing)
    flags = _Flags.ENTER_PRE_SNAPSHOT if snap else _Flags.ENTER_POST_SNAPSHOT

    def wrapper(obj: Any) -> _PartialFunction:
        pf = _wrap(obj, flags, _Params())
        pf._validate_obj("enter")
        return pf

    return wrapper


def exit(_warn_parentheses_missing: Any = None) -> Callable[[Any], _PartialFunction]:  # noqa: A001 - Modal's name
    """Run a method when a container shuts down (also on preemption, within the grace period)."""
    _no_positional("exit", _warn_parentheses_missing)

    def wrapper(obj: Any) -> _PartialFunction:
        pf = _wrap(obj, _Flags.EXIT, _Params())
        pf._validate_obj("exit")
        return pf

    return wrapper


def _check_int(value: object, what: str, low: int, high: int | None, example: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidError(
            f"{what} must be an integer, not {type(value).__name__} ({value!r}). E.g. {example}."
        )
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high} (inclusive)" if high is not None else f"at least {low}"
        raise InvalidError(f"{what} must be {bound}, got {value}. E.g. {example}.")
    return value


def concurrent(
    _warn_parentheses_missing: Any = None, *, max_inputs: int | None = None, target_inputs: int | None = None
) -> Callable[[Any], _PartialFunction]:
    """Let one container run up to ``max_inputs`` inputs at once (threads for sync code, asyncio tasks for
    async). ``target_inputs`` is what the autoscaler aims for; containers burst up to ``max_inputs``.

    Put it under ``@app.function()``, or on the class under ``@app.cls()``::

        @app.function()
        @cloudmodal.concurrent(max_inputs=100)
        async def fetch(url): ...
    """
    _no_positional("concurrent", _warn_parentheses_missing, "max_inputs=10")
    if max_inputs is None:
        raise TypeError(
            "cloudmodal.concurrent() needs max_inputs, e.g. @cloudmodal.concurrent(max_inputs=10)."
        )
    _check_int(max_inputs, "@cloudmodal.concurrent(max_inputs=...)", 1, None, "max_inputs=10")
    if target_inputs is not None:
        _check_int(target_inputs, "@cloudmodal.concurrent(target_inputs=...)", 1, None, "target_inputs=8")
        if target_inputs > max_inputs:
            raise InvalidError(
                f"`target_inputs` ({target_inputs}) cannot be greater than `max_inputs` ({max_inputs}). "
                "Lower target_inputs, or raise max_inputs."
            )

    def wrapper(obj: Any) -> _PartialFunction:
        pf = _wrap(obj, _Flags.CONCURRENT, _Params(max_inputs=max_inputs, target_inputs=target_inputs))
        pf._validate_obj("concurrent")
        return pf

    return wrapper


def batched(
    _warn_parentheses_missing: Any = None, *, max_batch_size: int, wait_ms: int
) -> Callable[[Any], _PartialFunction]:
    """Dynamic batching: the function takes lists and returns a list of the same length; callers still call
    it with single items. A batch runs when ``max_batch_size`` inputs are waiting or after ``wait_ms``.
    """
    _no_positional("batched", _warn_parentheses_missing, "max_batch_size=8, wait_ms=100")
    _check_int(
        max_batch_size, "@cloudmodal.batched(max_batch_size=...)", 1, MAX_BATCH_SIZE, "max_batch_size=8"
    )
    _check_int(wait_ms, "@cloudmodal.batched(wait_ms=...)", 0, MAX_BATCH_WAIT_MS, "wait_ms=100")

    def wrapper(obj: Any) -> _PartialFunction:
        pf = _wrap(
            obj,
            _Flags.CALLABLE_INTERFACE | _Flags.BATCHED,
            _Params(max_batch_size=max_batch_size, wait_ms=wait_ms),
        )
        pf._validate_obj("batched")
        return pf

    return wrapper


def _check_web_common(
    decorator: str, label: object, custom_domains: object, requires_proxy_auth: object
) -> None:
    if label is not None and (not isinstance(label, str) or not _LABEL_RE.match(label)):
        raise InvalidError(
            f"@cloudmodal.{decorator}(label={label!r}): a label is 1-63 lowercase letters, digits and '-', not "
            "starting or ending with '-', e.g. label='my-api'."
        )
    if custom_domains is not None and (
        isinstance(custom_domains, str) or not all(isinstance(d, str) for d in custom_domains)  # type: ignore[attr-defined]
    ):
        raise InvalidError(
            f"@cloudmodal.{decorator}(custom_domains=...) must be a list of domain names, e.g. ['api.example.com']."
        )
    if not isinstance(requires_proxy_auth, bool):
        raise InvalidError(f"@cloudmodal.{decorator}(requires_proxy_auth=...) must be True or False.")


def fastapi_endpoint(
    _warn_parentheses_missing: Any = None,
    *,
    method: str = "GET",
    label: str | None = None,
    custom_domains: Iterable[str] | None = None,
    docs: bool = False,
    requires_proxy_auth: bool = False,
) -> Callable[[Any], _PartialFunction]:
    """Serve the function as a single FastAPI route (CORS on); its parameters are query/body fields."""
    if isinstance(_warn_parentheses_missing, str):
        raise InvalidError(
            f"Positional arguments are not allowed. Suggestion: "
            f'`@cloudmodal.fastapi_endpoint(method="{_warn_parentheses_missing}")`.'
        )
    _no_positional("fastapi_endpoint", _warn_parentheses_missing)
    if not isinstance(method, str) or method.upper() not in HTTP_METHODS:
        raise InvalidError(
            f"@cloudmodal.fastapi_endpoint(method={method!r}) is not an HTTP method. Use one of: {', '.join(HTTP_METHODS)}."
        )
    _check_web_common("fastapi_endpoint", label, custom_domains, requires_proxy_auth)
    web = WebConfig(
        kind="fastapi_endpoint",
        method=method.upper(),
        label=label,
        docs=bool(docs),
        requires_proxy_auth=requires_proxy_auth,
    )

    def wrapper(obj: Any) -> _PartialFunction:
        pf = _wrap(obj, _Flags.WEB_INTERFACE, _Params(web=web))
        pf._validate_obj("fastapi_endpoint")
        return pf

    return wrapper


def _app_decorator(kind: str) -> Callable[..., Callable[[Any], _PartialFunction]]:
    def decorator(
        _warn_parentheses_missing: Any = None,
        *,
        label: str | None = None,
        custom_domains: Iterable[str] | None = None,
        requires_proxy_auth: bool = False,
    ) -> Callable[[Any], _PartialFunction]:
        if isinstance(_warn_parentheses_missing, str):
            raise InvalidError(
                f'Positional arguments are not allowed. Suggestion: `@cloudmodal.{kind}(label="{_warn_parentheses_missing}")`.'
            )
        _no_positional(kind, _warn_parentheses_missing)
        _check_web_common(kind, label, custom_domains, requires_proxy_auth)
        web = WebConfig(kind=kind, label=label, requires_proxy_auth=requires_proxy_auth)  # type: ignore[arg-type]

        def wrapper(obj: Any) -> _PartialFunction:
            pf = _wrap(obj, _Flags.WEB_INTERFACE, _Params(web=web))
            pf._validate_obj(kind, require_sync=True, require_nullary=True)
            return pf

        return wrapper

    decorator.__name__ = decorator.__qualname__ = kind
    return decorator


asgi_app = _app_decorator("asgi_app")
asgi_app.__doc__ = (
    """Serve an ASGI app (FastAPI, Starlette…): decorate a no-argument function that returns it."""
)
wsgi_app = _app_decorator("wsgi_app")
wsgi_app.__doc__ = """Serve a WSGI app (Flask, Django…): decorate a no-argument function that returns it."""


def web_server(
    port: int,
    *,
    startup_timeout: float = 5.0,
    label: str | None = None,
    custom_domains: Iterable[str] | None = None,
    requires_proxy_auth: bool = False,
) -> Callable[[Any], _PartialFunction]:
    """Proxy HTTP to a server that the decorated (no-argument) function starts on ``port``."""
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise InvalidError(
            f"First argument of `@web_server` must be a local port (1-65535), such as `@web_server(8000)`; got {port!r}."
        )
    if (
        isinstance(startup_timeout, bool)
        or not isinstance(startup_timeout, int | float)
        or startup_timeout <= 0
    ):
        raise InvalidError(
            f"The `startup_timeout` argument of `@web_server` must be a positive number of seconds, got {startup_timeout!r}."
        )
    _check_web_common("web_server", label, custom_domains, requires_proxy_auth)
    web = WebConfig(
        kind="web_server",
        port=port,
        label=label,
        startup_timeout=float(startup_timeout),
        requires_proxy_auth=requires_proxy_auth,
    )

    def wrapper(obj: Any) -> _PartialFunction:
        pf = _wrap(obj, _Flags.WEB_INTERFACE, _Params(web=web))
        pf._validate_obj("web_server", require_sync=True, require_nullary=True)
        return pf

    return wrapper


def web_endpoint(*args: Any, **kwargs: Any) -> Any:
    """Removed: renamed to :func:`fastapi_endpoint` (as in Modal)."""
    raise DeprecationError(
        "`@cloudmodal.web_endpoint` has been renamed to `@cloudmodal.fastapi_endpoint` (as in Modal 1.0). "
        "Replace `@cloudmodal.web_endpoint(...)` with `@cloudmodal.fastapi_endpoint(...)`; the arguments are the same."
    )


# ------------------------------------------------------------------------------------------ parameters

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


# ------------------------------------------------------------------------------------------ discovery


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
