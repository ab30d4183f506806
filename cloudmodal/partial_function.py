"""The decorators that go *under* ``@app.function`` or on the methods of ``@app.cls`` classes.

``@cloudmodal.method``, ``@cloudmodal.enter``, ``@cloudmodal.exit``, ``@cloudmodal.concurrent`` and
``@cloudmodal.batched`` are here; the web decorators are in :mod:`cloudmodal._web_decorators`, the markers
they all return in :mod:`cloudmodal._partial`, and class parameters and lifecycle hooks in
:mod:`cloudmodal._user_class`. This module re-exports those names, as the runtime and user code import them
from here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from cloudmodal._partial import (
    _Flags,
    _no_positional,
    _Params,
    _PartialFunction,
    _wrap,
    find_partial_methods,
    is_nullary,
)
from cloudmodal._user_class import (
    LIFECYCLE_KINDS,
    NO_DEFAULT,
    PARAMETER_TYPES,
    bind_parameters,
    find_lifecycle_hooks,
    get_parameters,
    instantiate,
    parameter,
    run_lifecycle_hooks,
)
from cloudmodal._web_decorators import (
    _LABEL_RE,
    DOMAIN_RE,
    HTTP_METHODS,
    MAX_CUSTOM_DOMAINS,
    asgi_app,
    fastapi_endpoint,
    web_endpoint,
    web_server,
    wsgi_app,
)
from cloudmodal.exception import InvalidError

__all__ = [
    "DOMAIN_RE",
    "HTTP_METHODS",
    "LIFECYCLE_KINDS",
    "MAX_BATCH_SIZE",
    "MAX_BATCH_WAIT_MS",
    "MAX_CUSTOM_DOMAINS",
    "NO_DEFAULT",
    "PARAMETER_TYPES",
    "_LABEL_RE",
    "_Flags",
    "_PartialFunction",
    "asgi_app",
    "batched",
    "bind_parameters",
    "concurrent",
    "enter",
    "exit",
    "fastapi_endpoint",
    "find_lifecycle_hooks",
    "find_partial_methods",
    "get_parameters",
    "instantiate",
    "is_nullary",
    "method",
    "parameter",
    "run_lifecycle_hooks",
    "web_endpoint",
    "web_server",
    "wsgi_app",
]

MAX_BATCH_SIZE = 1000
MAX_BATCH_WAIT_MS = 10 * 60 * 1000  # 10 minutes


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
