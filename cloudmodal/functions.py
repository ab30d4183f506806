"""Handles for functions, classes and calls: ``.remote``, ``.map``, ``.spawn`` and friends."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from cloudmodal._environment import check_environment
from cloudmodal._options import check_batched
from cloudmodal._partial import Decorated, _Flags, find_partial_methods
from cloudmodal._user_class import instantiate, run_lifecycle_hooks
from cloudmodal.exception import ExecutionError, InvalidError, NotFoundError
from cloudmodal.spec import AutoscalerSettings, BatchConfig, ConcurrencyConfig, FunctionSpec


class _Dual:
    """A blocking method with an ``.aio`` twin, as in Modal (``f.remote(...)`` / ``await f.remote.aio(...)``)."""

    def __init__(self, sync: Any, aio: Any) -> None:
        self._sync = sync
        self.aio = aio
        self.__doc__ = getattr(sync, "__doc__", None)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._sync(*args, **kwargs)


def _to_thread(fn: Any) -> Any:
    async def aio(*args: Any, **kwargs: Any) -> Any:
        import asyncio  # only async callers need it; `import cloudmodal` stays without it

        return await asyncio.to_thread(fn, *args, **kwargs)

    return aio


class _Invocable:
    """Everything that can be called remotely: a function, or a method of a class instance."""

    _display_name: str = "function"

    def __init__(self) -> None:
        from cloudmodal.client import calls

        self._calls = calls
        self.remote = _Dual(self._remote, _to_thread(self._remote))
        self.remote_gen = _Dual(self._remote_gen, self._remote_gen_aio)
        self.spawn = _Dual(self._spawn, _to_thread(self._spawn))
        self.map = _Dual(self._map, self._map_aio)
        self.starmap = _Dual(self._starmap, self._starmap_aio)
        self.for_each = _Dual(self._for_each, _to_thread(self._for_each))
        self.spawn_map = _Dual(self._spawn_map, _to_thread(self._spawn_map))
        self.experimental_spawn_map = _Dual(
            self._experimental_spawn_map, _to_thread(self._experimental_spawn_map)
        )

    # subclasses: (session, function_id, method name, is_generator)
    def _target(self) -> tuple[Any, str, str | None, bool]:
        raise NotImplementedError

    def _remote(self, *args: Any, **kwargs: Any) -> Any:
        session, fid, method, is_gen = self._target()
        self._calls.check_not_generator(is_gen, self._display_name, "remote")
        call_id, first = self._calls.call_one(session, fid, method, args, kwargs)
        return self._calls.wait_final(session, call_id, first)

    def _remote_gen(self, *args: Any, **kwargs: Any) -> Iterator[Any]:
        session, fid, method, is_gen = self._target()
        self._calls.check_not_generator(is_gen, self._display_name, "remote_gen")
        call_id, first = self._calls.call_one(session, fid, method, args, kwargs, wait=0.0)
        return self._calls.iter_generator(session, call_id, first)

    def _remote_gen_aio(self, *args: Any, **kwargs: Any) -> Any:
        return self._calls.async_iter(lambda: self._remote_gen(*args, **kwargs))

    def _spawn(self, *args: Any, **kwargs: Any) -> FunctionCall:
        session, fid, method, is_gen = self._target()
        self._calls.check_not_generator(is_gen, self._display_name, "spawn")
        call_id, _ = self._calls.call_one(session, fid, method, args, kwargs, kind="spawn", wait=0.0)
        return FunctionCall(call_id, _session=session)

    def _map(
        self,
        *iterables: Iterable[Any],
        kwargs: dict[str, Any] | None = None,
        order_outputs: bool = True,
        return_exceptions: bool = False,
        wrap_returned_exceptions: bool | None = None,
    ) -> Iterator[Any]:
        if not iterables:
            raise InvalidError(f"{self._display_name}.map() needs at least one iterable of inputs.")
        return self._map_tuples(
            zip(*iterables, strict=False),
            kwargs or {},
            order_outputs,
            return_exceptions,
            _len_hint(iterables),
        )

    def _starmap(
        self,
        input_iterator: Iterable[Iterable[Any]],
        *,
        kwargs: dict[str, Any] | None = None,
        order_outputs: bool = True,
        return_exceptions: bool = False,
        wrap_returned_exceptions: bool | None = None,
    ) -> Iterator[Any]:
        return self._map_tuples(
            (tuple(a) for a in input_iterator),
            kwargs or {},
            order_outputs,
            return_exceptions,
            _len_hint((input_iterator,)),
        )

    def _map_tuples(
        self,
        tuples: Iterable[tuple[Any, ...]],
        kwargs: dict[str, Any],
        order_outputs: bool,
        return_exceptions: bool,
        total_hint: int | None,
    ) -> Iterator[Any]:
        session, fid, method, is_gen = self._target()
        self._calls.check_not_generator(is_gen, self._display_name, "map")
        from cloudmodal.client.progress import map_progress

        progress = map_progress(self._display_name, total_hint)
        try:
            yield from self._calls.run_map(
                session,
                fid,
                method,
                tuples,
                kwargs,
                order_outputs=order_outputs,
                return_exceptions=return_exceptions,
                progress=progress,
            )
        finally:
            if progress is not None:
                progress.close()

    def _map_aio(self, *iterables: Any, **kw: Any) -> Any:
        return self._calls.async_iter(lambda: self._map(*iterables, **kw))

    def _starmap_aio(self, input_iterator: Any, **kw: Any) -> Any:
        return self._calls.async_iter(lambda: self._starmap(input_iterator, **kw))

    def _for_each(
        self, *iterables: Iterable[Any], kwargs: dict[str, Any] | None = None, ignore_exceptions: bool = False
    ) -> None:
        for _ in self._map(*iterables, kwargs=kwargs, return_exceptions=ignore_exceptions):
            pass

    def _spawn_map(self, *iterables: Iterable[Any], kwargs: dict[str, Any] | None = None) -> None:
        session, fid, method, is_gen = self._target()
        self._calls.check_not_generator(is_gen, self._display_name, "spawn_map")
        self._calls.spawn_many(session, fid, method, zip(*iterables, strict=False), kwargs or {})

    def _experimental_spawn_map(
        self, *iterables: Iterable[Any], kwargs: dict[str, Any] | None = None
    ) -> FunctionCall:
        """As ``spawn_map``, but returns one :class:`FunctionCall` holding every input: ``fc.get(index=i)``
        is input ``i``'s result, ``fc.iter()`` all of them in order, ``fc.num_inputs()`` their number."""
        if not iterables:
            raise InvalidError(f"{self._display_name}.experimental_spawn_map() needs at least one iterable.")
        session, fid, method, is_gen = self._target()
        self._calls.check_not_generator(is_gen, self._display_name, "experimental_spawn_map")
        call_id = self._calls.spawn_many(session, fid, method, zip(*iterables, strict=False), kwargs or {})
        return FunctionCall(call_id, _session=session)


