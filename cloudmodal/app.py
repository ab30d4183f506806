"""``cloudmodal.App``: a named group of functions and classes, and the decorators that add them.

``@app.function(...)`` / ``@app.cls(...)`` check their options when they run (:mod:`cloudmodal._options`),
build a validated :class:`~cloudmodal.spec.FunctionSpec` from the decorated object
(:mod:`cloudmodal._spec_build`), and register a :class:`~cloudmodal.functions.Function` or
:class:`~cloudmodal.functions.Cls` handle holding it (:mod:`cloudmodal._registry`). Nothing here runs
anything: ``app.run()`` and ``app.deploy()`` hand the app to the client runtime.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import PurePosixPath
from typing import Any

from cloudmodal._environment import check_environment
from cloudmodal._options import (
    _RESERVED_MOUNTS,
    CLOUDS,
    CLS_OPTIONS,
    FUNCTION_OPTIONS,
    MAX_EPHEMERAL_DISK_MIB,
    MAX_TIMEOUT,
    SPOT_POLICIES,
    WITH_OPTIONS,
    check_bool,
    check_options,
    check_secrets,
    check_volumes,
    fail,
    variant_options,
)
from cloudmodal._partial import _PartialFunction
from cloudmodal._registry import AppRegistry, LocalEntrypoint
from cloudmodal._spec_build import AppDefaults, cls_spec, function_spec, image_of
from cloudmodal._user_class import (
    bind_parameters,
    find_lifecycle_hooks,
    get_parameters,
    instantiate,
    run_lifecycle_hooks,
)
from cloudmodal.budget import Budget
from cloudmodal.cloud_bucket_mount import CloudBucketMount
from cloudmodal.exception import InvalidError, NotFoundError
from cloudmodal.functions import Cls, Function
from cloudmodal.image import Image
from cloudmodal.secret import Secret, check_object_name
from cloudmodal.spec import FunctionSpec
from cloudmodal.volume import Volume

__all__ = [
    "App",
    "LocalEntrypoint",
    "CLOUDS",
    "FUNCTION_OPTIONS",
    "CLS_OPTIONS",
    "WITH_OPTIONS",
    "MAX_TIMEOUT",
    "MAX_EPHEMERAL_DISK_MIB",
    "SPOT_POLICIES",
    "_RESERVED_MOUNTS",
    # class helpers for the runtime (defined in cloudmodal._user_class)
    "bind_parameters",
    "find_lifecycle_hooks",
    "get_parameters",
    "instantiate",
    "run_lifecycle_hooks",
]

_TAG_RE = re.compile(r"^[a-zA-Z0-9._-]{1,63}$")


class App:
    """A group of functions and classes deployed and run together.

    ```python
    app = cloudmodal.App("example", image=cloudmodal.Image.debian_slim().pip_install("numpy"))

    @app.function(gpu=["H100", "A100-80GB"], retries=3)
    def square(x: int) -> int:
        return x * x

    @app.local_entrypoint()
    def main():
        print(square.remote(4))
    ```

    App-level ``image``, ``secrets`` and ``volumes`` are defaults for every function (secrets are prepended,
    volumes merged with the function's winning), as in Modal.
    """

    def __init__(
        self,
        name: str | None = None,
        *,
        tags: Mapping[str, str] | None = None,
        image: Image | None = None,
        secrets: Sequence[Secret] = (),
        volumes: Mapping[str | PurePosixPath, Volume | CloudBucketMount] | None = None,
        include_source: bool = True,
        budget: Budget | None = None,
    ) -> None:
        if name is not None:
            check_object_name(name, "App")
        self._name = name
        self._tags = self._check_tags(tags or {})
        if budget is not None and not isinstance(budget, Budget):
            raise InvalidError(
                f"App(budget=...) takes a cloudmodal.Budget, e.g. Budget(max_per_hour=20.0); got {budget!r}."
            )
        self._budget = budget
        if image is not None and not isinstance(image, Image):
            raise fail(
                "cloudmodal.App",
                "image",
                f"expected a cloudmodal.Image, got {type(image).__name__}.",
                "Build one with cloudmodal.Image.debian_slim().",
            )
        self._image = image
        self._defaults = AppDefaults(
            image=image,
            secrets=check_secrets("cloudmodal.App", secrets),
            volumes=check_volumes("cloudmodal.App", volumes or {}),
            include_source=bool(check_bool("cloudmodal.App", "include_source", include_source)),
        )
        self._registry = AppRegistry()
        self._registry.remember_inline(self._defaults.secrets)
        self._running: Any = None  # set by cloudmodal.client.session.run_app while the app runs
        self._looked_up_id: str | None = None  # set by App.lookup: the app on the control plane

    @staticmethod
    def _check_tags(tags: Mapping[str, str]) -> dict[str, str]:
        if not isinstance(tags, Mapping):
            raise InvalidError(
                f"App tags must be a dict of str to str, e.g. tags={{'team': 'ml'}}; got {tags!r}."
            )
        for k, v in tags.items():
            for x in (k, v):
                if not isinstance(x, str) or not _TAG_RE.match(x):
                    raise InvalidError(
                        f"Invalid app tag {k!r}: {v!r}. Tag keys and values are 1-63 letters, digits, '.', '_' or '-'."
                    )
        return dict(tags)

    # ---------------------------------------------------------------- properties

    @property
    def name(self) -> str | None:
        return self._name

    @property
    def app_id(self) -> str | None:
        """The id (``ap-…``) of this app on the control plane: while it runs (``with app.run():``), or
        for an app from :meth:`App.lookup`; else None."""
        if self._running is not None:
            return str(self._running.app_id)
        return self._looked_up_id

    @staticmethod
    def lookup(
        name: str,
        *,
        client: Any = None,
        environment_name: str | None = None,
        create_if_missing: bool = False,
    ) -> App:
        """A handle to the deployed app ``name`` (or the app with id ``ap-…``), e.g. to create Sandboxes in:

        ```python
        app = cloudmodal.App.lookup("my-sandboxes", create_if_missing=True)
        ```

        With ``create_if_missing=True`` an app of that name with no functions is deployed when none is;
        otherwise a missing (or stopped) app raises :class:`~cloudmodal.exception.NotFoundError`. The handle
        carries ``name`` and ``app_id``; its functions are reached with ``Function.from_name(name, ...)``.
        ``client`` is accepted for Modal compatibility and ignored.
        """
        check_environment(environment_name, "App.lookup")
        if not isinstance(name, str) or not name:
            raise InvalidError(f"App.lookup(name) takes an app name or id (ap-…), got {name!r}.")
        row = App._find_deployed(name)
        if row is None:
            if not create_if_missing or name.startswith("ap-"):
                raise NotFoundError(
                    f"No deployed app named {name!r}. Deploy it (`cloudmodal deploy FILE`), or pass "
                    "create_if_missing=True to create an empty one."
                )
            check_object_name(name, "App")
            from cloudmodal.client.session import current_session
            from cloudmodal.ids import new_id

            row = current_session().transport.post(
                "/v1/apps", {"app_id": new_id("ap"), "name": name, "ephemeral": False}
            )
        app = App(row["name"])
        app._looked_up_id = row["id"]
        return app

    @staticmethod
    def _find_deployed(name_or_id: str) -> dict[str, Any] | None:
        """The control plane's row of a deployed app (not an ephemeral or stopped one), or None."""
        from cloudmodal.client.session import current_session

        transport = current_session().transport
        try:
            row: dict[str, Any] = transport.get(f"/v1/apps/{name_or_id}")
        except NotFoundError:
            return None
        if row.get("state") == "deployed" or (name_or_id.startswith("ap-") and row.get("state") != "stopped"):
            return row
        # The name's newest app is an ephemeral or stopped one: a deployed app may still bear the name.
        live: list[dict[str, Any]] = transport.get("/v1/apps", all=False, limit=1000)
        return next((a for a in live if a["name"] == name_or_id and a["state"] == "deployed"), None)

    @property
    def tags(self) -> dict[str, str]:
        return dict(self._tags)

    @property
    def budget(self) -> Budget | None:
        return self._budget

    @property
    def image(self) -> Image | None:
        return self._image

    @property
    def registered_functions(self) -> dict[str, Function]:
        return dict(self._registry.functions)

    @property
    def registered_classes(self) -> dict[str, Cls]:
        return dict(self._registry.classes)

    @property
    def registered_entrypoints(self) -> dict[str, LocalEntrypoint]:
        return dict(self._registry.entrypoints)

    @property
    def registered_web_endpoints(self) -> list[str]:
        """Names of the web endpoints: ``f`` for functions, ``Cls.method`` for class methods."""
        return self._registry.web_endpoints()

    def inline_secret_values(self) -> dict[str, dict[str, str]]:
        """Values of the inline secrets (``Secret.from_dict/from_local_environ/from_dotenv``) used by this app,
        by the generated name that specs carry. The runtime uploads these; they never travel inside a spec."""
        return {k: dict(v) for k, v in self._registry.inline_secrets.items()}

    def inline_secret_env(self, spec: FunctionSpec) -> dict[str, str]:
        """The environment variables that ``spec``'s inline secrets contribute, merged in the spec's secret
        order (later secrets win). Named secrets are not included: the control plane resolves those."""
        return self._registry.inline_secret_env(spec)

    def secret_required_keys(self, spec: FunctionSpec) -> dict[str, list[str]]:
        """Named secret -> the keys ``Secret.from_name(..., required_keys=...)`` requires, for ``spec``'s
        secrets (the control plane checks them at registration)."""
        return self._registry.secret_required_keys(spec)

    def __repr__(self) -> str:
        functions, classes = list(self._registry.functions), list(self._registry.classes)
        return f"App({self._name!r}, functions={functions}, classes={classes})"

    # ---------------------------------------------------------------- running (delegates to the client)

    def run(
        self,
        *,
        name: str | None = None,
        detach: bool = False,
        show_logs: bool | None = None,
        gpu_fallback: str | None = None,
        client: Any = None,
        interactive: bool = False,
        environment_name: str | None = None,
    ) -> Any:
        """Context manager running the app ephemerally: ``with app.run(): f.remote(1)``.

        ``client`` and ``interactive`` are accepted for Modal compatibility and ignored; ``environment_name``
        may only name the control plane's one environment (``"main"``).
        """
        check_environment(environment_name, "App.run")
        from cloudmodal.client.session import run_app

        return run_app(self, detach=detach, show_logs=show_logs, gpu_fallback=gpu_fallback, name=name)

    def deploy(
        self,
        *,
        name: str | None = None,
        environment_name: str | None = None,
        tag: str = "",
        client: Any = None,
        strategy: str = "rolling",
    ) -> Any:
        """Deploy the app (it needs a name); its functions stay callable with ``Function.from_name``."""
        check_environment(environment_name, "App.deploy")
        if strategy not in ("rolling", "recreate"):
            raise InvalidError(f"deploy(strategy={strategy!r}) must be 'rolling' or 'recreate'.")
        from cloudmodal.client.session import deploy

        return deploy(self, name=name)

    # ---------------------------------------------------------------- decorators

    def function(self, _warn_parentheses_missing: Any = None, **options: Any) -> Callable[[Any], Function]:
        """Decorator: make a function runnable remotely. Options: see :data:`FUNCTION_OPTIONS`."""
        if _warn_parentheses_missing is not None:
            raise InvalidError(
                "Positional arguments are not allowed. Did you forget parentheses? Suggestion: `@app.function()`"
                " (options by keyword, e.g. `@app.function(gpu='H100')`)."
            )
        o = check_options("@app.function", options, FUNCTION_OPTIONS)

        def wrapper(f: Any) -> Function:
            spec, raw_f = self._function_spec(f, o)
            handle = Function._from_local(self, spec, raw_f)
            handle._build = (f, dict(options))  # what with_options rebuilds from
            self._registry.add(spec.name, handle, self._name)
            return handle

        return wrapper

    def cls(self, _warn_parentheses_missing: Any = None, **options: Any) -> Callable[[Any], Cls]:
        """Decorator: make a class a remote service with lifecycle hooks. Options: see :data:`CLS_OPTIONS`."""
        if _warn_parentheses_missing is not None:
            raise InvalidError(
                "Positional arguments are not allowed. Did you forget parentheses? Suggestion: `@app.cls()`."
            )
        o = check_options("@app.cls", options, CLS_OPTIONS)

        def wrapper(obj: Any) -> Cls:
            spec, user_cls = self._cls_spec(obj, o)
            handle = Cls._from_local(self, spec, user_cls)
            handle._build = (obj, dict(options))  # what with_options rebuilds from
            self._registry.add(spec.name, handle, self._name)
            return handle

        return wrapper

    def local_entrypoint(
        self, _warn_parentheses_missing: Any = None, *, name: str | None = None
    ) -> Callable[[Callable[..., Any]], LocalEntrypoint]:
        """Decorator: a function ``cloudmodal run file.py`` runs on this machine (its parameters become CLI
        options)."""
        if _warn_parentheses_missing is not None:
            raise InvalidError(
                "Positional arguments are not allowed. Did you forget parentheses? Suggestion: `@app.local_entrypoint()`."
            )
        if name is not None and (not isinstance(name, str) or not name):
            raise InvalidError(f"local_entrypoint(name=...) must be a non-empty string, got {name!r}.")

        def wrapper(raw_f: Callable[..., Any]) -> LocalEntrypoint:
            if (
                isinstance(raw_f, Function | Cls | _PartialFunction)
                or isinstance(raw_f, type)
                or not callable(raw_f)
            ):
                raise InvalidError(
                    f"@app.local_entrypoint() decorates a plain function, not {raw_f!r}. "
                    "Call remote functions from inside it instead."
                )
            ep = LocalEntrypoint(raw_f, self, name or raw_f.__qualname__)
            self._registry.add_entrypoint(ep)
            return ep

        return wrapper

    def include(self, other: App, inherit_tags: bool = True) -> App:
        """Add another App's functions and classes to this one (e.g. to deploy several modules together)."""
        if not isinstance(other, App):
            raise InvalidError(f"app.include() expects a cloudmodal.App, got {type(other).__name__}.")
        self._registry.include(other._registry, self._name)
        if inherit_tags:
            self._tags = {**other._tags, **self._tags}
        return self

    def _add_variant(self, handle: Function | Cls) -> None:
        """Make a ``with_options`` variant part of this app, so that running or deploying the app registers it
        like any decorated function (a variant made at module level is usable once the app runs)."""
        self._registry.add_variant(handle)

    # ---------------------------------------------------------------- spec building

    def _function_spec(
        self, f: Any, o: Mapping[str, Any], replace: frozenset[str] = frozenset()
    ) -> tuple[FunctionSpec, Callable[..., Any]]:
        spec, raw_f = function_spec(f, o, self._defaults, replace)
        self._remember_inline_of(o)
        return spec, raw_f

    def _cls_spec(
        self, obj: Any, o: Mapping[str, Any], replace: frozenset[str] = frozenset()
    ) -> tuple[FunctionSpec, type]:
        spec, user_cls = cls_spec(obj, o, self._defaults, replace)
        self._remember_inline_of(o)
        return spec, user_cls

    def _remember_inline_of(self, o: Mapping[str, Any]) -> None:
        """Keep the values of the inline secrets a spec built from options ``o`` names (the App's own are
        kept from the start)."""
        self._registry.remember_inline((*o["secrets"], *image_of(o, self._defaults).secrets))

    def _variant_spec(self, handle: Function | Cls, overrides: Mapping[str, Any], name: str) -> FunctionSpec:
        """The spec of ``handle.with_options(**overrides)``, named ``name``: the decorator's own options with
        ``overrides`` on top (:func:`cloudmodal._options.variant_options`), built as the decorator builds."""
        assert handle.spec is not None and handle._build is not None
        decorated, options = handle._build
        where = f"{handle.spec.name}.with_options"
        if isinstance(handle, Cls):
            o, replace = variant_options(where, "cls", options, overrides)
            spec, _ = self._cls_spec(decorated, o, replace)
        else:
            o, replace = variant_options(where, "function", options, overrides)
            spec, _ = self._function_spec(decorated, o, replace)
        return dataclasses.replace(spec, name=name)
