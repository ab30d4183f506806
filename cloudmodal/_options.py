"""Options of ``@app.function`` / ``@app.cls`` / ``with_options``: the names, the defaults and the checks.

:func:`check_options` turns the keywords a user wrote into a full, normalized options dict, or raises an error
that says what is wrong and how to fix it. The decorators and ``with_options`` (through
:func:`variant_options`) both come through it, so a variant can never hold a combination the decorator
refuses. :mod:`cloudmodal._spec_build` turns the checked options into a :class:`~cloudmodal.spec.FunctionSpec`.
"""

from __future__ import annotations

import difflib
import inspect
import math
import posixpath
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import PurePosixPath
from typing import Any, TypeGuard

from cloudmodal.cloud_bucket_mount import CloudBucketMount
from cloudmodal.exception import DeprecationError, InvalidError
from cloudmodal.gpu import parse_gpu
from cloudmodal.image import Image
from cloudmodal.retries import parse_retries
from cloudmodal.schedule import Cron, Period
from cloudmodal.secret import Secret
from cloudmodal.volume import Volume

CLOUDS = ("aws", "gcp", "azure", "lambda", "local", "sim", "auto")
SPOT_POLICIES = ("allow", "require", "never")
MAX_TIMEOUT = 24 * 60 * 60
MAX_EPHEMERAL_DISK_MIB = 3 * 1024 * 1024  # 3 TiB
_RESERVED_MOUNTS = ("/", "/root", "/tmp")
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


def fail(where: str, option: str, problem: str, fix: str) -> InvalidError:
    return InvalidError(f"{where}({option}=...): {problem} {fix}")


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: object) -> TypeGuard[int | float]:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _whole_seconds(where: str, option: str, v: object, *, allow_none: bool) -> int | None:
    if v is None:
        if allow_none:
            return None
        raise fail(
            where,
            option,
            f"{option}=None is not allowed: every input needs a time limit.",
            f"Pass a number of seconds from 1 to {MAX_TIMEOUT} (24 h); the default is 300. "
            "See https://modal.com/docs/guide/timeouts.",
        )
    if not _is_number(v) or float(v) != int(v):
        raise fail(where, option, f"{v!r} is not a whole number of seconds.", f"E.g. {option}=600.")
    n = int(v)
    if not 1 <= n <= MAX_TIMEOUT:
        raise fail(
            where,
            option,
            f"{n} s is out of range.",
            f"It must be between 1 and {MAX_TIMEOUT} seconds (24 h). For longer jobs, checkpoint and chain calls.",
        )
    return n


def check_bool(where: str, option: str, v: object, *, allow_none: bool = False) -> bool | None:
    if v is None and allow_none:
        return None
    if not isinstance(v, bool):
        raise fail(where, option, f"expected True or False, got {v!r}.", f"E.g. {option}=True.")
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
            raise fail(where, option, f"{what} {x!r} is not {kind}.", f"E.g. {example}.")
        if x <= 0:  # type: ignore[operator]
            raise fail(
                where, option, f"{label} {what} must be a positive number, got {x!r}.", f"E.g. {example}."
            )
        return x

    if isinstance(v, tuple | list):
        if len(v) != 2:
            raise fail(where, option, f"expected (request, limit), got {v!r}.", f"E.g. {example}.")
        request, limit = one(v[0], "request"), one(v[1], "limit")
        if limit < request:
            raise fail(
                where,
                option,
                f"Cannot specify a {label.lower() if label == 'Memory' else label} limit lower than request: "
                f"{limit} < {request}.",
                "Make the limit at least the request.",
            )
        return request, limit
    return one(v, "request"), None