def _len_hint(iterables: tuple[Any, ...]) -> int | None:
    try:
        return min(len(it) for it in iterables)
    except TypeError:
        return None


def _source_of(spec: FunctionSpec) -> dict[str, Any]:
    return {"module": spec.module, "source_file": spec.source_file}


class Function(_Invocable, Decorated):
    """A handle to a decorated function: call it with ``.remote``, ``.map``, ``.spawn``…"""

    _decorator_name = "@app.function"

    def __init__(
        self,
        *,
        spec: FunctionSpec | None,
        app: Any = None,
        raw_f: Any = None,
        from_name: tuple[str, str] | None = None,
    ) -> None:
        super().__init__()
        self.spec = spec
        self.app = app
        self.raw_f = raw_f
        self._function_id: str | None = None
        self._session: Any = None
        self._from_name = from_name
        self._display_name = spec.name if spec else (from_name[1] if from_name else "function")
        self._allow_cpu_fallback = False
        # set by @app.function: the decorated object and its options, which with_options rebuilds from
        self._build: tuple[Any, dict[str, Any]] | None = None
        self._variant_of: Function | None = None  # the decorated function this with_options variant is of
        self._overrides: dict[str, Any] = {}  # ... and the options it changes
        self._web_app: tuple[str, bool] | None = None  # (app name, ephemeral) once run or deployed
        self._dynamic: dict[
            str, Any
        ] = {}  # a variant's concurrency / batching (with_concurrency, with_batching)
        self._from_id: str | None = None  # Function.from_id

    @classmethod
    def _from_local(cls, app: Any, spec: FunctionSpec, raw_f: Any) -> Function:
        return cls(spec=spec, app=app, raw_f=raw_f)

    def __repr__(self) -> str:
        return f"<cloudmodal.Function {self._display_name}>"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise ExecutionError(
            f"Calling {self._display_name}() directly is not supported: use `.remote()` to run it on a worker or `.local()` to run it here."
        )

    def local(self, *args: Any, **kwargs: Any) -> Any:
        if self.raw_f is None:
            raise ExecutionError(
                f"{self._display_name} was looked up by name; its code is not available here to run locally."
            )
        return self.raw_f(*args, **kwargs)

    def get_raw_f(self) -> Any:
        return self.raw_f

    @property
    def object_id(self) -> str | None:
        return self._function_id

    # -- registration ------------------------------------------------------------------------------------
    def _register(self, session: Any, app_id: str, *, allow_cpu_fallback: bool = False) -> str:
        assert self.spec is not None
        body = _definition(
            session, self.app, self.spec, self.raw_f, app_id, self.spec.name, allow_cpu_fallback
        )
        self._function_id = session.transport.post("/v1/functions", body)["function_id"]
        self._session = session
        self._allow_cpu_fallback = allow_cpu_fallback
        return self._function_id

    def _unregister(self) -> None:
        self._function_id = None
        self._session = None

    def _target(self) -> tuple[Any, str, str | None, bool]:
        if self._function_id is None:
            self._hydrate()
        assert self._function_id is not None
        is_gen = bool(self.spec.is_generator) if self.spec else False
        return self._session, self._function_id, None, is_gen

    def _hydrate(self) -> None:
        if self._from_id is not None:
            from cloudmodal.client.session import current_session

            session = current_session()
            row = session.transport.get(f"/v1/functions/{self._from_id}")
        else:
            session, row = _lookup(self._from_name, self.spec, repr(self))
        spec = FunctionSpec.from_wire(row["spec"])
        if spec.kind == "cls":
            raise NotFoundError(f"{self._display_name} is a class: use `cloudmodal.Cls.from_name(...)`.")
        self.spec = self.spec or spec
        self._function_id = row["id"]
        self._session = session

    @staticmethod
    def from_name(
        app_name: str, name: str, *, environment_name: str | None = None, version: int | None = None
    ) -> Function:
        """A lazy handle to a function of a deployed app (looked up on first use)."""
        check_environment(environment_name, "Function.from_name")
        return Function(spec=None, from_name=(app_name, name))

    def hydrate(self) -> Function:
        if self._function_id is None:
            self._hydrate()
        return self

    def get_web_url(self) -> str | None:
        """The URL of this function's web endpoint (None when it is not one), on the control plane in use:
        a deployed app's, or the running app's (``…/web/APP-dev/LABEL/``) inside ``app.run()``."""
        if self.spec is None:
            self._hydrate()
        assert self.spec is not None
        app = self._web_app or ((self._from_name[0], False) if self._from_name else None)
        return _web_url_of(self.spec, None, app, repr(self))

    def with_options(self, **options: Any) -> Function:
        """A variant of this function with other resources/settings (:data:`cloudmodal.app.WITH_OPTIONS`); it
        gets its own pool of workers. It belongs to the app like the function itself: made at module level, it
        is registered when the app runs or deploys; made while the app runs, at once."""
        return self._variant("with_options", options, {})

    def with_concurrency(self, *, max_inputs: int, target_inputs: int | None = None) -> Function:
        """A variant of this function whose containers each run up to ``max_inputs`` inputs at once (as
        ``@cloudmodal.concurrent`` does; ``target_inputs`` is what the autoscaler aims for). Its own pool of
        workers, registered with the app as ``with_options`` variants are."""
        where = f"{self._display_name}.with_concurrency"
        return self._variant(
            "with_concurrency", {}, {"concurrency": check_concurrency(where, max_inputs, target_inputs)}
        )

    def with_batching(self, *, max_batch_size: int, wait_ms: int) -> Function:
        """A variant of this function with dynamic batching (as ``@cloudmodal.batched``): the function takes
        lists and returns one result per input, callers still pass single items. Its own pool of workers."""
        where = f"{self._display_name}.with_batching"
        batching = check_batching(where, max_batch_size, wait_ms)
        root = self._variant_of or self
        if root.spec is not None and root.raw_f is not None:
            if root.spec.web is not None:
                raise InvalidError(
                    f"{where}(): {self._display_name} is a web endpoint, which cannot be batched."
                )
            check_batched(root.raw_f, self._display_name, bool(root.spec.is_generator), skip_self=False)
        return self._variant("with_batching", {}, {"batching": batching})

    def _variant(self, api: str, options: dict[str, Any], dynamic: dict[str, Any]) -> Function:
        return _make_variant(
            self,
            options,
            f"{self._display_name}.{api}() needs a function decorated with @app.function in this program; a "
            "function looked up by name keeps the options it was deployed with.",
            lambda root, spec: Function(spec=spec, app=root.app, raw_f=root.raw_f),
            dynamic,
        )

    @staticmethod
    def from_id(function_id: str) -> Function:
        """A handle to a registered function by its id (``fu-…``, ``Function.object_id``), looked up on
        first use."""
        if not isinstance(function_id, str) or not function_id.startswith("fu-"):
            raise InvalidError(
                f"Function.from_id() expects a function id such as 'fu-…' (a Function's `.object_id`), got "
                f"{function_id!r}."
            )
        f = Function(spec=None)
        f._from_id = function_id
        f._display_name = function_id
        return f

    def update_autoscaler(
        self,
        *,
        min_containers: int | None = None,
        max_containers: int | None = None,
        buffer_containers: int | None = None,
        scaledown_window: int | None = None,
    ) -> AutoscalerSettings:
        """Change this function's autoscaler settings while it runs, without a redeploy (a redeploy, or the
        next ``cloudmodal run``, puts back the decorator's). Settings left out keep their current values.
        Returns the settings now in force."""
        session, fid, _method, _gen = self._target()
        return _update_autoscaler(
            session,
            fid,
            f"{self._display_name}.update_autoscaler",
            min_containers=min_containers,
            max_containers=max_containers,
            buffer_containers=buffer_containers,
            scaledown_window=scaledown_window,
        )

    def get_current_stats(self) -> FunctionStats:
        """The function's queue right now: ``backlog`` (inputs waiting for a container) and
        ``num_total_runners`` (its live containers)."""
        session, fid, _method, _gen = self._target()
        return _current_stats(session, fid)


