"""What an App holds: its functions, classes and local entrypoints by name, and the values of the inline
secrets they use. :class:`~cloudmodal.app.App` fills it from its decorators; the runtime reads it to register
the app's functions with the control plane."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Any

from cloudmodal.exception import InvalidError
from cloudmodal.functions import Cls, Function
from cloudmodal.secret import Secret, inline_secret_registry
from cloudmodal.spec import FunctionSpec


class LocalEntrypoint:
    """A function registered with ``@app.local_entrypoint()``: ``cloudmodal run`` calls it on this machine."""

    def __init__(self, raw_f: Callable[..., Any], app: Any, name: str) -> None:
        self.raw_f = raw_f
        self.app = app  # the cloudmodal.App it belongs to
        self.name = name
        self.__doc__ = raw_f.__doc__

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.raw_f(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<cloudmodal local entrypoint {self.name}>"


class AppRegistry:
    """The named members of one App. Functions and classes share one namespace; a name defined twice keeps
    the later definition (with a warning), as re-running a module cell would."""

    def __init__(self) -> None:
        self.functions: dict[str, Function] = {}
        self.classes: dict[str, Cls] = {}
        self.entrypoints: dict[str, LocalEntrypoint] = {}
        self.inline_secrets: dict[str, dict[str, str]] = {}
        # named secret -> the keys its Secret.from_name(..., required_keys=[...]) in this app require
        self.required_keys: dict[str, set[str]] = {}

    def add(self, tag: str, handle: Function | Cls, app_name: str | None, *, stacklevel: int = 2) -> None:
        """Register a decorated function or class as ``tag``. ``stacklevel``: of the redefinition warning,
        counted from the caller (2: the caller's caller)."""
        is_cls = isinstance(handle, Cls)
        kind = "class" if is_cls else "function"
        other: dict[str, Any] = self.functions if is_cls else self.classes
        if tag in other:
            raise InvalidError(
                f"App {app_name or ''!r} already has a {'function' if is_cls else 'class'} named {tag!r}. "
                "Give this one another name (name=... for functions, or rename it)."
            )
        registry: dict[str, Any] = self.classes if is_cls else self.functions
        if tag in registry and registry[tag] is not handle:
            warnings.warn(
                f"{kind.capitalize()} {tag!r} is defined twice in app {app_name!r}; the later definition wins.",
                stacklevel=stacklevel + 1,
            )
        registry[tag] = handle

    def add_variant(self, handle: Function | Cls) -> None:
        """Register a ``with_options`` variant under its spec's name. The same options give the same name, so
        a repeated ``with_options`` replaces its earlier handle silently."""
        assert handle.spec is not None
        if isinstance(handle, Cls):
            self.classes[handle.spec.name] = handle
        else:
            self.functions[handle.spec.name] = handle

    def add_entrypoint(self, entrypoint: LocalEntrypoint) -> None:
        if entrypoint.name in self.entrypoints:
            raise InvalidError(
                f"Duplicate local entrypoint name: {entrypoint.name}. Local entrypoint names must be unique; "
                "rename the function or pass name=... ."
            )
        self.entrypoints[entrypoint.name] = entrypoint

    def include(self, other: AppRegistry, app_name: str | None, *, stacklevel: int = 2) -> None:
        """Add ``other``'s functions, classes and inline secrets (not its local entrypoints)."""
        for tag, fn in other.functions.items():
            self.add(tag, fn, app_name, stacklevel=stacklevel + 1)
        for tag, c in other.classes.items():
            self.add(tag, c, app_name, stacklevel=stacklevel + 1)
        self.inline_secrets.update(other.inline_secrets)
        for name, keys in other.required_keys.items():
            self.required_keys.setdefault(name, set()).update(keys)

    def remember_inline(self, secrets: Iterable[Secret]) -> None:
        """Keep the values of the inline secrets among ``secrets``, by the generated name specs carry."""
        for s in secrets:
            if s.is_inline:
                self.inline_secrets[s.name] = s.values or {}
            elif s.required_keys:
                self.required_keys.setdefault(s.name, set()).update(s.required_keys)

    def secret_required_keys(self, spec: FunctionSpec) -> dict[str, list[str]]:
        """Named secret -> the keys this app's ``Secret.from_name`` calls require of it, for ``spec``'s
        secrets: the control plane checks them when it registers the function."""
        return {n: sorted(self.required_keys[n]) for n in spec.secrets if self.required_keys.get(n)}

    def inline_secret_env(self, spec: FunctionSpec) -> dict[str, str]:
        """The environment variables that ``spec``'s inline secrets contribute, merged in the spec's secret
        order (later secrets win). Named secrets are not included: the control plane resolves those."""
        env: dict[str, str] = {}
        for name in spec.secrets:
            values = self.inline_secrets.get(name)
            if values is None:
                values = inline_secret_registry().get(name)
            if values:
                env.update(values)
        return env

    def web_endpoints(self) -> list[str]:
        """Names of the web endpoints: ``f`` for functions, ``Cls.method`` for class methods."""
        out: list[str] = []
        for n, f in self.functions.items():
            assert f.spec is not None  # registered handles are this app's own: they always carry a spec
            if f.spec.web is not None:
                out.append(n)
        for n, c in self.classes.items():
            assert c.spec is not None  # as above
            out += [f"{n}.{m}" for m, _ in c.spec.web_methods]
        return out