def check_volumes(where: str, volumes: Mapping[Any, Any]) -> dict[str, Volume | CloudBucketMount]:
    if not isinstance(volumes, Mapping):
        raise fail(
            where,
            "volumes",
            f"expected a dict of mount path to Volume, got {type(volumes).__name__}.",
            "E.g. volumes={'/data': cloudmodal.Volume.from_name('data', create_if_missing=True)}.",
        )
    out: dict[str, Volume | CloudBucketMount] = {}
    seen: dict[Volume, str] = {}
    for path, vol in volumes.items():
        if not isinstance(path, str | PurePosixPath):
            raise fail(
                where,
                "volumes",
                f"mount path {path!r} is not a string.",
                "Use an absolute path like '/data'.",
            )
        p = str(path)
        if not p.startswith("/"):
            raise fail(
                where,
                "volumes",
                f"mount path {p!r} is not absolute.",
                f"Use an absolute path, e.g. '/{p.lstrip('./')}'.",
            )
        canonical = posixpath.normpath(p)
        if canonical.startswith("//"):
            canonical = "/" + canonical.lstrip("/")
        if canonical != p:
            raise fail(where, "volumes", f"mount path {p!r} is not canonical.", f"Write it as {canonical!r}.")
        if p in _RESERVED_MOUNTS:
            raise fail(
                where,
                "volumes",
                f"a volume cannot be mounted at {p!r} ({', '.join(_RESERVED_MOUNTS)} are reserved).",
                f"Mount it somewhere else, e.g. '/data' or '{p.rstrip('/')}/data'.",
            )
        if isinstance(vol, CloudBucketMount):
            out[p] = vol
            continue
        if not isinstance(vol, Volume):
            raise fail(
                where,
                "volumes",
                f"the value at {p!r} is {type(vol).__name__}, not a cloudmodal.Volume or CloudBucketMount.",
                "Use cloudmodal.Volume.from_name('name', create_if_missing=True) or "
                "cloudmodal.CloudBucketMount('bucket-name').",
            )
        if vol in seen:
            raise fail(
                where,
                "volumes",
                f"volume {vol.name!r} is mounted at both {seen[vol]!r} and {p!r}.",
                "Mount each volume once (use subdirectories of one mount path instead).",
            )
        seen[vol] = p
        out[p] = vol
    return out


def check_secrets(where: str, secrets: object) -> tuple[Secret, ...]:
    if isinstance(secrets, Secret):
        raise fail(
            where,
            "secrets",
            "expects a list of secrets, got a single Secret.",
            "Wrap it: secrets=[my_secret].",
        )
    if not isinstance(secrets, Sequence | set | frozenset) or isinstance(secrets, str):
        raise fail(
            where,
            "secrets",
            f"expects a list of cloudmodal.Secret, got {type(secrets).__name__}.",
            "E.g. secrets=[cloudmodal.Secret.from_name('my-secret')].",
        )
    for s in secrets:
        if not isinstance(s, Secret):
            raise fail(
                where,
                "secrets",
                f"{s!r} is not a cloudmodal.Secret.",
                "Use cloudmodal.Secret.from_name(...), Secret.from_dict({...}) or Secret.from_dotenv().",
            )
    return tuple(secrets)


def check_env(where: str, env: object) -> tuple[tuple[str, str], ...]:
    if env is None:
        return ()
    if not isinstance(env, Mapping):
        raise fail(
            where,
            "env",
            f"expected a dict of str to str, got {type(env).__name__}.",
            "E.g. env={'MODE': 'prod'}.",
        )
    out = []
    for k, v in env.items():
        if not isinstance(k, str) or not k or "=" in k:
            raise fail(
                where, "env", f"invalid variable name {k!r}.", "Use non-empty names without '=', e.g. 'MODE'."
            )
        if v is None:
            continue
        if not isinstance(v, str):
            raise fail(
                where,
                "env",
                f"the value of {k!r} is {type(v).__name__} ({v!r}), not a string.",
                f"Write {{{k!r}: str({v!r})}}.",
            )
        out.append((k, v))
    return tuple(out)


def check_keys(where: str, kwargs: Mapping[str, Any], allowed: Sequence[str]) -> None:
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