def _merge_overrides(earlier: Mapping[str, Any], later: Mapping[str, Any]) -> dict[str, Any]:
    """Options of a variant of a variant: the later win, but ``env`` merges, as it does over the function's."""
    out = {**earlier, **later}
    if isinstance(earlier.get("env"), Mapping) and isinstance(later.get("env"), Mapping):
        out["env"] = {**earlier["env"], **later["env"]}
    return out


def _variant_name(base: str, overrides: Mapping[str, Any]) -> str:
    # The same options give the same name in every process: the worker that imports a module finds a module-level
    # variant of a class by this name, and a repeated with_options reuses the function's row and pool.
    digest = hashlib.sha256(repr(sorted(overrides.items(), key=lambda kv: kv[0])).encode()).hexdigest()
    return f"{base}[{digest[:8]}]"


def _attach_variant(root: Function | Cls, variant: Function | Cls) -> None:
    """Add ``variant`` to its app, and register it with the control plane now if the app is running."""
    root.app._add_variant(variant)
    running = root.app._running
    if running is not None:
        variant._register(running.session, running.app_id, allow_cpu_fallback=root._allow_cpu_fallback)


def _web_url_of(
    spec: FunctionSpec, method: str | None, app: tuple[str, bool] | None, what: str
) -> str | None:
    from cloudmodal.web_routes import endpoints, web_url

    found = [label for label, m, _web in endpoints(spec) if m == method]
    if not found:
        return None
    if app is None:
        raise ExecutionError(
            f"{what} has a web URL only once its app runs (`with app.run():`, `cloudmodal serve`) or is deployed; "
            "or look it up with `Function.from_name(app_name, name)`."
        )
    from cloudmodal.client.session import current_session

    session = current_session()
    assert session is not None
    return web_url(session.transport.url, app[0], found[0], ephemeral=app[1])


