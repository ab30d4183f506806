"""``cloudmodal.App``: the decorators that turn user code into validated :class:`~cloudmodal.spec.FunctionSpec`s.

Everything here is pure: options are checked when ``@app.function(...)`` / ``@app.cls(...)`` runs (errors say
what is wrong and how to fix it), and the result is a :class:`~cloudmodal.functions.Function` or
:class:`~cloudmodal.functions.Cls` handle holding the spec. Running things is the runtime's business.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
import posixpath
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any, TypeGuard

from cloudmodal.exception import DeprecationError, InvalidError
from cloudmodal.functions import Cls, Function
from cloudmodal.gpu import parse_gpu
from cloudmodal.image import Image
from cloudmodal.partial_function import (
    NO_DEFAULT,
    _Flags,
    _PartialFunction,
    bind_parameters,
    find_lifecycle_hooks,
    find_partial_methods,
    get_parameters,
    instantiate,
    is_nullary,
    run_lifecycle_hooks,
)
from cloudmodal.retries import parse_retries
from cloudmodal.schedule import Cron, Period
from cloudmodal.secret import Secret, check_object_name, inline_secret_registry
from cloudmodal.spec import AutoscalerSettings, BatchConfig, ConcurrencyConfig, FunctionSpec, WebConfig
from cloudmodal.volume import Volume

__all__ = [
    "App",
    "LocalEntrypoint",
    "CLOUDS",
    "FUNCTION_OPTIONS",
    "CLS_OPTIONS",
    "WITH_OPTIONS",
    # class helpers for the runtime (defined in cloudmodal.partial_function)
    "bind_parameters",
    "find_lifecycle_hooks",
    "get_parameters",
    "instantiate",
    "run_lifecycle_hooks",
]

CLOUDS = ("aws", "gcp", "azure", "lambda", "local", "sim", "auto")
SPOT_POLICIES = ("allow", "require", "never")
MAX_TIMEOUT = 24 * 60 * 60
MAX_EPHEMERAL_DISK_MIB = 3 * 1024 * 1024  # 3 TiB
_RESERVED_MOUNTS = ("/", "/root", "/tmp")
_TAG_RE = re.compile(r"^[a-zA-Z0-9._-]{1,63}$")
_FUNCTION_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,128}$")

# Every keyword Modal 1.6 accepts on @app.function, with cloudmodal's defaults, plus our own two.
_DEFAULTS: dict[str, Any] = {
    "image": None,
    "schedule": None,
    "env": None,
    "secrets": (),
    "gpu": None,
    "serialized": False,
    "network_file_systems": None,
    "volumes": None,
    "cpu": None,
    "memory": None,
    "ephemeral_disk": None,
    "min_containers": None,
    "max_containers": None,
    "buffer_containers": None,
    "scaledown_window": None,
    "proxy": None,
    "retries": None,
    "timeout": 300,
    "startup_timeout": None,
    "name": None,
    "is_generator": None,
    "cloud": None,
    "region": None,
    "routing_region": None,
    "nonpreemptible": False,
    "enable_memory_snapshot": False,
    "block_network": False,
    "restrict_modal_access": False,
    "single_use_containers": False,
    "i6pn": None,
    "include_source": None,
    "experimental_options": None,
    "_experimental_restrict_output": False,
    "max_inputs": None,
    # cloudmodal's own
    "spot": "allow",
    "max_price_per_hour": None,
    "min_on_demand": 0,
}
FUNCTION_OPTIONS: tuple[str, ...] = tuple(_DEFAULTS)
_FUNCTION_ONLY = ("schedule", "name", "is_generator")
CLS_OPTIONS: tuple[str, ...] = tuple(k for k in _DEFAULTS if k not in _FUNCTION_ONLY)
# What Function.with_options / Cls.with_options may change (Modal's list, plus min_containers and ours).
WITH_OPTIONS: tuple[str, ...] = (
    "cpu",
    "memory",
    "gpu",
    "env",
    "secrets",
    "volumes",
    "retries",
    "min_containers",
    "max_containers",
    "buffer_containers",
    "scaledown_window",
    "timeout",
    "region",
    "cloud",
    "spot",
    "max_price_per_hour",
)

# Removed/renamed options: raise DeprecationError naming the replacement. (old -> (new, how))
_RENAMED: dict[str, tuple[str, str]] = {
    "keep_warm": ("min_containers", "min_containers={v!r}"),
    "concurrency_limit": ("max_containers", "max_containers={v!r}"),
    "container_idle_timeout": ("scaledown_window", "scaledown_window={v!r}"),
    "allow_concurrent_inputs": (
        "@cloudmodal.concurrent",
        "@cloudmodal.concurrent(max_inputs={v!r}) under @app.function() (for @app.cls, on the class)",
    ),
    "_experimental_buffer_containers": ("buffer_containers", "buffer_containers={v!r}"),
    "checkpointing_enabled": ("enable_memory_snapshot", "enable_memory_snapshot={v!r}"),
    "secret": ("secrets", "secrets=[{v!r}]"),
    "mounts": (
        "Image.add_local_python_source / Image.add_local_dir",
        "image=cloudmodal.Image.debian_slim().add_local_python_source('your_module')",
    ),
    "_experimental_scheduler_placement": ("region / nonpreemptible", "region=... or nonpreemptible=True"),
}


def _fail(where: str, option: str, problem: str, fix: str) -> InvalidError:
    return InvalidError(f"{where}({option}=...): {problem} {fix}")


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: object) -> TypeGuard[int | float]:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _whole_seconds(where: str, option: str, v: object, *, allow_none: bool) -> int | None:
    if v is None:
        if allow_none:
            return None
        raise _fail(
            where,
            option,
            f"{option}=None is not allowed: every input needs a time limit.",
            f"Pass a number of seconds from 1 to {MAX_TIMEOUT} (24 h); the default is 300. "
            "See https://modal.com/docs/guide/timeouts.",
        )
    if not _is_number(v) or float(v) != int(v):
        raise _fail(where, option, f"{v!r} is not a whole number of seconds.", f"E.g. {option}=600.")
    n = int(v)
    if not 1 <= n <= MAX_TIMEOUT:
        raise _fail(
            where,
            option,
            f"{n} s is out of range.",
            f"It must be between 1 and {MAX_TIMEOUT} seconds (24 h). For longer jobs, checkpoint and chain calls.",
        )
    return n


def _check_bool(where: str, option: str, v: object, *, allow_none: bool = False) -> bool | None:
    if v is None and allow_none:
        return None
    if not isinstance(v, bool):
        raise _fail(where, option, f"expected True or False, got {v!r}.", f"E.g. {option}=True.")
    return v


def _resources(where: str, option: str, v: object, *, unit: str, integer: bool) -> tuple[Any, Any]:
    """cpu/memory: a number or (request, limit)."""
    label = "CPU" if option == "cpu" else "Memory"
    example = "cpu=2.0 or cpu=(1.0, 4.0)" if option == "cpu" else "memory=4096 or memory=(2048, 8192)"
    if v is None:
        return None, None

    def one(x: object, what: str) -> Any:
        ok = _is_int(x) if integer else _is_number(x)
        if not ok:
            kind = "a whole number of MiB" if integer else "a number of cores"
            raise _fail(where, option, f"{what} {x!r} is not {kind}.", f"E.g. {example}.")
        if x <= 0:  # type: ignore[operator]
            raise _fail(
                where, option, f"{label} {what} must be a positive number, got {x!r}.", f"E.g. {example}."
            )
        return x

    if isinstance(v, tuple | list):
        if len(v) != 2:
            raise _fail(where, option, f"expected (request, limit), got {v!r}.", f"E.g. {example}.")
        request, limit = one(v[0], "request"), one(v[1], "limit")
        if limit < request:
            raise _fail(
                where,
                option,
                f"Cannot specify a {label.lower() if label == 'Memory' else label} limit lower than request: "
                f"{limit} < {request}.",
                "Make the limit at least the request.",
            )
        return request, limit
    return one(v, "request"), None


def _check_volumes(where: str, volumes: Mapping[Any, Any]) -> dict[str, Volume]:
    if not isinstance(volumes, Mapping):
        raise _fail(
            where,
            "volumes",
            f"expected a dict of mount path to Volume, got {type(volumes).__name__}.",
            "E.g. volumes={'/data': cloudmodal.Volume.from_name('data', create_if_missing=True)}.",
        )
    out: dict[str, Volume] = {}
    seen: dict[Volume, str] = {}
    for path, vol in volumes.items():
        if not isinstance(path, str | PurePosixPath):
            raise _fail(
                where,
                "volumes",
                f"mount path {path!r} is not a string.",
                "Use an absolute path like '/data'.",
            )
        p = str(path)
        if not p.startswith("/"):
            raise _fail(
                where,
                "volumes",
                f"mount path {p!r} is not absolute.",
                f"Use an absolute path, e.g. '/{p.lstrip('./')}'.",
            )
        canonical = posixpath.normpath(p)
        if canonical.startswith("//"):
            canonical = "/" + canonical.lstrip("/")
        if canonical != p:
            raise _fail(
                where, "volumes", f"mount path {p!r} is not canonical.", f"Write it as {canonical!r}."
            )
        if p in _RESERVED_MOUNTS:
            raise _fail(
                where,
                "volumes",
                f"a volume cannot be mounted at {p!r} ({', '.join(_RESERVED_MOUNTS)} are reserved).",
                f"Mount it somewhere else, e.g. '/data' or '{p.rstrip('/')}/data'.",
            )
        if not isinstance(vol, Volume):
            raise _fail(
                where,
                "volumes",
                f"the value at {p!r} is {type(vol).__name__}, not a cloudmodal.Volume.",
                "Use cloudmodal.Volume.from_name('name', create_if_missing=True).",
            )
        if vol in seen:
            raise _fail(
                where,
                "volumes",
                f"volume {vol.name!r} is mounted at both {seen[vol]!r} and {p!r}.",
                "Mount each volume once (use subdirectories of one mount path instead).",
            )
        seen[vol] = p
        out[p] = vol
    return out


def _check_secrets(where: str, secrets: object) -> tuple[Secret, ...]:
    if isinstance(secrets, Secret):
        raise _fail(
            where,
            "secrets",
            "expects a list of secrets, got a single Secret.",
            "Wrap it: secrets=[my_secret].",
        )
    if not isinstance(secrets, Sequence | set | frozenset) or isinstance(secrets, str):
        raise _fail(
            where,
            "secrets",
            f"expects a list of cloudmodal.Secret, got {type(secrets).__name__}.",
            "E.g. secrets=[cloudmodal.Secret.from_name('my-secret')].",
        )
    for s in secrets:
        if not isinstance(s, Secret):
            raise _fail(
                where,
                "secrets",
                f"{s!r} is not a cloudmodal.Secret.",
                "Use cloudmodal.Secret.from_name(...), Secret.from_dict({...}) or Secret.from_dotenv().",
            )
    return tuple(secrets)


def _check_env(where: str, env: object) -> tuple[tuple[str, str], ...]:
    if env is None:
        return ()
    if not isinstance(env, Mapping):
        raise _fail(
            where,
            "env",
            f"expected a dict of str to str, got {type(env).__name__}.",
            "E.g. env={'MODE': 'prod'}.",
        )
    out = []
    for k, v in env.items():
        if not isinstance(k, str) or not k or "=" in k:
            raise _fail(
                where, "env", f"invalid variable name {k!r}.", "Use non-empty names without '=', e.g. 'MODE'."
            )
        if v is None:
            continue
        if not isinstance(v, str):
            raise _fail(
                where,
                "env",
                f"the value of {k!r} is {type(v).__name__} ({v!r}), not a string.",
                f"Write {{{k!r}: str({v!r})}}.",
            )
        out.append((k, v))
    return tuple(out)


def _check_keys(where: str, kwargs: Mapping[str, Any], allowed: Sequence[str]) -> None:
    """Reject renamed and unknown keywords, naming the replacement or the closest valid one."""
    for key, value in kwargs.items():
        if key in _RENAMED:
            new, how = _RENAMED[key]
            raise DeprecationError(
                f"{where}({key}=...) was removed (as in Modal 1.0): it is now `{new}`. "
                f"Replace {key}={value!r} with {how.format(v=value)}."
            )
    unknown = [k for k in kwargs if k not in allowed]
    if unknown:
        k = unknown[0]
        if k in _FUNCTION_ONLY and where == "@app.cls":
            raise InvalidError(
                f"@app.cls does not take {k}=: it applies to @app.function only"
                + (" (schedule a function that calls the class instead)." if k == "schedule" else ".")
            )
        close = difflib.get_close_matches(k, allowed, n=3, cutoff=0.6)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise InvalidError(
            f"{where}() got an unexpected keyword argument {k!r}.{hint} Valid options: {', '.join(allowed)}."
        )


def _check_options(where: str, kwargs: dict[str, Any], allowed: Sequence[str]) -> dict[str, Any]:
    """Reject renamed/unknown keywords, validate and normalize every value, and check the values against each
    other. Returns a full options dict. The decorators and ``with_options`` both come through here (see
    :meth:`App._variant_spec`), so a variant can never hold a combination the decorator refuses."""
    _check_keys(where, kwargs, allowed)
    o = dict(_DEFAULTS)
    o.update(kwargs)
    w = where

    if o["image"] is not None and not isinstance(o["image"], Image):
        raise _fail(
            w,
            "image",
            f"expected a cloudmodal.Image, got {type(o['image']).__name__}.",
            "Build one with cloudmodal.Image.debian_slim().pip_install(...).",
        )
    sched = o.get("schedule")
    if sched is not None and not isinstance(sched, Cron | Period):
        hint = f"cloudmodal.Cron({sched!r})" if isinstance(sched, str) else "cloudmodal.Period(hours=1)"
        raise _fail(
            w,
            "schedule",
            f"expected cloudmodal.Cron or cloudmodal.Period, got {type(sched).__name__} ({sched!r}).",
            f"E.g. schedule={hint}.",
        )
    o["env"] = _check_env(w, o["env"])
    o["secrets"] = _check_secrets(w, o["secrets"])
    o["gpu"] = parse_gpu(o["gpu"])
    _check_bool(w, "serialized", o["serialized"])
    if o["network_file_systems"]:
        raise _fail(
            w,
            "network_file_systems",
            "NetworkFileSystem is not supported (it is legacy in Modal too).",
            "Use volumes={'/data': cloudmodal.Volume.from_name('data', create_if_missing=True)}.",
        )
    o["volumes"] = _check_volumes(w, o["volumes"] or {})
    o["cpu"] = _resources(w, "cpu", o["cpu"], unit="cores", integer=False)
    o["memory"] = _resources(w, "memory", o["memory"], unit="MiB", integer=True)
    disk = o["ephemeral_disk"]
    if disk is not None and (not _is_int(disk) or not 1 <= disk <= MAX_EPHEMERAL_DISK_MIB):
        raise _fail(
            w,
            "ephemeral_disk",
            f"{disk!r} is not a size in MiB between 1 and {MAX_EPHEMERAL_DISK_MIB} (3 TiB).",
            "E.g. ephemeral_disk=100 * 1024 for 100 GiB.",
        )
    for key in ("min_containers", "max_containers", "buffer_containers"):
        v = o[key]
        if v is not None:
            if not _is_int(v):
                raise _fail(
                    w, key, f"`{key}` must be an int, not {type(v).__name__} ({v!r}).", f"E.g. {key}=1."
                )
            low = 1 if key == "max_containers" else 0
            if v < low:
                raise _fail(w, key, f"`{key}` must be at least {low}, got {v}.", f"E.g. {key}={max(low, 1)}.")
    lo, hi = o["min_containers"], o["max_containers"]
    if lo is not None and hi is not None and hi < lo:
        raise _fail(
            w,
            "min_containers",
            f"`min_containers` ({lo}) cannot be greater than `max_containers` ({hi}).",
            "Lower min_containers or raise max_containers.",
        )
    sd = o["scaledown_window"]
    if sd is not None and (not _is_int(sd) or not 2 <= sd <= 3600):
        raise _fail(
            w,
            "scaledown_window",
            f"`scaledown_window` must be between 2 and 3600 (inclusive) seconds, got {sd!r}.",
            "E.g. scaledown_window=300 keeps idle containers for 5 minutes.",
        )
    if o["proxy"] is not None:
        raise _fail(
            w,
            "proxy",
            "static-IP proxies are not supported: workers use their cloud's own egress.",
            "Remove proxy=..., or restrict access by your cloud's network rules.",
        )
    o["retries"] = parse_retries(o["retries"], f"{w}(retries=...)")
    o["timeout"] = _whole_seconds(w, "timeout", o["timeout"], allow_none=False)
    o["startup_timeout"] = _whole_seconds(w, "startup_timeout", o["startup_timeout"], allow_none=True)
    name = o.get("name")
    if name is not None and (not isinstance(name, str) or not _FUNCTION_NAME_RE.match(name)):
        raise _fail(
            w,
            "name",
            f"invalid function name {name!r}.",
            "Use 1-128 letters, digits, '_', '-' or '.', e.g. name='embed-v2'.",
        )
    _check_bool(w, "is_generator", o["is_generator"], allow_none=True)
    cloud = o["cloud"]
    if cloud is not None:
        if not isinstance(cloud, str) or cloud.lower() not in CLOUDS:
            close = difflib.get_close_matches(str(cloud).lower(), CLOUDS, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise _fail(w, "cloud", f"unknown cloud {cloud!r}.{hint}", f"Valid clouds: {', '.join(CLOUDS)}.")
        o["cloud"] = None if cloud.lower() == "auto" else cloud.lower()
    region = o["region"]
    if region is None:
        o["region"] = ()
    else:
        regions = [region] if isinstance(region, str) else region
        if (
            not isinstance(regions, Sequence)
            or not regions
            or not all(isinstance(r, str) and r.strip() for r in regions)
        ):
            raise _fail(
                w,
                "region",
                f"expected a region name or a list of them, got {region!r}.",
                "E.g. region='us-east-1' or region=['us-east-1', 'us-west-2'].",
            )
        o["region"] = tuple(r.strip() for r in regions)
    if o["routing_region"] is not None and not isinstance(o["routing_region"], str):
        raise _fail(
            w,
            "routing_region",
            f"expected a region name, got {o['routing_region']!r}.",
            "E.g. routing_region='us-east'.",
        )
    for key in (
        "nonpreemptible",
        "enable_memory_snapshot",
        "block_network",
        "restrict_modal_access",
        "single_use_containers",
        "_experimental_restrict_output",
    ):
        _check_bool(w, key, o[key])
    for key in ("i6pn", "include_source"):
        _check_bool(w, key, o[key], allow_none=True)
    exp = o["experimental_options"]
    if exp is not None:
        if not isinstance(exp, Mapping) or not all(isinstance(k, str) for k in exp):
            raise _fail(
                w,
                "experimental_options",
                f"expected a dict with string keys, got {exp!r}.",
                "E.g. experimental_options={'enable_gpu_snapshot': True}.",
            )
        o["experimental_options"] = tuple(sorted((k, str(v)) for k, v in exp.items()))
    else:
        o["experimental_options"] = ()
    mi = o["max_inputs"]
    if mi is not None:
        if not _is_int(mi):
            raise _fail(
                w,
                "max_inputs",
                f"`max_inputs` must be an int, not {type(mi).__name__}.",
                "Use single_use_containers=True.",
            )
        if mi <= 0:
            raise _fail(w, "max_inputs", "`max_inputs` must be positive.", "Use single_use_containers=True.")
        if mi > 1:
            raise _fail(
                w,
                "max_inputs",
                "Only `max_inputs=1` is currently supported.",
                "For one input per container use single_use_containers=True; otherwise remove max_inputs.",
            )
        o["single_use_containers"] = True
    spot = o["spot"]
    if spot not in SPOT_POLICIES:
        raise _fail(
            w,
            "spot",
            f"unknown spot policy {spot!r}.",
            "Use 'allow' (spot when cheaper; the default), 'require' (spot only) or 'never' (on-demand only).",
        )
    if o["nonpreemptible"]:
        if spot == "require":
            raise _fail(
                w,
                "spot",
                "spot='require' contradicts nonpreemptible=True (spot capacity can be preempted).",
                "Remove one of them: nonpreemptible=True already means on-demand only.",
            )
        o["spot"] = "never"
    price = o["max_price_per_hour"]
    if price is not None and (not _is_number(price) or price <= 0):
        raise _fail(
            w,
            "max_price_per_hour",
            f"expected a positive number of dollars per hour, got {price!r}.",
            "E.g. max_price_per_hour=4.0.",
        )
    floor = o["min_on_demand"]
    if not _is_int(floor) or floor < 0:
        raise _fail(
            w,
            "min_on_demand",
            f"expected a whole number of workers >= 0, got {floor!r}.",
            "E.g. min_on_demand=1 keeps one on-demand worker beside the spot ones.",
        )
    if floor and o["spot"] == "require":
        raise _fail(
            w,
            "min_on_demand",
            "an on-demand floor contradicts spot='require'.",
            "Use spot='allow' with min_on_demand, or drop min_on_demand.",
        )
    return o


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


class LocalEntrypoint:
    """A function registered with ``@app.local_entrypoint()``: ``cloudmodal run`` calls it on this machine."""

    def __init__(self, raw_f: Callable[..., Any], app: App, name: str) -> None:
        self.raw_f = raw_f
        self.app = app
        self.name = name
        self.__doc__ = raw_f.__doc__

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.raw_f(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<cloudmodal local entrypoint {self.name}>"


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
        volumes: Mapping[str | PurePosixPath, Volume] | None = None,
        include_source: bool = True,
    ) -> None:
        if name is not None:
            check_object_name(name, "App")
        self._name = name
        self._tags = self._check_tags(tags or {})
        if image is not None and not isinstance(image, Image):
            raise _fail(
                "cloudmodal.App",
                "image",
                f"expected a cloudmodal.Image, got {type(image).__name__}.",
                "Build one with cloudmodal.Image.debian_slim().",
            )
        self._image = image
        self._secrets = _check_secrets("cloudmodal.App", secrets)
        self._volumes = _check_volumes("cloudmodal.App", volumes or {})
        self._include_source = bool(_check_bool("cloudmodal.App", "include_source", include_source))
        self._default_image: Image | None = None
        self._functions: dict[str, Function] = {}
        self._classes: dict[str, Cls] = {}
        self._entrypoints: dict[str, LocalEntrypoint] = {}
        self._inline_secrets: dict[str, dict[str, str]] = {}
        self._running: Any = None  # set by cloudmodal.client.session.run_app while the app runs
        self._remember_inline(self._secrets)

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
    def tags(self) -> dict[str, str]:
        return dict(self._tags)

    @property
    def image(self) -> Image | None:
        return self._image

    @property
    def registered_functions(self) -> dict[str, Function]:
        return dict(self._functions)

    @property
    def registered_classes(self) -> dict[str, Cls]:
        return dict(self._classes)

    @property
    def registered_entrypoints(self) -> dict[str, LocalEntrypoint]:
        return dict(self._entrypoints)

    @property
    def registered_web_endpoints(self) -> list[str]:
        """Names of the web endpoints: ``f`` for functions, ``Cls.method`` for class methods."""
        out: list[str] = []
        for n, f in self._functions.items():
            assert f.spec is not None  # registered handles are this app's own: they always carry a spec
            if f.spec.web is not None:
                out.append(n)
        for n, c in self._classes.items():
            assert c.spec is not None  # as above
            out += [f"{n}.{m}" for m, _ in c.spec.web_methods]
        return out

    def inline_secret_values(self) -> dict[str, dict[str, str]]:
        """Values of the inline secrets (``Secret.from_dict/from_local_environ/from_dotenv``) used by this app,
        by the generated name that specs carry. The runtime uploads these; they never travel inside a spec."""
        return {k: dict(v) for k, v in self._inline_secrets.items()}

    def inline_secret_env(self, spec: FunctionSpec) -> dict[str, str]:
        """The environment variables that ``spec``'s inline secrets contribute, merged in the spec's secret
        order (later secrets win). Named secrets are not included: the control plane resolves those."""
        env: dict[str, str] = {}
        for name in spec.secrets:
            values = self._inline_secrets.get(name)
            if values is None:
                values = inline_secret_registry().get(name)
            if values:
                env.update(values)
        return env

    def _remember_inline(self, secrets: Sequence[Secret]) -> None:
        for s in secrets:
            if s.is_inline:
                self._inline_secrets[s.name] = s.values or {}

    def __repr__(self) -> str:
        return f"App({self._name!r}, functions={list(self._functions)}, classes={list(self._classes)})"

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

        ``client``, ``interactive`` and ``environment_name`` are accepted for Modal compatibility and ignored.
        """
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
        o = _check_options("@app.function", options, FUNCTION_OPTIONS)

        def wrapper(f: Any) -> Function:
            spec, raw_f = self._function_spec(f, o)
            handle = Function._from_local(self, spec, raw_f)
            handle._build = (f, dict(options))  # what with_options rebuilds from
            self._register(spec.name, handle, self._functions, "function")
            return handle

        return wrapper

    def cls(self, _warn_parentheses_missing: Any = None, **options: Any) -> Callable[[Any], Cls]:
        """Decorator: make a class a remote service with lifecycle hooks. Options: see :data:`CLS_OPTIONS`."""
        if _warn_parentheses_missing is not None:
            raise InvalidError(
                "Positional arguments are not allowed. Did you forget parentheses? Suggestion: `@app.cls()`."
            )
        o = _check_options("@app.cls", options, CLS_OPTIONS)

        def wrapper(obj: Any) -> Cls:
            spec, user_cls = self._cls_spec(obj, o)
            handle = Cls._from_local(self, spec, user_cls)
            handle._build = (obj, dict(options))  # what with_options rebuilds from
            self._register(spec.name, handle, self._classes, "class")
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
            tag = name or raw_f.__qualname__
            if tag in self._entrypoints:
                raise InvalidError(
                    f"Duplicate local entrypoint name: {tag}. Local entrypoint names must be unique; "
                    "rename the function or pass name=... ."
                )
            ep = LocalEntrypoint(raw_f, self, tag)
            self._entrypoints[tag] = ep
            return ep

        return wrapper

    def include(self, other: App, inherit_tags: bool = True) -> App:
        """Add another App's functions and classes to this one (e.g. to deploy several modules together)."""
        if not isinstance(other, App):
            raise InvalidError(f"app.include() expects a cloudmodal.App, got {type(other).__name__}.")
        for tag, fn in other._functions.items():
            self._register(tag, fn, self._functions, "function")
        for tag, c in other._classes.items():
            self._register(tag, c, self._classes, "class")
        self._inline_secrets.update(other._inline_secrets)
        if inherit_tags:
            self._tags = {**other._tags, **self._tags}
        return self

    def _register(self, tag: str, handle: Any, registry: dict[str, Any], kind: str) -> None:
        other = self._classes if registry is self._functions else self._functions
        if tag in other:
            raise InvalidError(
                f"App {self._name or ''!r} already has a {'class' if kind == 'function' else 'function'} named {tag!r}. "
                "Give this one another name (name=... for functions, or rename it)."
            )
        if tag in registry and registry[tag] is not handle:
            warnings.warn(
                f"{kind.capitalize()} {tag!r} is defined twice in app {self._name!r}; the later definition wins.",
                stacklevel=3,
            )
        registry[tag] = handle

    def _add_variant(self, handle: Function | Cls) -> None:
        """Make a ``with_options`` variant part of this app, so that running or deploying the app registers it
        like any decorated function (a variant made at module level is usable once the app runs). The same
        options give the same name, so a repeated ``with_options`` replaces its earlier handle silently."""
        assert handle.spec is not None
        registry: dict[str, Any] = self._classes if isinstance(handle, Cls) else self._functions
        registry[handle.spec.name] = handle

    # ---------------------------------------------------------------- spec building

    def _variant_spec(self, handle: Function | Cls, overrides: Mapping[str, Any], name: str) -> FunctionSpec:
        """The spec of ``handle.with_options(**overrides)``, named ``name``: the decorator's own options with
        ``overrides`` on top, checked and built by the decorator's code, so the checks exist once. As in Modal,
        ``secrets`` and ``volumes`` replace the originals (the App's included) and ``env`` is merged over them;
        a variant has no schedule (it belongs to the function it was made from)."""
        assert handle.spec is not None and handle._build is not None
        decorated, options = handle._build
        where = f"{handle.spec.name}.with_options"
        _check_keys(where, overrides, WITH_OPTIONS)
        merged = {**options, **overrides}
        if "env" in overrides:
            merged["env"] = {
                **dict(_check_env(where, options.get("env"))),
                **dict(_check_env(where, overrides["env"])),
            }
        replace = frozenset(k for k in ("secrets", "volumes") if k in overrides)
        if isinstance(handle, Cls):
            o = _check_options(where, merged, CLS_OPTIONS)
            spec, _ = self._cls_spec(decorated, o, replace=replace)
        else:
            merged.pop("schedule", None)
            o = _check_options(where, merged, FUNCTION_OPTIONS)
            spec, _ = self._function_spec(decorated, o, replace=replace)
        return dataclasses.replace(spec, name=name)

    def _common_fields(
        self, o: dict[str, Any], where: str, replace: frozenset[str] = frozenset()
    ) -> dict[str, Any]:
        """Spec fields shared by functions and classes, with the App's defaults merged in (but for the fields
        in ``replace``: a ``with_options`` variant's ``secrets``/``volumes`` replace the App's too)."""
        image = o["image"] or self._image
        if image is None:
            if self._default_image is None:
                self._default_image = Image.debian_slim()
            image = self._default_image
        secrets: dict[str, Secret] = {}
        app_secrets = () if "secrets" in replace else self._secrets
        for s in (*app_secrets, *o["secrets"]):
            secrets.setdefault(s.name, s)
        self._remember_inline(list(secrets.values()))
        self._remember_inline(image.secrets)
        app_volumes = {} if "volumes" in replace else self._volumes
        volumes = {**app_volumes, **o["volumes"]}
        if o["volumes"] and app_volumes:
            volumes = _check_volumes(where, volumes)  # re-check duplicates across the merge
        cpu, cpu_limit = o["cpu"]
        memory, memory_limit = o["memory"]
        autoscaler = AutoscalerSettings(
            min_containers=o["min_containers"] or 0,
            max_containers=o["max_containers"],
            buffer_containers=o["buffer_containers"] or 0,
            scaledown_window=o["scaledown_window"] if o["scaledown_window"] is not None else 60,
        )
        include_source = o["include_source"] if o["include_source"] is not None else self._include_source
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
            "volumes": tuple(sorted((p, v.name) for p, v in volumes.items())),
            "create_volumes": tuple(sorted({v.name for v in volumes.values() if v.create_if_missing})),
            "cloud": o["cloud"],
            "region": o["region"],
            "spot": o["spot"],
            "max_price_per_hour": float(o["max_price_per_hour"])
            if o["max_price_per_hour"] is not None
            else None,
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

    @staticmethod
    def _check_importable(obj: Any, kind: str, serialized: bool) -> None:
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

    def _function_spec(
        self, f: Any, o: dict[str, Any], replace: frozenset[str] = frozenset()
    ) -> tuple[FunctionSpec, Callable[..., Any]]:
        where = "@app.function"
        pf: _PartialFunction | None = None
        if isinstance(f, Function | Cls):
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
        self._check_importable(raw_f, "function", o["serialized"])
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
            self._check_batched(raw_f, name, is_generator, skip_self=False)

        fields = self._common_fields(o, where, replace)
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

    @staticmethod
    def _check_batched(raw_f: Callable[..., Any], name: str, is_generator: bool, *, skip_self: bool) -> None:
        if is_generator:
            raise InvalidError(
                f"Batched function {name} cannot be a generator. Return a list with one result per input."
            )
        params = list(inspect.signature(raw_f).parameters.values())
        if skip_self and params:
            params = params[1:]
        for p in params:
            if p.default is not inspect.Parameter.empty:
                raise InvalidError(
                    f"Batched function {name} does not accept default arguments (`{p.name}` has one). "
                    "Remove the default: each argument arrives as a list."
                )
        if not params:
            raise InvalidError(f"Batched function {name} must take at least one argument (a list of inputs).")

    def _cls_spec(
        self, obj: Any, o: dict[str, Any], replace: frozenset[str] = frozenset()
    ) -> tuple[FunctionSpec, type]:
        concurrency = None
        if isinstance(obj, Function | Cls):
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
            raise InvalidError(
                f"@app.cls() decorates classes, not {obj!r}. For a function use @app.function()."
            )
        cname = user_cls.__name__
        if user_cls.__init__ is not object.__init__:
            raise InvalidError(
                f"Class {cname} cannot have a custom constructor (__init__). Declare its inputs as parameters, "
                "`name: int = cloudmodal.parameter(default=0)`, and move setup work into a method decorated with "
                "@cloudmodal.enter()."
            )
        self._check_importable(user_cls, "class", o["serialized"])
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
                self._check_batched(pf.raw_f, f"{cname}.{mname}", pf.is_generator, skip_self=True)
                batching = BatchConfig(pf.params.max_batch_size or 1, pf.params.wait_ms or 0)

        fields = self._common_fields(o, "@app.cls", replace)
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