def check_options(where: str, kwargs: dict[str, Any], allowed: Sequence[str]) -> dict[str, Any]:
    """Reject renamed/unknown keywords, validate and normalize every value, and check the values against each
    other. Returns a full options dict (every key of ``_DEFAULTS``)."""
    check_keys(where, kwargs, allowed)
    o = dict(_DEFAULTS)
    o.update(kwargs)
    w = where

    if o["image"] is not None and not isinstance(o["image"], Image):
        raise fail(
            w,
            "image",
            f"expected a cloudmodal.Image, got {type(o['image']).__name__}.",
            "Build one with cloudmodal.Image.debian_slim().pip_install(...).",
        )
    sched = o.get("schedule")
    if sched is not None and not isinstance(sched, Cron | Period):
        hint = f"cloudmodal.Cron({sched!r})" if isinstance(sched, str) else "cloudmodal.Period(hours=1)"
        raise fail(
            w,
            "schedule",
            f"expected cloudmodal.Cron or cloudmodal.Period, got {type(sched).__name__} ({sched!r}).",
            f"E.g. schedule={hint}.",
        )
    o["env"] = check_env(w, o["env"])
    o["secrets"] = check_secrets(w, o["secrets"])
    o["gpu"] = parse_gpu(o["gpu"])
    check_bool(w, "serialized", o["serialized"])
    if o["network_file_systems"]:
        raise fail(
            w,
            "network_file_systems",
            "NetworkFileSystem is not supported (it is legacy in Modal too).",
            "Use volumes={'/data': cloudmodal.Volume.from_name('data', create_if_missing=True)}.",
        )
    o["volumes"] = check_volumes(w, o["volumes"] or {})
    o["cpu"] = _resources(w, "cpu", o["cpu"], unit="cores", integer=False)
    o["memory"] = _resources(w, "memory", o["memory"], unit="MiB", integer=True)
    disk = o["ephemeral_disk"]
    if disk is not None and (not _is_int(disk) or not 1 <= disk <= MAX_EPHEMERAL_DISK_MIB):
        raise fail(
            w,
            "ephemeral_disk",
            f"{disk!r} is not a size in MiB between 1 and {MAX_EPHEMERAL_DISK_MIB} (3 TiB).",
            "E.g. ephemeral_disk=100 * 1024 for 100 GiB.",
        )
    for key in ("min_containers", "max_containers", "buffer_containers"):
        v = o[key]
        if v is not None:
            if not _is_int(v):
                raise fail(
                    w, key, f"`{key}` must be an int, not {type(v).__name__} ({v!r}).", f"E.g. {key}=1."
                )
            low = 1 if key == "max_containers" else 0
            if v < low:
                raise fail(w, key, f"`{key}` must be at least {low}, got {v}.", f"E.g. {key}={max(low, 1)}.")
    lo, hi = o["min_containers"], o["max_containers"]
    if lo is not None and hi is not None and hi < lo:
        raise fail(
            w,
            "min_containers",
            f"`min_containers` ({lo}) cannot be greater than `max_containers` ({hi}).",
            "Lower min_containers or raise max_containers.",
        )
    sd = o["scaledown_window"]
    if sd is not None and (not _is_int(sd) or not 2 <= sd <= 3600):
        raise fail(
            w,
            "scaledown_window",
            f"`scaledown_window` must be between 2 and 3600 (inclusive) seconds, got {sd!r}.",
            "E.g. scaledown_window=300 keeps idle containers for 5 minutes.",
        )
    if o["proxy"] is not None:
        raise fail(
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
        raise fail(
            w,
            "name",
            f"invalid function name {name!r}.",
            "Use 1-128 letters, digits, '_', '-' or '.', e.g. name='embed-v2'.",
        )
    check_bool(w, "is_generator", o["is_generator"], allow_none=True)
    cloud = o["cloud"]
    if cloud is not None:
        if not isinstance(cloud, str) or cloud.lower() not in CLOUDS:
            close = difflib.get_close_matches(str(cloud).lower(), CLOUDS, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise fail(w, "cloud", f"unknown cloud {cloud!r}.{hint}", f"Valid clouds: {', '.join(CLOUDS)}.")
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
            raise fail(
                w,
                "region",
                f"expected a region name or a list of them, got {region!r}.",
                "E.g. region='us-east-1' or region=['us-east-1', 'us-west-2'].",
            )
        o["region"] = tuple(r.strip() for r in regions)
    if o["routing_region"] is not None and not isinstance(o["routing_region"], str):
        raise fail(
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
        check_bool(w, key, o[key])
    for key in ("i6pn", "include_source"):
        check_bool(w, key, o[key], allow_none=True)
    exp = o["experimental_options"]
    if exp is not None:
        if not isinstance(exp, Mapping) or not all(isinstance(k, str) for k in exp):
            raise fail(
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
            raise fail(
                w,
                "max_inputs",
                f"`max_inputs` must be an int, not {type(mi).__name__}.",
                "Use single_use_containers=True.",
            )
        if mi <= 0:
            raise fail(w, "max_inputs", "`max_inputs` must be positive.", "Use single_use_containers=True.")
        if mi > 1:
            raise fail(
                w,
                "max_inputs",
                "Only `max_inputs=1` is currently supported.",
                "For one input per container use single_use_containers=True; otherwise remove max_inputs.",
            )
        o["single_use_containers"] = True
    spot = o["spot"]
    if spot not in SPOT_POLICIES:
        raise fail(
            w,
            "spot",
            f"unknown spot policy {spot!r}.",
            "Use 'allow' (spot when cheaper; the default), 'require' (spot only) or 'never' (on-demand only).",
        )
    if o["nonpreemptible"]:
        if spot == "require":
            raise fail(
                w,
                "spot",
                "spot='require' contradicts nonpreemptible=True (spot capacity can be preempted).",
                "Remove one of them: nonpreemptible=True already means on-demand only.",
            )
        o["spot"] = "never"
    price = o["max_price_per_hour"]
    if price is not None and (not _is_number(price) or price <= 0):
        raise fail(
            w,
            "max_price_per_hour",
            f"expected a positive number of dollars per hour, got {price!r}.",
            "E.g. max_price_per_hour=4.0.",
        )
    floor = o["min_on_demand"]
    if not _is_int(floor) or floor < 0:
        raise fail(
            w,
            "min_on_demand",
            f"expected a whole number of workers >= 0, got {floor!r}.",
            "E.g. min_on_demand=1 keeps one on-demand worker beside the spot ones.",
        )
    if floor and o["spot"] == "require":
        raise fail(
            w,
            "min_on_demand",
            "an on-demand floor contradicts spot='require'.",
            "Use spot='allow' with min_on_demand, or drop min_on_demand.",
        )
    return o


def variant_options(
    where: str, kind: str, options: Mapping[str, Any], overrides: Mapping[str, Any]
) -> tuple[dict[str, Any], frozenset[str]]:
    """The checked options of a ``with_options`` variant of a function (``kind="function"``) or class
    (``kind="cls"``) decorated with ``options``: ``overrides`` on top, through :func:`check_options`.

    As in Modal, ``secrets`` and ``volumes`` replace the originals (the App's included) and ``env`` is merged
    over them; a variant has no schedule (it belongs to the function it was made from). Returns the options and
    the names of the fields that replace the App's defaults instead of merging with them."""
    check_keys(where, overrides, WITH_OPTIONS)
    merged = {**options, **overrides}
    if "env" in overrides:
        merged["env"] = {
            **dict(check_env(where, options.get("env"))),
            **dict(check_env(where, overrides["env"])),
        }
    replace = frozenset(k for k in ("secrets", "volumes") if k in overrides)
    if kind == "cls":
        return check_options(where, merged, CLS_OPTIONS), replace
    merged.pop("schedule", None)
    return check_options(where, merged, FUNCTION_OPTIONS), replace


def check_batched(raw_f: Callable[..., Any], name: str, is_generator: bool, *, skip_self: bool) -> None:
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