def _lookup(
    from_name: tuple[str, str] | None, spec: FunctionSpec | None, what: str
) -> tuple[Any, dict[str, Any]]:
    """Find a function's row: a deployed app's by name, or (inside a worker) one of the worker's own app."""
    from cloudmodal.client.session import current_session, in_worker
    from cloudmodal.settings import settings

    session = current_session()
    if from_name is not None:
        return session, session.transport.get(
            "/v1/functions/lookup", app_name=from_name[0], name=from_name[1]
        )
    if in_worker() and spec is not None:
        return session, session.transport.get(
            "/v1/functions/lookup", app_id=settings().app_id, name=spec.name
        )
    raise ExecutionError(
        f"{what} is not part of a running app. Call it inside `with app.run():`, from a `@app.local_entrypoint` "
        "under `cloudmodal run`, or look up a deployed one with `Function.from_name` / `Cls.from_name`."
    )


def _definition(
    session: Any, app: Any, spec: FunctionSpec, raw_f: Any, app_id: str, name: str, allow_cpu_fallback: bool
) -> dict[str, Any]:
    from cloudmodal.serialization import serialize

    source_blob = source_name = source_dir = None
    if spec.source_file and os.path.exists(spec.source_file) and spec.include_source:
        source_blob = session.upload_file(spec.source_file)
        source_name = os.path.basename(spec.source_file)
        source_dir = os.path.dirname(os.path.abspath(spec.source_file))
    pickled = None
    if spec.serialized and raw_f is not None:
        pickled = session.upload_blob(serialize(raw_f))
    inline_env: dict[str, str] = dict(spec.env)
    getter = getattr(app, "inline_secret_env", None)
    required_keys = getattr(app, "secret_required_keys", None)  # Secret.from_name(..., required_keys=[...])
    if getter is not None:
        inline_env.update(getter(spec) or {})
    note = None
    if allow_cpu_fallback and spec.gpu:
        inline_env["CLOUDMODAL_CPU_FALLBACK"] = "1"
        note = f"gpu={','.join(str(t) for t in spec.gpu)} will run on CPU (--gpu-fallback cpu)"
    return {
        "app_id": app_id,
        "name": name,
        "spec": spec.to_wire(),
        "module": spec.module,
        "source_name": source_name,
        "source_blob": source_blob,
        "source_dir": source_dir,
        "pickled_blob": pickled,
        "inline_env": inline_env,
        "secret_required_keys": required_keys(spec) if required_keys is not None else {},
        "allow_cpu_fallback": allow_cpu_fallback,
        "cpu_fallback_note": note,
    }


