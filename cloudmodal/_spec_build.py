"""From checked options to a :class:`~cloudmodal.spec.FunctionSpec`: what ``@app.function`` / ``@app.cls``
build from the decorated object, the options (:func:`cloudmodal._options.check_options`) and the App's
defaults. Checks that need the decorated object itself (its signature, its markers, a class's methods) are
here; checks of the options alone are in :mod:`cloudmodal._options`.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cloudmodal._options import check_batched, check_volumes
from cloudmodal._partial import Decorated, _Flags, _PartialFunction, find_partial_methods, is_nullary
from cloudmodal._user_class import NO_DEFAULT, get_parameters
from cloudmodal.cloud_bucket_mount import CloudBucketMount
from cloudmodal.exception import InvalidError
from cloudmodal.image import Image
from cloudmodal.secret import Secret
from cloudmodal.spec import AutoscalerSettings, BatchConfig, ConcurrencyConfig, FunctionSpec, WebConfig
from cloudmodal.volume import Volume


@dataclass(frozen=True)
class AppDefaults:
    """What an App gives each of its functions and classes: its ``image`` (when they set none), its
    ``secrets`` (before theirs) and ``volumes`` (merged, theirs winning), and ``include_source``."""

    image: Image | None = None
    secrets: tuple[Secret, ...] = ()
    volumes: Mapping[str, Volume | CloudBucketMount] = field(default_factory=dict)
    include_source: bool = True


@functools.cache
def default_image() -> Image:
    """The image of a function when neither it nor its App sets one."""
    return Image.debian_slim()


def _module_name(obj: Any) -> str:
    module = getattr(obj, "__module__", None) or "__main__"
    if module == "__main__":
        f = _source_file(obj)
        if f and not f.startswith("<"):
            return Path(f).stem
    return module


def _source_file(obj: Any) -> str | None:
    try:
        return inspect.getfile(obj)
    except (TypeError, OSError):
        return None


def image_of(o: Mapping[str, Any], defaults: AppDefaults) -> Image:
    """The image a function or class with options ``o`` runs in."""
    return o["image"] or defaults.image or default_image()


def common_fields(
    o: Mapping[str, Any], where: str, defaults: AppDefaults, replace: frozenset[str] = frozenset()
) -> dict[str, Any]:
    """Spec fields shared by functions and classes, with the App's defaults merged in (but for the fields
    in ``replace``: a ``with_options`` variant's ``secrets``/``volumes`` replace the App's too)."""
    image = image_of(o, defaults)
    secrets: dict[str, Secret] = {}
    app_secrets = () if "secrets" in replace else defaults.secrets
    for s in (*app_secrets, *o["secrets"]):
        secrets.setdefault(s.name, s)
    app_volumes: Mapping[str, Volume | CloudBucketMount] = {} if "volumes" in replace else defaults.volumes
    volumes = {**app_volumes, **o["volumes"]}
    if o["volumes"] and app_volumes:
        volumes = check_volumes(where, volumes)  # re-check duplicates across the merge
    mounts = volume_fields(volumes)
    for name in mounts.pop("bucket_secrets"):  # a bucket's credentials reach the worker as its secrets do
        secrets.setdefault(name, _bucket_secret(volumes, name))
    cpu, cpu_limit = o["cpu"]
    memory, memory_limit = o["memory"]
    autoscaler = AutoscalerSettings(
        min_containers=o["min_containers"] or 0,
        max_containers=o["max_containers"],
        buffer_containers=o["buffer_containers"] or 0,
        scaledown_window=o["scaledown_window"] if o["scaledown_window"] is not None else 60,
    )
    include_source = o["include_source"] if o["include_source"] is not None else defaults.include_source
    return {
        "gpu": o["gpu"],
        "cpu": float(cpu) if cpu is not None else None,
        "cpu_limit": float(cpu_limit) if cpu_limit is not None else None,
        "memory": memory,
        "memory_limit": memory_limit,
        "ephemeral_disk": o["ephemeral_disk"],
        "timeout": o["timeout"],
        "startup_timeout": o["startup_timeout"],
        "retries": o["retries"].to_policy() if o["retries"] is not None else None,
        "autoscaler": autoscaler,
        "image": image.to_wire(),
        "image_hash": image.hash,
        "secrets": tuple(secrets),
        # Image.env() variables are part of the container's environment; the function's env= wins.
        "env": tuple({**image.env_vars, **dict(o["env"])}.items()),
        **mounts,
        "cloud": o["cloud"],
        "region": o["region"],
        "spot": o["spot"],
        "max_price_per_hour": float(o["max_price_per_hour"]) if o["max_price_per_hour"] is not None else None,
        "nonpreemptible": o["nonpreemptible"],
        "min_on_demand": int(o["min_on_demand"]),
        "serialized": o["serialized"],
        "single_use_containers": o["single_use_containers"],
        "enable_memory_snapshot": o["enable_memory_snapshot"],
        "block_network": o["block_network"],
        "include_source": include_source,
        "experimental_options": o["experimental_options"],
        "routing_region": o["routing_region"],
        "restrict_modal_access": o["restrict_modal_access"],
        "restrict_output": o["_experimental_restrict_output"],
        "i6pn": o["i6pn"],
    }


def volume_fields(volumes: Mapping[str, Volume | CloudBucketMount]) -> dict[str, Any]:
    """The spec's fields for ``volumes=``: ``volumes``, ``volume_options`` (views made by
    ``Volume.with_mount_options``), ``create_volumes``, ``bucket_mounts``; and ``bucket_secrets``, the names of
    the buckets' secrets (for the caller to add to the function's secrets)."""
    vols = {p: v for p, v in volumes.items() if isinstance(v, Volume)}
    buckets = {p: b for p, b in volumes.items() if isinstance(b, CloudBucketMount)}
    secrets = [b.secret.name for b in buckets.values() if b.secret is not None]
    if len(set(secrets)) > 1:
        # One environment per container: two buckets' AWS_ACCESS_KEY_ID would overwrite each other.
        raise InvalidError(
            "volumes: CloudBucketMounts with different secrets in one function are not supported (their "
            "AWS_* keys would share the container's environment). Use one secret for every bucket mount."
        )
    return {
        "volumes": tuple(sorted((p, v._mount_ref()) for p, v in vols.items())),
        "volume_options": tuple(
            sorted(
                (p, v.read_only, v.sub_path or "")
                for p, v in vols.items()
                if v.read_only or v.sub_path is not None
            )
        ),
        "create_volumes": tuple(
            sorted({v.name for v in vols.values() if v.create_if_missing and v.name is not None})
        ),
        "bucket_mounts": tuple(b.to_spec(p) for p, b in sorted(buckets.items())),
        "bucket_secrets": sorted(set(secrets)),
    }


def _bucket_secret(volumes: Mapping[str, Volume | CloudBucketMount], name: str) -> Secret:
    for v in volumes.values():
        if isinstance(v, CloudBucketMount) and v.secret is not None and v.secret.name == name:
            return v.secret
    raise AssertionError(name)


def check_importable(obj: Any, kind: str, serialized: bool) -> None:
    qualname = getattr(obj, "__qualname__", "")
    label = f"{kind} {qualname}"
    if "<locals>" in qualname or "<lambda>" in qualname:
        if not serialized:
            raise InvalidError(
                f"The {label} is defined inside another function (or is a lambda), so workers cannot import it "
                "by name. Define it at module level (global scope), or pass serialized=True to ship it with "
                "cloudpickle."
            )
    elif "." in qualname and kind == "function":
        owner = qualname.rsplit(".", 1)[0]
        raise InvalidError(
            f"{qualname} is a method of class {owner}; @app.function() cannot decorate methods. Decorate the "
            f"class with @app.cls() and the method with @cloudmodal.method()."
        )


def function_spec(
    f: Any, o: Mapping[str, Any], defaults: AppDefaults, replace: frozenset[str] = frozenset()
) -> tuple[FunctionSpec, Callable[..., Any]]:
    """The spec of ``@app.function(**options)`` applied to ``f`` (a function, or a marker around one), and the
    raw function."""
    where = "@app.function"
    pf: _PartialFunction | None = None
    if isinstance(f, Decorated):
        raise InvalidError(
            f"{where}() was applied to {f!r}, which is already decorated. Decorate each function once."
        )
    if isinstance(f, _PartialFunction):
        pf = f
        if pf.user_cls is not None:
            raise TypeError(
                f"@app.function() cannot decorate the class {pf.user_cls.__name__}. Use @app.cls() for classes."
            )
        if pf.flags & _Flags.lifecycle():
            raise InvalidError(
                f"{pf._name()} has @cloudmodal.enter/@cloudmodal.exit, which only work on methods of "
                "@app.cls classes. Remove it, or move the function into a class."
            )
        if pf.flags & _Flags.METHOD:
            raise InvalidError(
                f"@cloudmodal.method() on {pf._name()}: it is for methods of @app.cls classes. For a plain "
                "function, remove @cloudmodal.method(); @app.function() is enough."
            )
        raw_f = pf.raw_f
    else:
        raw_f = f
    if isinstance(raw_f, type):
        raise TypeError(
            f"@app.function() cannot decorate the class {raw_f.__name__}. Use @app.cls() for classes "
            "(and @cloudmodal.method() on the methods to expose)."
        )
    if not callable(raw_f):
        raise InvalidError(f"@app.function() must decorate a function, not {raw_f!r}.")
    assert raw_f is not None
    check_importable(raw_f, "function", o["serialized"])
    name = o["name"] or raw_f.__qualname__
    is_generator = o["is_generator"]
    if is_generator is None:
        is_generator = (
            pf.is_generator
            if pf
            else (inspect.isgeneratorfunction(raw_f) or inspect.isasyncgenfunction(raw_f))
        )
    is_async = inspect.iscoroutinefunction(raw_f) or inspect.isasyncgenfunction(raw_f)
    web: WebConfig | None = pf.params.web if pf else None
    concurrency = batching = None
    if pf and pf.params.max_inputs is not None:
        concurrency = ConcurrencyConfig(pf.params.max_inputs, pf.params.target_inputs)
    if pf and pf.params.max_batch_size is not None:
        batching = BatchConfig(pf.params.max_batch_size, pf.params.wait_ms or 0)

    if o["schedule"] is not None and not is_nullary(raw_f):
        raise InvalidError(
            f"Function {name} has a schedule, so it needs to support being called with no arguments. "
            "Give every parameter a default, or call a function with arguments from a scheduled one."
        )
    retries = o["retries"]
    if retries is not None and retries.max_retries > 0:
        if web is not None:
            raise InvalidError(
                f"Web endpoints do not support retries ({name}). Remove retries=...; HTTP clients retry requests."
            )
        if is_generator:
            raise InvalidError(
                f"Generator functions do not support retries ({name}): a retry would repeat values already "
                "yielded. Remove retries=..., or return a list instead of yielding."
            )
    if web is not None and is_generator:
        hint = (
            " For a streaming response, return a StreamingResponse instead."
            if web.kind == "fastapi_endpoint"
            else ""
        )
        raise InvalidError(f"Web endpoints cannot be generators ({name}).{hint}")
    if batching is not None:
        check_batched(raw_f, name, is_generator, skip_self=False)

    fields = common_fields(o, where, defaults, replace)
    spec = FunctionSpec(
        name=name,
        module=_module_name(raw_f),
        qualname=raw_f.__qualname__,
        kind="function",
        source_file=_source_file(raw_f),
        concurrency=concurrency,
        batching=batching,
        is_generator=bool(is_generator),
        is_async=is_async,
        schedule=o["schedule"].to_wire() if o["schedule"] is not None else None,
        web=web,
        **fields,
    )
    return spec, raw_f


def cls_spec(
    obj: Any, o: Mapping[str, Any], defaults: AppDefaults, replace: frozenset[str] = frozenset()
) -> tuple[FunctionSpec, type]:
    """The spec of ``@app.cls(**options)`` applied to ``obj`` (a class, or a ``@concurrent`` marker around
    one), and the class."""
    concurrency = None
    if isinstance(obj, Decorated):
        raise InvalidError(
            f"@app.cls() was applied to {obj!r}, which is already decorated. Decorate each class once."
        )
    if isinstance(obj, _PartialFunction):
        if obj.user_cls is None:
            raise InvalidError(
                f"@app.cls() decorates classes; {obj._name()} is a function. Use @app.function() for functions."
            )
        concurrency = ConcurrencyConfig(obj.params.max_inputs, obj.params.target_inputs)  # type: ignore[arg-type]
        user_cls: type[object] = obj.user_cls
    elif isinstance(obj, type):
        user_cls = obj
    else:
        raise InvalidError(f"@app.cls() decorates classes, not {obj!r}. For a function use @app.function().")
    cname = user_cls.__name__
    if user_cls.__init__ is not object.__init__:
        raise InvalidError(
            f"Class {cname} cannot have a custom constructor (__init__). Declare its inputs as parameters, "
            "`name: int = cloudmodal.parameter(default=0)`, and move setup work into a method decorated with "
            "@cloudmodal.enter()."
        )
    check_importable(user_cls, "class", o["serialized"])
    parameters = get_parameters(user_cls)

    for mname in find_partial_methods(user_cls, _Flags.CONCURRENT):
        raise InvalidError(
            f"@cloudmodal.concurrent is on the method {cname}.{mname}; on a class it applies to the whole "
            f"class. Move it onto the class:\n\n@app.cls()\n@cloudmodal.concurrent(max_inputs=...)\nclass {cname}: ..."
        )
    interface = find_partial_methods(user_cls, _Flags.interface())
    batched = [m for m, pf in interface.items() if pf.flags & _Flags.BATCHED]
    if len(batched) > 1:
        raise InvalidError(
            f"Class {cname} has {len(batched)} @cloudmodal.batched methods ({', '.join(batched)}); a class "
            "can have only one. Split them into separate classes."
        )
    if batched and len(interface) > 1:
        others = [m for m in interface if m not in batched]
        raise InvalidError(
            f"Class {cname} has a @cloudmodal.batched method ({batched[0]}), so it cannot have other methods "
            f"({', '.join(others)}). Move them into another class."
        )
    snap = find_partial_methods(user_cls, _Flags.ENTER_PRE_SNAPSHOT)
    if snap and not o["enable_memory_snapshot"]:
        raise InvalidError(
            f"{cname}.{next(iter(snap))} uses @cloudmodal.enter(snap=True), which needs memory snapshots: "
            "pass enable_memory_snapshot=True to @app.cls(), or use @cloudmodal.enter() without snap."
        )
    for mname, pf in find_partial_methods(user_cls, _Flags.lifecycle()).items():
        if pf.raw_f is not None and not is_nullary(pf.raw_f, skip_self=True):
            raise InvalidError(
                f"Lifecycle method {cname}.{mname} must take only `self` (it is called with no arguments)."
            )

    methods, generators, asyncs, web_methods = [], [], [], []
    batching = None
    for mname, pf in interface.items():
        methods.append(mname)
        if pf.is_generator:
            generators.append(mname)
        if pf.is_async:
            asyncs.append(mname)
        if pf.params.web is not None:
            if pf.is_generator:
                raise InvalidError(f"Web endpoints cannot be generators ({cname}.{mname}).")
            web_methods.append((mname, pf.params.web))
        if pf.flags & _Flags.BATCHED:
            assert pf.raw_f is not None
            check_batched(pf.raw_f, f"{cname}.{mname}", pf.is_generator, skip_self=True)
            batching = BatchConfig(pf.params.max_batch_size or 1, pf.params.wait_ms or 0)

    fields = common_fields(o, "@app.cls", defaults, replace)
    spec = FunctionSpec(
        name=cname,
        module=_module_name(user_cls),
        qualname=user_cls.__qualname__,
        kind="cls",
        source_file=_source_file(user_cls),
        concurrency=concurrency,
        batching=batching,
        methods=tuple(methods),
        generator_methods=tuple(generators),
        async_methods=tuple(asyncs),
        web_methods=tuple(web_methods),
        parameters=tuple((n, t.__name__, None if d is NO_DEFAULT else d) for n, t, d in parameters),
        **fields,
    )
    return spec, user_cls
