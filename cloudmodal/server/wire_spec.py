"""Server-side validation of a function's wire spec (:meth:`cloudmodal.spec.FunctionSpec.to_wire`).

The decorators check options when user code is decorated, but the control plane cannot trust its clients: a
spec arrives as data, is stored, and then drives the reconciler, the queue and the workers. A spec is bounded
as a whole first (size, depth, JSON-storable values), then read through the schema
(:mod:`cloudmodal.server.wire_spec_schema`), then checked against the rules the decorators apply between
options, and normalized (GPU tiers, schedules, images to their canonical wire forms), so a stored spec always
reads back with :meth:`FunctionSpec.from_wire` and cannot wedge a pool. Every problem is reported as
:mod:`cloudmodal.server.wire_spec_errors` words it.

``validate_wire_spec`` runs once per function registration (and once per pool version in the reconciler),
never on the call path.
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, ValidationError

from cloudmodal.exception import InvalidError
from cloudmodal.gpu import parse_gpu
from cloudmodal.image import Image
from cloudmodal.server.wire_spec_errors import field_path, invalid, kind_of, one_line, short, validate_model
from cloudmodal.server.wire_spec_schema import CronModel, ImageModel, PeriodModel, SpecModel

__all__ = ["MAX_SPEC_CHARS", "validate_wire_spec"]

MAX_SPEC_CHARS = 2 * 1024 * 1024  # all strings of a spec together (requirements files are the big ones)
MAX_NODES = 100_000  # values in a spec, nested ones included
MAX_DEPTH = 32
_INT64 = 2**63
_LAYER_OPS = (
    "pip_install",
    "uv_pip_install",
    "uv_sync",
    "pip_install_requirements",
    "apt_install",
    "run_commands",
    "env",
    "workdir",
    "add_local_python_source",
    "run_function",
)


def _measure(d: object) -> None:
    """Bounds the whole value before anything walks it: depth, number of values, characters, and only
    JSON-storable values (the spec is stored in a JSON column) with int64 integers and finite floats."""
    nodes = chars = 0
    stack: list[tuple[object, int, str]] = [(d, 0, "spec")]
    while stack:
        v, depth, path = stack.pop()
        nodes += 1
        if nodes > MAX_NODES:
            raise invalid(
                "spec", f"has more than {MAX_NODES} values", "a function spec as the client sends it"
            )
        if depth > MAX_DEPTH:
            raise invalid(path, f"is nested more than {MAX_DEPTH} levels deep")
        if isinstance(v, str):
            chars += len(v)
        elif isinstance(v, bool) or v is None:
            pass
        elif isinstance(v, int):
            if not -_INT64 <= v < _INT64:
                raise invalid(path, "is an integer beyond 64 bits")
        elif isinstance(v, float):
            if not math.isfinite(v):
                raise invalid(path, "is not a finite number")
        elif isinstance(v, dict):
            for k, x in v.items():
                if not isinstance(k, str):
                    raise invalid(path, f"has a key that is {kind_of(k)}, not a string")
                chars += len(k)
                stack.append((x, depth + 1, field_path(path, (k,))))
        elif isinstance(v, list | tuple):
            stack.extend((x, depth + 1, f"{path}[{i}]") for i, x in enumerate(v))
        else:  # bytes included: a JSON column cannot hold them (a class parameter's bytes default either)
            raise invalid(path, f"is {kind_of(v)}, which a spec cannot hold")
        if chars > MAX_SPEC_CHARS:
            raise invalid("spec", f"is larger than {MAX_SPEC_CHARS // (1024 * 1024)} MiB of text")


def _unique(path: str, items: list[Any], what: str) -> None:
    seen: set[Any] = set()
    for i, x in enumerate(items):
        if x in seen:
            raise invalid(f"{path}[{i}]", f"repeats the {what} {short(x)}", f"distinct {what}s")
        seen.add(x)


def _check_gpu(s: SpecModel) -> list[str]:
    if not s.gpu:
        return []
    for i, g in enumerate(s.gpu):
        try:
            parse_gpu(g)
        except InvalidError as e:
            raise invalid(f"spec.gpu[{i}]", f"is not valid: {one_line(str(e))}") from None
    try:
        tiers = parse_gpu(list(s.gpu))
    except InvalidError as e:
        raise invalid("spec.gpu", f"is not valid: {one_line(str(e))}") from None
    return [t.to_wire() for t in tiers]


def _check_schedule(s: SpecModel) -> dict[str, Any] | None:
    from cloudmodal.schedule import schedule_from_wire

    if s.schedule is None:
        return None
    kind = s.schedule.get("type")
    models: dict[str, type[BaseModel]] = {"cron": CronModel, "period": PeriodModel}
    model = models.get(kind) if isinstance(kind, str) else None  # a list or object is not hashable
    if model is None:
        raise invalid("spec.schedule.type", f"{short(kind)} is not 'cron' or 'period'")
    m = validate_model(model, s.schedule, "spec.schedule")
    try:
        return schedule_from_wire(m.model_dump()).to_wire()
    except InvalidError as e:
        raise invalid("spec.schedule", f"is not valid: {one_line(str(e))}") from None


def _check_image(s: SpecModel) -> dict[str, Any] | None:
    if s.image is None:
        if s.image_hash is not None:
            raise invalid("spec.image_hash", "is set without an image", "null when image is null")
        return None
    m: ImageModel = validate_model(ImageModel, s.image, "spec.image")
    for i, layer in enumerate(m.layers):
        op = layer.get("op")
        if op not in _LAYER_OPS:
            raise invalid(
                f"spec.image.layers[{i}].op", f"{short(op)} is not a known layer", ", ".join(_LAYER_OPS)
            )
    wire = m.model_dump(mode="json", exclude_unset=True)  # what the client sent, not our defaults
    try:
        img = Image.from_wire(wire)
        # The runtime reads these derived keys; they must be what the recipe (the hashed part) says.
        derived = {
            "python_version": img.python_version,
            "pip_packages": img.pip_packages,
            "env": img.env_vars,
        }
    except (ValueError, KeyError, TypeError, AttributeError, InvalidError) as e:
        what = (
            "does not match its hash" if "hash" in str(e) else f"has a malformed layer ({type(e).__name__})"
        )
        raise invalid("spec.image", what, "the wire form Image.to_wire() produces") from None
    for key, want in derived.items():
        if getattr(m, key) != want:
            raise invalid(
                f"spec.image.{key}", "does not match the image's layers", "the value the layers imply"
            )
    if s.image_hash is not None and s.image_hash != img.hash:
        raise invalid("spec.image_hash", "does not match spec.image.hash", "the image's hash")
    return wire


def _check_parameters(s: SpecModel) -> None:
    _unique("spec.parameters", [p[0] for p in s.parameters], "parameter name")
    for i, (_name, tname, default) in enumerate(s.parameters):
        path = f"spec.parameters[{i}][2]"
        if default is None:
            continue
        if tname == "bytes":  # a bytes default never gets here (see _measure); nothing else fits
            raise invalid(path, f"is {kind_of(default)}, not bytes", "null (a required bytes parameter)")
        ok = (
            isinstance(default, bool)
            if tname == "bool"
            else isinstance(default, str if tname == "str" else int)
        )
        if not ok or (tname == "int" and isinstance(default, bool)):
            raise invalid(
                path, f"is {kind_of(default)}, not {tname}", f"null (required) or a default of type {tname}"
            )


def _cross_checks(s: SpecModel) -> None:
    """The rules the decorators apply between options."""
    if s.cpu_limit is not None and (s.cpu is None or s.cpu_limit < s.cpu):
        raise invalid(
            "spec.cpu_limit", "is lower than spec.cpu (or cpu is null)", "a limit at least the request"
        )
    if s.memory_limit is not None and (s.memory is None or s.memory_limit < s.memory):
        raise invalid(
            "spec.memory_limit",
            "is lower than spec.memory (or memory is null)",
            "a limit at least the request",
        )
    a = s.autoscaler
    if a.max_containers is not None and a.min_containers > a.max_containers:
        raise invalid(
            "spec.autoscaler.min_containers",
            f"({a.min_containers}) is greater than max_containers ({a.max_containers})",
            "min_containers <= max_containers",
        )
    c = s.concurrency
    if c is not None and c.target_inputs is not None and c.target_inputs > c.max_inputs:
        raise invalid(
            "spec.concurrency.target_inputs",
            f"({c.target_inputs}) is greater than max_inputs ({c.max_inputs})",
            "target_inputs <= max_inputs",
        )
    if s.nonpreemptible and s.spot != "never":
        raise invalid("spec.spot", f"is {s.spot!r} but nonpreemptible is true", "'never' when nonpreemptible")
    if s.min_on_demand and s.spot == "require":
        raise invalid("spec.min_on_demand", "is set with spot='require'", "0 when spot is 'require'")
    if s.retries is not None and s.retries.max_retries > 0:
        if s.web is not None:
            raise invalid(
                "spec.retries", "is set on a web endpoint", "null or max_retries 0 for web endpoints"
            )
        if s.is_generator:
            raise invalid("spec.retries", "is set on a generator", "null or max_retries 0 for generators")
    if s.web is not None and s.is_generator:
        raise invalid("spec.web", "is set on a generator", "null for generators")
    if s.batching is not None and s.is_generator:
        raise invalid("spec.batching", "is set on a generator", "null for generators")
    for path, w in [("spec.web", s.web)] + [
        (f"spec.web_methods[{i}][1]", w) for i, (_, w) in enumerate(s.web_methods)
    ]:
        if w is not None and (w.kind == "web_server") != (w.port is not None):
            raise invalid(
                f"{path}.port", "must be set for web_server only", "a port for web_server, else null"
            )
    if s.kind == "function":
        for key in ("methods", "generator_methods", "async_methods", "web_methods", "parameters"):
            if getattr(s, key):
                raise invalid(f"spec.{key}", "is set on a function", "an empty list unless kind is 'cls'")
    else:
        if s.schedule is not None:
            raise invalid("spec.schedule", "is set on a class", "null unless kind is 'function'")
        if s.web is not None:
            raise invalid("spec.web", "is set on a class", "null for classes (use web_methods)")
    _unique("spec.methods", list(s.methods), "method name")
    methods = set(s.methods)
    for key in ("generator_methods", "async_methods"):
        for i, m in enumerate(getattr(s, key)):
            if m not in methods:
                raise invalid(
                    f"spec.{key}[{i}]", f"{short(m)} is not in spec.methods", "names from spec.methods"
                )
    _unique("spec.web_methods", [m for m, _ in s.web_methods], "method name")
    for i, (m, _) in enumerate(s.web_methods):
        if m not in methods:
            raise invalid(
                f"spec.web_methods[{i}][0]", f"{short(m)} is not in spec.methods", "names from spec.methods"
            )
    _unique("spec.secrets", list(s.secrets), "secret name")
    _unique("spec.env", [k for k, _ in s.env], "variable name")
    _unique("spec.volumes", [p for p, _ in s.volumes], "mount path")
    _unique("spec.volumes", [v for _, v in s.volumes], "volume")
    _unique("spec.volumes", [p for p, _ in s.volumes] + [b.path for b in s.bucket_mounts], "mount path")
    _unique("spec.volume_options", [p for p, _, _ in s.volume_options], "mount path")
    mounted = {p for p, _ in s.volumes}
    for i, (p, _, _) in enumerate(s.volume_options):
        if p not in mounted:
            raise invalid(
                f"spec.volume_options[{i}]",
                f"{short(p)} is not mounted in spec.volumes",
                "paths from spec.volumes",
            )
    secrets = set(s.secrets)
    for i, b in enumerate(s.bucket_mounts):
        if b.secret is not None and b.secret not in secrets:
            raise invalid(
                f"spec.bucket_mounts[{i}].secret",
                f"{short(b.secret)} is not in spec.secrets",
                "names from spec.secrets",
            )
    _unique("spec.region", list(s.region), "region")
    _unique("spec.experimental_options", [k for k, _ in s.experimental_options], "key")
    names = {v for _, v in s.volumes}
    for i, v in enumerate(s.create_volumes):
        if v not in names:
            raise invalid(
                f"spec.create_volumes[{i}]",
                f"{short(v)} is not mounted in spec.volumes",
                "names from spec.volumes",
            )


def validate_wire_spec(d: object, *, ignore_unknown_keys: bool = False) -> dict[str, Any]:
    """Validate a function's wire spec as a client sent it; return its normalized wire form (JSON values).

    Raises :class:`~cloudmodal.exception.InvalidError` naming the field (``spec.autoscaler.min_containers``),
    what is wrong, and what is expected. ``ignore_unknown_keys`` drops keys this version does not know
    instead of refusing them: for rows stored by another version, never for what a client sends.
    """
    if not isinstance(d, dict):
        raise invalid("spec", f"is {kind_of(d)}", "an object (FunctionSpec.to_wire())")
    _measure(d)
    if ignore_unknown_keys:
        d = _drop_unknown(d)
    s: SpecModel = validate_model(SpecModel, d, "spec")
    _cross_checks(s)
    _check_parameters(s)
    out = s.model_dump(mode="json")
    out["gpu"] = _check_gpu(s)
    out["schedule"] = _check_schedule(s)
    out["image"] = _check_image(s)
    return out


def _drop_unknown(d: dict[str, Any]) -> dict[str, Any]:
    d = dict(d)
    for _ in range(16):  # each pass drops what the models reported; a few passes cover every level
        try:
            SpecModel.model_validate(d)
            return d
        except ValidationError as e:
            extra = [
                tuple(err["loc"]) for err in e.errors(include_url=False) if err["type"] == "extra_forbidden"
            ]
            if not extra:
                return d
            for loc in extra:
                d = _without(d, loc)
    return d


def _without(v: Any, loc: tuple[Any, ...]) -> Any:
    """A copy of ``v`` without the key at ``loc`` (copies only along the path)."""
    if not loc:
        return v
    head, rest = loc[0], loc[1:]
    if isinstance(v, dict) and head in v:
        if not rest:
            return {k: x for k, x in v.items() if k != head}
        return {**v, head: _without(v[head], rest)}
    if isinstance(v, list | tuple) and isinstance(head, int) and 0 <= head < len(v):
        items = list(v)
        items[head] = _without(items[head], rest)
        return items
    return v