class Cls(Decorated):
    """A handle to a class decorated with ``@app.cls``. Instantiate it with parameters, then call methods:
    ``Model(size=2).predict.remote(x)``."""

    _decorator_name = "@app.cls"

    def __init__(
        self,
        *,
        spec: FunctionSpec | None,
        app: Any = None,
        user_cls: Any = None,
        from_name: tuple[str, str] | None = None,
    ) -> None:
        self.spec = spec
        self.app = app
        self.user_cls = user_cls
        self._from_name = from_name
        self._function_id: str | None = None
        self._session: Any = None
        self._app_id: str | None = None
        self._allow_cpu_fallback = False
        self._instances: dict[str, str] = {}  # params hash -> function id
        self._web_app: tuple[str, bool] | None = None  # (app name, ephemeral) once run or deployed
        # as on Function: what with_options rebuilds from, and for a variant, its class and changed options
        self._build: tuple[Any, dict[str, Any]] | None = None
        self._variant_of: Cls | None = None
        self._overrides: dict[str, Any] = {}
        self._dynamic: dict[str, Any] = {}

    @classmethod
    def _from_local(cls, app: Any, spec: FunctionSpec, user_cls: Any) -> Cls:
        return cls(spec=spec, app=app, user_cls=user_cls)

    def __repr__(self) -> str:
        return f"<cloudmodal.Cls {self.spec.name if self.spec else self._from_name}>"

    @staticmethod
    def from_name(
        app_name: str, name: str, *, environment_name: str | None = None, version: int | None = None
    ) -> Cls:
        check_environment(environment_name, "Cls.from_name")
        return Cls(spec=None, from_name=(app_name, name))

    def _register(self, session: Any, app_id: str, *, allow_cpu_fallback: bool = False) -> str:
        assert self.spec is not None
        body = _definition(session, self.app, self.spec, None, app_id, self.spec.name, allow_cpu_fallback)
        self._function_id = session.transport.post("/v1/functions", body)["function_id"]
        self._session = session
        self._app_id = app_id
        self._allow_cpu_fallback = allow_cpu_fallback
        self._instances.clear()
        return self._function_id

    def _unregister(self) -> None:
        self._function_id = None
        self._session = None
        self._instances.clear()

    def _hydrate(self) -> None:
        session, row = _lookup(self._from_name, self.spec, repr(self))
        spec = FunctionSpec.from_wire(row["spec"])
        if spec.kind != "cls":
            raise NotFoundError(
                f"{row['name']} is a function, not a class: use `cloudmodal.Function.from_name(...)`."
            )
        self.spec = spec
        self._function_id = row["id"]
        self._app_id = row["app_id"]
        self._session = session

    def __call__(self, **params: Any) -> Obj:
        if self._function_id is None:
            self._hydrate()
        assert self.spec is not None
        params = _check_params(self.spec, params)
        return Obj(self, params)

    def with_options(self, **options: Any) -> Cls:
        """A variant of this class with other resources/settings (the options of ``Function.with_options``):
        instances of it run on pools of their own, ``Model.with_options(gpu="L4")(size=2).predict.remote(x)``.
        Registered with the app as ``Function.with_options`` variants are."""
        return self._variant("with_options", options, {})

    def with_concurrency(self, *, max_inputs: int, target_inputs: int | None = None) -> Cls:
        """A variant of this class whose containers each run up to ``max_inputs`` inputs at once (as
        ``@cloudmodal.concurrent`` on the class): ``Model.with_concurrency(max_inputs=8)(size=2).f.remote(x)``."""
        where = f"{self._name()}.with_concurrency"
        return self._variant(
            "with_concurrency", {}, {"concurrency": check_concurrency(where, max_inputs, target_inputs)}
        )

    def with_batching(self, *, max_batch_size: int, wait_ms: int) -> Cls:
        """A variant of this class with dynamic batching of its method (as ``@cloudmodal.batched`` on it): the
        class must have exactly one method, which takes lists and returns one result per input."""
        where = f"{self._name()}.with_batching"
        batching = check_batching(where, max_batch_size, wait_ms)
        root = self._variant_of or self
        spec = root.spec
        if spec is not None and root.user_cls is not None:
            if len(spec.methods) != 1:
                raise InvalidError(
                    f"{where}(): a batched class has exactly one method, and {spec.name} has "
                    f"{len(spec.methods)} ({', '.join(spec.methods) or 'none'}). Move the method to batch into a "
                    "class of its own."
                )
            (mname,) = spec.methods
            if spec.web_methods:
                raise InvalidError(
                    f"{where}(): {spec.name}.{mname} is a web endpoint, which cannot be batched."
                )
            pf = find_partial_methods(root.user_cls, _Flags.interface())[mname]
            assert pf.raw_f is not None
            check_batched(pf.raw_f, f"{spec.name}.{mname}", mname in spec.generator_methods, skip_self=True)
        return self._variant("with_batching", {}, {"batching": batching})

    def _name(self) -> str:
        root = self._variant_of or self
        return root.spec.name if root.spec else (root._from_name[1] if root._from_name else "Cls")

    def _variant(self, api: str, options: dict[str, Any], dynamic: dict[str, Any]) -> Cls:
        return _make_variant(
            self,
            options,
            f"{self._name()}.{api}() needs a class decorated with @app.cls in this program; a class looked "
            "up by name keeps the options it was deployed with.",
            lambda root, spec: Cls(spec=spec, app=root.app, user_cls=root.user_cls),
            dynamic,
        )

    def _instance_function(self, params: dict[str, Any]) -> str:
        from cloudmodal.serialization import serialize

        assert self.spec is not None and self._function_id is not None
        key = hashlib.sha256(repr(sorted(params.items())).encode()).hexdigest()[:16]
        fid = self._instances.get(key)
        if fid is None:
            session = self._session
            if self._from_name is not None or self.user_cls is None:
                # the control plane copies the class's definition (code, secrets) from `parent_id`
                parent = session.transport.get(f"/v1/functions/{self._function_id}")
                body = {"spec": parent["spec"], "module": parent["module"], "app_id": parent["app_id"]}
            else:
                body = _definition(
                    session,
                    self.app,
                    self.spec,
                    None,
                    self._app_id or "",
                    self.spec.name,
                    self._allow_cpu_fallback,
                )
            body |= {
                "name": f"{self.spec.name}({key})",
                "parent_id": self._function_id,
                "pickled_blob": session.upload_blob(serialize(params)),
            }
            fid = session.transport.post("/v1/functions", body)["function_id"]
            self._instances[key] = fid
        return fid


