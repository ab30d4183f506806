"""Handles for functions, classes and calls. (Runtime methods are filled in by the runtime work.)"""

from __future__ import annotations

from typing import Any

from cloudmodal.spec import FunctionSpec


class Function:
    """A handle to a decorated function: call it with ``.remote``, ``.map``, ``.spawn``…"""

    def __init__(self, *, spec: FunctionSpec, app: Any = None, raw_f: Any = None) -> None:
        self.spec = spec
        self.app = app
        self.raw_f = raw_f

    @classmethod
    def _from_local(cls, app: Any, spec: FunctionSpec, raw_f: Any) -> Function:
        return cls(spec=spec, app=app, raw_f=raw_f)

    def local(self, *args: Any, **kwargs: Any) -> Any:
        return self.raw_f(*args, **kwargs)

    def get_raw_f(self) -> Any:
        return self.raw_f


class Cls:
    """A handle to a class decorated with ``@app.cls``."""

    def __init__(self, *, spec: FunctionSpec, app: Any = None, user_cls: Any = None) -> None:
        self.spec = spec
        self.app = app
        self.user_cls = user_cls

    @classmethod
    def _from_local(cls, app: Any, spec: FunctionSpec, user_cls: Any) -> Cls:
        return cls(spec=spec, app=app, user_cls=user_cls)


class FunctionCall:
    """A handle to one spawned call (``fc-…``)."""