def _make_variant(
    handle: Any, options: dict[str, Any], refusal: str, make: Any, dynamic: Mapping[str, Any] | None = None
) -> Any:
    """A ``with_options`` / ``with_concurrency`` / ``with_batching`` variant of a decorated function or class
    ``handle`` (a variant of a variant derives from the same root, its options merged): ``make(root, spec)``
    builds the handle, which is attached to the root so the app registers it. ``dynamic``: the variant's
    ``concurrency`` / ``batching`` (:class:`ConcurrencyConfig` / :class:`BatchConfig`), which replace the
    decorators'. ``refusal``: the error for a handle that was not decorated here."""
    root = handle._variant_of or handle
    if root.spec is None or root.app is None or root._build is None:
        raise InvalidError(refusal)
    overrides = _merge_overrides(handle._overrides, options)
    dyn = {**handle._dynamic, **(dynamic or {})}
    name = _variant_name(root.spec.name, {**overrides, **{f"@{k}": v for k, v in dyn.items()}})
    spec = dataclasses.replace(root.app._variant_spec(root, overrides, name), **dyn)
    variant = make(root, spec)
    variant._variant_of = root
    variant._overrides = overrides
    variant._dynamic = dyn
    _attach_variant(root, variant)
    return variant


def check_concurrency(where: str, max_inputs: Any, target_inputs: Any) -> ConcurrencyConfig:
    """``with_concurrency``'s arguments, checked as ``@cloudmodal.concurrent`` checks its own."""
    from cloudmodal.partial_function import _check_int

    _check_int(max_inputs, f"{where}(max_inputs=...)", 1, None, "max_inputs=10")
    if target_inputs is not None:
        _check_int(target_inputs, f"{where}(target_inputs=...)", 1, None, "target_inputs=8")
        if target_inputs > max_inputs:
            raise InvalidError(
                f"{where}(): `target_inputs` ({target_inputs}) cannot be greater than `max_inputs` "
                f"({max_inputs}). Lower target_inputs, or raise max_inputs."
            )
    return ConcurrencyConfig(max_inputs, target_inputs)


def check_batching(where: str, max_batch_size: Any, wait_ms: Any) -> BatchConfig:
    """``with_batching``'s arguments, checked as ``@cloudmodal.batched`` checks its own (Modal's ranges)."""
    from cloudmodal.partial_function import MAX_BATCH_SIZE, MAX_BATCH_WAIT_MS, _check_int

    _check_int(max_batch_size, f"{where}(max_batch_size=...)", 1, MAX_BATCH_SIZE, "max_batch_size=8")
    _check_int(wait_ms, f"{where}(wait_ms=...)", 0, MAX_BATCH_WAIT_MS, "wait_ms=100")
    return BatchConfig(max_batch_size, wait_ms)


@dataclasses.dataclass(frozen=True)
class FunctionStats:
    """``Function.get_current_stats()``: inputs waiting for a container, and the function's live containers."""

    backlog: int
    num_total_runners: int


def _update_autoscaler(session: Any, fid: str, where: str, **settings: int | None) -> AutoscalerSettings:
    from cloudmodal.partial_function import _check_int

    given = {k: v for k, v in settings.items() if v is not None}
    for k, v in given.items():
        low, high = (2, 3600) if k == "scaledown_window" else (0, None)
        _check_int(v, f"{where}({k}=...)", low, high, f"{k}={max(low, 1)}")
    mn, mx = given.get("min_containers"), given.get("max_containers")
    if mn is not None and mx is not None and mn > mx:
        raise InvalidError(f"{where}(): min_containers ({mn}) cannot be greater than max_containers ({mx}).")
    row = session.transport.post(f"/v1/functions/{fid}/autoscaler", given)
    return AutoscalerSettings(**row["autoscaler"])


def _current_stats(session: Any, fid: str) -> FunctionStats:
    row = session.transport.get(f"/v1/functions/{fid}/stats")
    return FunctionStats(backlog=int(row["backlog"]), num_total_runners=int(row["num_total_runners"]))


def _check_params(spec: FunctionSpec, params: dict[str, Any]) -> dict[str, Any]:
    declared = {name: (tname, default) for name, tname, default in spec.parameters}
    unknown = set(params) - set(declared)
    if unknown:
        raise InvalidError(
            f"{spec.name} has no parameter(s) {sorted(unknown)}; its parameters are {sorted(declared) or 'none'}."
        )
    types = {"int": int, "str": str, "bytes": bytes, "bool": bool}
    out = {}
    for name, (tname, default) in declared.items():
        if name in params:
            value = params[name]
            t = types.get(tname)
            if t is not None and (not isinstance(value, t) or (t is int and isinstance(value, bool))):
                raise InvalidError(
                    f"Parameter {name!r} of {spec.name} must be {tname}, got {type(value).__name__} {value!r}."
                )
            out[name] = value
        elif _is_no_default(default):
            raise InvalidError(f"{spec.name}() is missing required parameter {name!r} ({tname}).")
        else:
            out[name] = default
    return out


def _is_no_default(default: Any) -> bool:
    return (
        default is None
        or (isinstance(default, str) and default == "<NO_DEFAULT>")
        or repr(default).startswith("<NO_DEFAULT")
    )


class Obj:
    """An instance of a remote class with its parameters bound; its methods run on that instance's pool."""

    def __init__(self, cls: Cls, params: dict[str, Any]) -> None:
        self._cls = cls
        self._params = params
        self._fid: str | None = None
        self._local: Any = None

    def _function_id(self) -> str:
        if self._fid is None:
            self._fid = self._cls._instance_function(self._params)
        return self._fid

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        spec = self._cls.spec
        assert spec is not None
        if name not in spec.methods:
            raise AttributeError(
                f"{spec.name} has no method {name!r}; its methods are {list(spec.methods)}. Decorate methods with @cloudmodal.method()."
            )
        return _BoundMethod(self, name, name in spec.generator_methods)

    def update_autoscaler(
        self,
        *,
        min_containers: int | None = None,
        max_containers: int | None = None,
        buffer_containers: int | None = None,
        scaledown_window: int | None = None,
    ) -> AutoscalerSettings:
        """Change the autoscaler settings of this instance's containers while they run (see
        ``Function.update_autoscaler``)."""
        name = self._cls.spec.name if self._cls.spec else "Cls"
        return _update_autoscaler(
            self._cls._session,
            self._function_id(),
            f"{name}(...).update_autoscaler",
            min_containers=min_containers,
            max_containers=max_containers,
            buffer_containers=buffer_containers,
            scaledown_window=scaledown_window,
        )

    def _local_instance(self) -> Any:
        if self._local is None:
            self._local = instantiate(self._cls.user_cls, **self._params)
            run_lifecycle_hooks(self._local, "enter")
        return self._local


class _BoundMethod(_Invocable):
    def __init__(self, obj: Obj, name: str, is_generator: bool) -> None:
        super().__init__()
        self._obj = obj
        self._name = name
        self._is_gen = is_generator
        self._display_name = f"{obj._cls.spec.name}.{name}" if obj._cls.spec else name

    def _target(self) -> tuple[Any, str, str | None, bool]:
        fid = self._obj._function_id()
        return self._obj._cls._session, fid, self._name, self._is_gen

    def get_web_url(self) -> str | None:
        """The URL of this web method's endpoint (None when it is not one); see ``Function.get_web_url``."""
        cls = self._obj._cls
        if cls.spec is None:
            cls._hydrate()
        assert cls.spec is not None
        app = cls._web_app or ((cls._from_name[0], False) if cls._from_name else None)
        return _web_url_of(cls.spec, self._name, app, self._display_name)

    def local(self, *args: Any, **kwargs: Any) -> Any:
        if self._obj._cls.user_cls is None:
            raise ExecutionError(
                f"{self._display_name} was looked up by name; its code is not available here."
            )
        inst = self._obj._local_instance()
        return getattr(inst, self._name)(*args, **kwargs)


class FunctionCall:
    """A handle to a spawned call (``fc-…``): ``get(timeout)``, ``cancel()``, ``FunctionCall.from_id(id)``; a
    call of ``experimental_spawn_map`` holds several inputs: ``get(index=i)``, ``iter()``."""

    def __init__(self, call_id: str, *, _session: Any = None) -> None:
        self.object_id = call_id
        self._session = _session
        self._results: dict[int, tuple[bool, Any]] = {}  # input index -> (ok, value or error)
        self.get = _Dual(self._get, _to_thread(self._get))
        self.cancel = _Dual(self._cancel, _to_thread(self._cancel))
        self.iter = _Dual(self._iter, self._iter_aio)

    def __repr__(self) -> str:
        return f"<cloudmodal.FunctionCall {self.object_id}>"

    def _sess(self) -> Any:
        if self._session is None:
            from cloudmodal.client.session import current_session

            self._session = current_session()
        return self._session

    def _get(self, timeout: float | None = None, *, index: int = 0) -> Any:
        """Input ``index``'s result (the only input's, for a spawned call); raises the builtin
        ``TimeoutError`` if it is not ready within ``timeout`` s (``timeout=0`` polls once)."""
        if index not in self._results:
            self._check_index(index)
            from cloudmodal.client.calls import LONG_POLL_S, OutputStream, decode_output

            session = self._sess()
            stream = OutputStream(session, self.object_id)
            deadline = None if timeout is None else time.monotonic() + max(float(timeout), 0.0)
            while index not in self._results:
                remaining = LONG_POLL_S if deadline is None else deadline - time.monotonic()
                for _id, idx, gen_index, status, data, blob in stream.poll(
                    min(max(remaining, 0.0), LONG_POLL_S)
                ):
                    if gen_index == -1 and idx == index:
                        self._results[index] = decode_output(session, status, data, blob)
                        break
                else:
                    if deadline is not None and time.monotonic() >= deadline:
                        raise TimeoutError(
                            f"Function call {self.object_id} did not finish within {timeout} s."
                        )
        ok, value = self._results[index]
        if ok:
            return value
        raise value

    def _check_index(self, index: int) -> None:
        if not isinstance(index, int) or isinstance(index, bool) or index < 0:
            raise InvalidError(f"FunctionCall.get(index=...) must be a whole number from 0, got {index!r}.")
        if index > 0 and index >= (n := self.num_inputs()):
            raise InvalidError(
                f"FunctionCall {self.object_id} has {n} input(s): index {index} is out of range (0 to {n - 1})."
            )

    def _iter(self, *, start: int = 0, end: int | None = None) -> Iterator[Any]:
        """The results of inputs ``start`` to ``end`` (excluded; default: all), in input order, each as soon
        as it and those before it are done; an input's error is raised when its turn comes."""
        from cloudmodal.client.calls import LONG_POLL_S, OutputStream, decode_output

        total = self.num_inputs()
        stop = total if end is None else min(end, total)
        if start < 0 or (end is not None and end < start):
            raise InvalidError(f"FunctionCall.iter(start={start}, end={end}): need 0 <= start <= end.")
        session = self._sess()
        stream = OutputStream(session, self.object_id)
        buffered: dict[int, tuple[bool, Any]] = {}
        nxt = start
        while nxt < stop:
            if nxt in self._results or nxt in buffered:
                ok, value = self._results.get(nxt) or buffered.pop(nxt)
                nxt += 1
                if not ok:
                    raise value
                yield value
                continue
            for _id, idx, gen_index, status, data, blob in stream.poll(LONG_POLL_S):
                if gen_index == -1 and nxt <= idx < stop and idx not in self._results:
                    buffered[idx] = decode_output(session, status, data, blob)

    def _iter_aio(self, *, start: int = 0, end: int | None = None) -> Any:
        from cloudmodal.client.calls import async_iter

        return async_iter(lambda: self._iter(start=start, end=end))

    def _cancel(self, terminate_containers: bool = False) -> None:
        self._sess().transport.post(f"/v1/calls/{self.object_id}/cancel")

    def get_call_graph(self) -> Any:
        """Not supported: the control plane does not record which call started which."""
        raise InvalidError(
            "FunctionCall.get_call_graph() is not supported by cloudmodal: calls do not record the call that "
            "started them. Use `cloudmodal app events APP` and `cloudmodal app logs APP` to follow a run."
        )

    def num_inputs(self) -> int:
        return int(self._sess().transport.get(f"/v1/calls/{self.object_id}")["total"])

    @staticmethod
    def from_id(function_call_id: str) -> FunctionCall:
        return FunctionCall(function_call_id)

    @staticmethod
    def gather(*calls: FunctionCall) -> list[Any]:
        """Wait for every call; returns results in order, raising the first error."""
        return [c.get() for c in calls]
