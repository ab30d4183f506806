"""Server-side validation of a function's wire spec (:meth:`cloudmodal.spec.FunctionSpec.to_wire`).

The decorators check options when user code is decorated, but the control plane cannot trust its clients: a
spec arrives as data, is stored, and then drives the reconciler, the queue and the workers. These pydantic
models apply the decorators' rules again (types, ranges, allowed names, the rules that tie fields together),
forbid unknown keys as the decorators reject unknown keywords, and bound every string and list, so a stored
spec always reads back with :meth:`FunctionSpec.from_wire` and cannot wedge a pool.

``validate_wire_spec`` runs once per function registration (and once per pool version in the reconciler),
never on the call path.
"""

from __future__ import annotations

import difflib
import math
import posixpath
import re
from collections.abc import Callable
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    StringConstraints,
    ValidationError,
)

from cloudmodal import app as _app_rules
from cloudmodal import partial_function as _pf_rules
from cloudmodal.exception import InvalidError
from cloudmodal.gpu import MAX_GPU_COUNT, parse_gpu
from cloudmodal.image import WIRE_VERSION, Image
from cloudmodal.secret import check_object_name

__all__ = ["MAX_SPEC_CHARS", "validate_wire_spec"]

# Bounds the decorators leave open (they accept any int) but a shared server must not: they fit int32 and
# every real machine, and keep sums and products of them far from overflow.
BIG = 2**31 - 1
MAX_CPU = 4096.0  # cores
MAX_MEMORY_MIB = 64 * 1024 * 1024  # 64 TiB
MAX_PRICE = 100_000.0  # $/h
MAX_SPEC_CHARS = 2 * 1024 * 1024  # all strings of a spec together (requirements files are the big ones)
MAX_NODES = 100_000  # values in a spec, nested ones included
MAX_DEPTH = 32
_INT64 = 2**63
_SHORT = 40  # at most this many characters of a value go into an error message

_CONTROL = r"\x00-\x1f\x7f"
_NO_CONTROL = rf"^[^{_CONTROL}]*$"
_NO_SPACE = rf"^[^\s{_CONTROL}]+$"
_TRIMMED = rf"^[^\s{_CONTROL}]([^{_CONTROL}]*[^\s{_CONTROL}])?$"  # no control characters, no outer spaces
_HEX64 = r"^[0-9a-f]{64}$"
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
CLOUDS = tuple(c for c in _app_rules.CLOUDS if c != "auto")  # the decorator turns "auto" into None
_LAYER_OPS = (
    "pip_install",
    "uv_pip_install",
    "pip_install_requirements",
    "apt_install",
    "run_commands",
    "env",
    "workdir",
    "add_local_python_source",
    "run_function",
)

_CFG = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True, hide_input_in_errors=True)


def _short(v: object) -> str:
    s = repr(v)
    return s if len(s) <= _SHORT else s[: _SHORT - 3] + "..."


def _text(max_len: int, pattern: str = _NO_CONTROL, min_len: int = 1) -> StringConstraints:
    """A string's bounds, as in ``Annotated[StrictStr, _text(256)]``."""
    return StringConstraints(min_length=min_len, max_length=max_len, pattern=pattern)


def _check(fn: Callable[[Any], Any]) -> AfterValidator:
    """An after-validator from a function that raises InvalidError/ValueError: pydantic reports ValueError."""

    def run(v: Any) -> Any:
        try:
            return fn(v)
        except InvalidError as e:
            raise ValueError(_one_line(str(e))) from None

    return AfterValidator(run)


def _one_line(msg: str) -> str:
    """The first line of a message from the decorators' own checks, bounded."""
    msg = msg.split("\n", 1)[0]
    return msg if len(msg) <= 200 else msg[:197] + "..."


def _object_name(kind: str) -> AfterValidator:
    """The validator of a ``kind`` object's name (after ``_text(64)``)."""
    return _check(lambda v: check_object_name(v, kind))


def _identifier(v: str) -> str:
    if not v.isidentifier():
        raise ValueError(f"{_short(v)} is not a Python identifier")
    return v


def _mount_path(p: str) -> str:
    canonical = posixpath.normpath(p)
    if not p.startswith("/"):
        raise ValueError(f"mount path {_short(p)} is not absolute")
    if canonical.startswith("//"):
        canonical = "/" + canonical.lstrip("/")
    if canonical != p:
        raise ValueError(f"mount path {_short(p)} is not canonical (it would be {_short(canonical)})")
    if p in _app_rules._RESERVED_MOUNTS:
        raise ValueError(f"{p!r} is reserved")
    return p


def _env_key(k: str) -> str:
    if "=" in k:
        raise ValueError(f"variable name {_short(k)} contains '='")
    return k


Name = Annotated[StrictStr, _text(256, _NO_SPACE)]
Identifier = Annotated[StrictStr, _text(256), AfterValidator(_identifier)]
SecretName = Annotated[StrictStr, _text(64), _object_name("Secret")]
VolumeName = Annotated[StrictStr, _text(64), _object_name("Volume")]
WebKind = Literal["fastapi_endpoint", "asgi_app", "wsgi_app", "web_server"]
HttpMethod = Literal["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
assert set(get_args(HttpMethod)) == set(_pf_rules.HTTP_METHODS)
EnvPair = tuple[
    Annotated[StrictStr, _text(256), AfterValidator(_env_key)], Annotated[StrictStr, _text(65536, min_len=0)]
]
VolumePair = tuple[Annotated[StrictStr, _text(1024), AfterValidator(_mount_path)], VolumeName]
CloudName = Literal["aws", "gcp", "azure", "lambda", "local", "sim"]
assert get_args(CloudName) == CLOUDS
ImageWireVersion = Literal[1]
assert get_args(ImageWireVersion) == (WIRE_VERSION,)


class RetryModel(BaseModel):
    model_config = _CFG
    max_retries: StrictInt = Field(ge=0, le=BIG, description=f"a whole number from 0 to {BIG}")
    backoff_coefficient: StrictFloat = Field(2.0, ge=1.0, le=10.0, description="a number from 1.0 to 10.0")
    initial_delay: StrictFloat = Field(1.0, ge=0.0, le=60.0, description="seconds from 0 to 60")
    max_delay: StrictFloat = Field(60.0, ge=1.0, le=60.0, description="seconds from 1 to 60")


class AutoscalerModel(BaseModel):
    model_config = _CFG
    min_containers: StrictInt = Field(0, ge=0, le=BIG, description=f"a whole number from 0 to {BIG}")
    max_containers: StrictInt | None = Field(
        None, ge=1, le=BIG, description=f"null (no limit) or a whole number from 1 to {BIG}"
    )
    buffer_containers: StrictInt = Field(0, ge=0, le=BIG, description=f"a whole number from 0 to {BIG}")
    scaledown_window: StrictInt = Field(60, ge=2, le=3600, description="whole seconds from 2 to 3600")


class ConcurrencyModel(BaseModel):
    model_config = _CFG
    max_inputs: StrictInt = Field(ge=1, le=BIG, description=f"a whole number from 1 to {BIG}")
    target_inputs: StrictInt | None = Field(
        None, ge=1, le=BIG, description="null or a whole number from 1 to max_inputs"
    )


class BatchModel(BaseModel):
    model_config = _CFG
    max_batch_size: StrictInt = Field(
        ge=1, le=_pf_rules.MAX_BATCH_SIZE, description=f"a whole number from 1 to {_pf_rules.MAX_BATCH_SIZE}"
    )
    wait_ms: StrictInt = Field(
        ge=0,
        le=_pf_rules.MAX_BATCH_WAIT_MS,
        description=f"whole milliseconds from 0 to {_pf_rules.MAX_BATCH_WAIT_MS}",
    )


class WebModel(BaseModel):
    model_config = _CFG
    kind: WebKind = Field(description="one of fastapi_endpoint, asgi_app, wsgi_app, web_server")
    method: HttpMethod = Field("GET", description=f"one of {', '.join(_pf_rules.HTTP_METHODS)}")
    label: Annotated[StrictStr, _text(63, _pf_rules._LABEL_RE.pattern)] | None = Field(
        None, description="null or 1-63 lowercase letters, digits and '-', not starting or ending with '-'"
    )
    port: StrictInt | None = Field(
        None, ge=1, le=65535, description="a port from 1 to 65535 (web_server only)"
    )
    docs: StrictBool = False
    requires_proxy_auth: StrictBool = False
    startup_timeout: StrictFloat = Field(
        5.0,
        gt=0,
        le=_app_rules.MAX_TIMEOUT,
        description=f"seconds, more than 0 and at most {_app_rules.MAX_TIMEOUT}",
    )


class SpecModel(BaseModel):
    """The wire form of :class:`cloudmodal.spec.FunctionSpec`; field for field, with its defaults."""

    model_config = _CFG
    name: Name = Field(description="1-256 characters without spaces or control characters")
    module: Annotated[StrictStr, _text(256)] = Field(description="a module name, 1-256 characters")
    qualname: Name = Field(description="a qualified name, 1-256 characters without spaces")
    kind: Literal["function", "cls"] = "function"
    source_file: Annotated[StrictStr, _text(4096)] | None = Field(
        None, description="null or the defining file's path, at most 4096 characters"
    )
    gpu: list[Annotated[StrictStr, _text(64)]] = Field(
        default_factory=list,
        max_length=16,
        description=f"a list of GPU types like 'H100' or 'A100-80GB:2' (1 to {MAX_GPU_COUNT} GPUs each)",
    )
    cpu: StrictFloat | None = Field(
        None, gt=0, le=MAX_CPU, description=f"null or cores, more than 0 up to {MAX_CPU:g}"
    )
    cpu_limit: StrictFloat | None = Field(
        None, gt=0, le=MAX_CPU, description=f"null or cores, at least cpu and at most {MAX_CPU:g}"
    )
    memory: StrictInt | None = Field(
        None, ge=1, le=MAX_MEMORY_MIB, description=f"null or MiB from 1 to {MAX_MEMORY_MIB}"
    )
    memory_limit: StrictInt | None = Field(
        None,
        ge=1,
        le=MAX_MEMORY_MIB,
        description=f"null or MiB, at least memory and at most {MAX_MEMORY_MIB}",
    )
    ephemeral_disk: StrictInt | None = Field(
        None,
        ge=1,
        le=_app_rules.MAX_EPHEMERAL_DISK_MIB,
        description=f"null or MiB from 1 to {_app_rules.MAX_EPHEMERAL_DISK_MIB} (3 TiB)",
    )
    timeout: StrictInt = Field(
        300, ge=1, le=_app_rules.MAX_TIMEOUT, description=f"whole seconds from 1 to {_app_rules.MAX_TIMEOUT}"
    )
    startup_timeout: StrictInt | None = Field(
        None,
        ge=1,
        le=_app_rules.MAX_TIMEOUT,
        description=f"null or whole seconds from 1 to {_app_rules.MAX_TIMEOUT}",
    )
    retries: RetryModel | None = Field(
        None, description="null or an object with max_retries, backoff_coefficient, initial_delay, max_delay"
    )
    autoscaler: AutoscalerModel = Field(
        default_factory=AutoscalerModel,  # type: ignore[arg-type]  # pydantic's overloads reject a model class
        description="an object with min_containers, max_containers, buffer_containers, scaledown_window",
    )
    concurrency: ConcurrencyModel | None = Field(
        None, description="null or an object with max_inputs, target_inputs"
    )
    batching: BatchModel | None = Field(None, description="null or an object with max_batch_size, wait_ms")
    is_generator: StrictBool = False
    is_async: StrictBool = False
    schedule: dict[StrictStr, Any] | None = Field(
        None, description="null, {type: 'cron', cron_string, timezone} or {type: 'period', years..seconds}"
    )
    image: dict[StrictStr, Any] | None = Field(
        None, description="null or the wire form of a cloudmodal.Image"
    )
    image_hash: Annotated[StrictStr, _text(64, _HEX64)] | None = Field(
        None, description="null or 64 lowercase hex digits"
    )
    secrets: list[SecretName] = Field(
        default_factory=list, max_length=256, description="a list of at most 256 distinct secret names"
    )
    env: list[EnvPair] = Field(
        default_factory=list,
        max_length=1024,
        description="a list of at most 1024 [NAME, VALUE] string pairs (names without '=', distinct)",
    )
    volumes: list[VolumePair] = Field(
        default_factory=list,
        max_length=64,
        description="a list of at most 64 [absolute mount path, volume name] pairs",
    )
    cloud: CloudName | None = Field(None, description=f"null or one of {', '.join(CLOUDS)}")
    region: list[Annotated[StrictStr, _text(64, _TRIMMED)]] = Field(
        default_factory=list, max_length=32, description="a list of at most 32 region names"
    )
    spot: Literal["allow", "require", "never"] = Field("allow", description="one of allow, require, never")
    max_price_per_hour: StrictFloat | None = Field(
        None, gt=0, le=MAX_PRICE, description=f"null or dollars per hour, more than 0 up to {MAX_PRICE:g}"
    )
    nonpreemptible: StrictBool = False
    min_on_demand: StrictInt = Field(0, ge=0, le=BIG, description=f"a whole number from 0 to {BIG}")
    serialized: StrictBool = False
    web: WebModel | None = None
    methods: list[Identifier] = Field(
        default_factory=list, max_length=1024, description="a list of at most 1024 distinct method names"
    )
    generator_methods: list[Identifier] = Field(
        default_factory=list, max_length=1024, description="a list of names from methods"
    )
    async_methods: list[Identifier] = Field(
        default_factory=list, max_length=1024, description="a list of names from methods"
    )
    parameters: list[tuple[Identifier, Literal["int", "str", "bytes", "bool"], Any]] = Field(
        default_factory=list,
        max_length=256,
        description="a list of at most 256 [name, 'int'|'str'|'bool', default or null] triples",
    )
    single_use_containers: StrictBool = False
    enable_memory_snapshot: StrictBool = False
    block_network: StrictBool = False
    include_source: StrictBool = True
    experimental_options: list[
        tuple[Annotated[StrictStr, _text(256)], Annotated[StrictStr, _text(4096, min_len=0)]]
    ] = Field(
        default_factory=list, max_length=64, description="a list of at most 64 [key, value] string pairs"
    )
    web_methods: list[tuple[Identifier, WebModel]] = Field(
        default_factory=list, max_length=1024, description="a list of [method name, web config] pairs"
    )
    create_volumes: list[VolumeName] = Field(
        default_factory=list, max_length=64, description="a list of names of the volumes in volumes"
    )
    routing_region: Annotated[StrictStr, _text(64, _TRIMMED)] | None = None
    restrict_modal_access: StrictBool = False
    restrict_output: StrictBool = False
    i6pn: StrictBool | None = None


class CronModel(BaseModel):
    model_config = _CFG
    type: Literal["cron"]
    cron_string: Annotated[StrictStr, _text(256)] = Field(
        description="a 5-field cron string such as '0 9 * * 1-5'"
    )
    timezone: Annotated[StrictStr, _text(64)] = Field(
        "UTC", description="an IANA timezone name such as 'UTC'"
    )


_PERIOD_UNIT = Field(0, ge=0, le=BIG, description=f"a whole number from 0 to {BIG}")


class PeriodModel(BaseModel):
    model_config = _CFG
    type: Literal["period"]
    years: StrictInt = _PERIOD_UNIT
    months: StrictInt = _PERIOD_UNIT
    weeks: StrictInt = _PERIOD_UNIT
    days: StrictInt = _PERIOD_UNIT
    hours: StrictInt = _PERIOD_UNIT
    minutes: StrictInt = _PERIOD_UNIT
    seconds: StrictFloat = Field(0, ge=0, le=float(BIG), description="seconds, 0 or more")


class ImageBaseModel(BaseModel):
    model_config = _CFG
    kind: Literal["debian_slim"]
    python_version: Annotated[StrictStr, _text(16)] = Field(
        description="a supported Python version such as '3.11'"
    )
    force_build: StrictBool = False


class ImageModel(BaseModel):
    model_config = _CFG
    version: ImageWireVersion = Field(description=f"{WIRE_VERSION}")
    base: ImageBaseModel
    layers: list[dict[StrictStr, Any]] = Field(
        default_factory=list, max_length=1000, description="at most 1000 layers"
    )
    hash: Annotated[StrictStr, _text(64, _HEX64)] = Field(description="64 lowercase hex digits")
    python_version: Annotated[StrictStr, _text(16)]
    pip_packages: list[Annotated[StrictStr, _text(4096)]] = Field(default_factory=list, max_length=10_000)
    env: dict[
        Annotated[StrictStr, _text(256, _ENV_NAME_RE.pattern)], Annotated[StrictStr, _text(65536, min_len=0)]
    ] = Field(
        default_factory=dict, max_length=1024, description="an object of variable names to string values"
    )


# ------------------------------------------------------------------------------------------ errors


def _kind(v: object) -> str:
    kinds = {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        bytes: "bytes",
        list: "a list",
        tuple: "a list",
        dict: "an object",
        type(None): "null",
    }
    return kinds.get(type(v), type(v).__name__)


_EXPECTED = {
    "int_type": "an integer",
    "float_type": "a number",
    "bool_type": "true or false",
    "string_type": "a string",
    "list_type": "a list",
    "tuple_type": "a list",
    "dict_type": "an object",
    "model_type": "an object",
    "model_attributes_type": "an object",
}


def _path(prefix: str, loc: tuple[Any, ...]) -> str:
    out = prefix
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            s = str(part)
            out += "." + (s if len(s) <= _SHORT and re.fullmatch(r"[A-Za-z0-9_]+", s) else _short(s))
    return out


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _describe(model: type[BaseModel] | None, loc: tuple[Any, ...]) -> tuple[str | None, list[str]]:
    """The description of the field at ``loc`` (the nearest described one), and the keys its model knows."""
    desc: str | None = None
    keys: list[str] = list(model.model_fields) if model else []
    for part in loc:
        if isinstance(part, int):
            continue
        if model is None or part not in model.model_fields:
            break
        info = model.model_fields[part]
        desc = info.description or desc
        model = _model_in(info.annotation)
        keys = list(model.model_fields) if model else []
    return desc, keys


def _problem(err: Any, keys: list[str]) -> str:
    t = err["type"]
    ctx = err.get("ctx") or {}
    v = err.get("input")
    if t == "missing":
        return "is required but missing"
    if t == "extra_forbidden":
        key = str(err["loc"][-1]) if err["loc"] else ""
        close = difflib.get_close_matches(key, keys, n=1)
        return "is not a known key" + (f" (did you mean {close[0]!r}?)" if close else "")
    if t in _EXPECTED:
        return f"must be {_EXPECTED[t]}, not {_kind(v)}"
    if t in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        return f"is out of range ({_short(v)})"
    if t == "finite_number":
        return "must be a finite number"
    if t == "string_too_long":
        return f"is longer than {ctx.get('max_length')} characters"
    if t == "string_too_short":
        return "is empty"
    if t == "too_long":
        return f"has more than {ctx.get('max_length')} items"
    if t == "too_short":
        return f"has fewer than {ctx.get('min_length')} items"
    if t == "string_pattern_mismatch":
        return f"is {_short(v)}, which has characters or a form that is not allowed"
    if t == "literal_error":
        return f"is {_short(v)}, not one of {ctx.get('expected')}"
    if t == "value_error":
        return f"is not valid: {ctx.get('error') or err['msg']}"
    return str(err["msg"])


def _invalid(path: str, problem: str, expected: str | None = None, more: int = 0) -> InvalidError:
    msg = f"Invalid function spec: {path} {problem.rstrip('.')}."
    if expected:
        msg += f" Expected {expected}."
    if more:
        msg += f" ({more} more problem{'s' if more > 1 else ''} after this one.)"
    return InvalidError(msg)


def _validate(model: type[BaseModel], data: Any, prefix: str) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as e:
        errors = e.errors(include_url=False)
        err = errors[0]
        loc = tuple(err["loc"])
        desc, keys = _describe(model, loc[:-1] if err["type"] == "extra_forbidden" else loc)
        if err["type"] == "extra_forbidden":
            desc = None  # the parent's description, not the unknown key's
        raise _invalid(_path(prefix, loc), _problem(err, keys), desc, len(errors) - 1) from None


# ------------------------------------------------------------------------------------------ the checks


def _measure(d: object) -> None:
    """Bounds the whole value before anything walks it: depth, number of values, characters, and only
    JSON-storable values (the spec is stored in a JSON column) with int64 integers and finite floats."""
    nodes = chars = 0
    stack: list[tuple[object, int, str]] = [(d, 0, "spec")]
    while stack:
        v, depth, path = stack.pop()
        nodes += 1
        if nodes > MAX_NODES:
            raise _invalid(
                "spec", f"has more than {MAX_NODES} values", "a function spec as the client sends it"
            )
        if depth > MAX_DEPTH:
            raise _invalid(path, f"is nested more than {MAX_DEPTH} levels deep")
        if isinstance(v, str):
            chars += len(v)
        elif isinstance(v, bool) or v is None:
            pass
        elif isinstance(v, int):
            if not -_INT64 <= v < _INT64:
                raise _invalid(path, "is an integer beyond 64 bits")
        elif isinstance(v, float):
            if not math.isfinite(v):
                raise _invalid(path, "is not a finite number")
        elif isinstance(v, dict):
            for k, x in v.items():
                if not isinstance(k, str):
                    raise _invalid(path, f"has a key that is {_kind(k)}, not a string")
                chars += len(k)
                stack.append((x, depth + 1, _path(path, (k,))))
        elif isinstance(v, list | tuple):
            stack.extend((x, depth + 1, f"{path}[{i}]") for i, x in enumerate(v))
        else:  # bytes included: a JSON column cannot hold them (a class parameter's bytes default either)
            raise _invalid(path, f"is {_kind(v)}, which a spec cannot hold")
        if chars > MAX_SPEC_CHARS:
            raise _invalid("spec", f"is larger than {MAX_SPEC_CHARS // (1024 * 1024)} MiB of text")


def _unique(path: str, items: list[Any], what: str) -> None:
    seen: set[Any] = set()
    for i, x in enumerate(items):
        if x in seen:
            raise _invalid(f"{path}[{i}]", f"repeats the {what} {_short(x)}", f"distinct {what}s")
        seen.add(x)


def _check_gpu(s: SpecModel) -> list[str]:
    if not s.gpu:
        return []
    for i, g in enumerate(s.gpu):
        try:
            parse_gpu(g)
        except InvalidError as e:
            raise _invalid(f"spec.gpu[{i}]", f"is not valid: {_one_line(str(e))}") from None
    try:
        tiers = parse_gpu(list(s.gpu))
    except InvalidError as e:
        raise _invalid("spec.gpu", f"is not valid: {_one_line(str(e))}") from None
    return [t.to_wire() for t in tiers]


def _check_schedule(s: SpecModel) -> dict[str, Any] | None:
    from cloudmodal.schedule import schedule_from_wire

    if s.schedule is None:
        return None
    kind = s.schedule.get("type")
    models: dict[str, type[BaseModel]] = {"cron": CronModel, "period": PeriodModel}
    model = models.get(kind) if isinstance(kind, str) else None  # a list or object is not hashable
    if model is None:
        raise _invalid("spec.schedule.type", f"{_short(kind)} is not 'cron' or 'period'")
    m = _validate(model, s.schedule, "spec.schedule")
    try:
        return schedule_from_wire(m.model_dump()).to_wire()
    except InvalidError as e:
        raise _invalid("spec.schedule", f"is not valid: {_one_line(str(e))}") from None


def _check_image(s: SpecModel) -> dict[str, Any] | None:
    if s.image is None:
        if s.image_hash is not None:
            raise _invalid("spec.image_hash", "is set without an image", "null when image is null")
        return None
    m: ImageModel = _validate(ImageModel, s.image, "spec.image")
    for i, layer in enumerate(m.layers):
        op = layer.get("op")
        if op not in _LAYER_OPS:
            raise _invalid(
                f"spec.image.layers[{i}].op", f"{_short(op)} is not a known layer", ", ".join(_LAYER_OPS)
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
        raise _invalid("spec.image", what, "the wire form Image.to_wire() produces") from None
    for key, want in derived.items():
        if getattr(m, key) != want:
            raise _invalid(
                f"spec.image.{key}", "does not match the image's layers", "the value the layers imply"
            )
    if s.image_hash is not None and s.image_hash != img.hash:
        raise _invalid("spec.image_hash", "does not match spec.image.hash", "the image's hash")
    return wire


def _check_parameters(s: SpecModel) -> None:
    _unique("spec.parameters", [p[0] for p in s.parameters], "parameter name")
    for i, (_name, tname, default) in enumerate(s.parameters):
        path = f"spec.parameters[{i}][2]"
        if default is None:
            continue
        if tname == "bytes":  # a bytes default never gets here (see _measure); nothing else fits
            raise _invalid(path, f"is {_kind(default)}, not bytes", "null (a required bytes parameter)")
        ok = (
            isinstance(default, bool)
            if tname == "bool"
            else isinstance(default, str if tname == "str" else int)
        )
        if not ok or (tname == "int" and isinstance(default, bool)):
            raise _invalid(
                path, f"is {_kind(default)}, not {tname}", f"null (required) or a default of type {tname}"
            )


def _cross_checks(s: SpecModel) -> None:
    """The rules the decorators apply between options."""
    if s.cpu_limit is not None and (s.cpu is None or s.cpu_limit < s.cpu):
        raise _invalid(
            "spec.cpu_limit", "is lower than spec.cpu (or cpu is null)", "a limit at least the request"
        )
    if s.memory_limit is not None and (s.memory is None or s.memory_limit < s.memory):
        raise _invalid(
            "spec.memory_limit",
            "is lower than spec.memory (or memory is null)",
            "a limit at least the request",
        )
    a = s.autoscaler
    if a.max_containers is not None and a.min_containers > a.max_containers:
        raise _invalid(
            "spec.autoscaler.min_containers",
            f"({a.min_containers}) is greater than max_containers ({a.max_containers})",
            "min_containers <= max_containers",
        )
    c = s.concurrency
    if c is not None and c.target_inputs is not None and c.target_inputs > c.max_inputs:
        raise _invalid(
            "spec.concurrency.target_inputs",
            f"({c.target_inputs}) is greater than max_inputs ({c.max_inputs})",
            "target_inputs <= max_inputs",
        )
    if s.nonpreemptible and s.spot != "never":
        raise _invalid(
            "spec.spot", f"is {s.spot!r} but nonpreemptible is true", "'never' when nonpreemptible"
        )
    if s.min_on_demand and s.spot == "require":
        raise _invalid("spec.min_on_demand", "is set with spot='require'", "0 when spot is 'require'")
    if s.retries is not None and s.retries.max_retries > 0:
        if s.web is not None:
            raise _invalid(
                "spec.retries", "is set on a web endpoint", "null or max_retries 0 for web endpoints"
            )
        if s.is_generator:
            raise _invalid("spec.retries", "is set on a generator", "null or max_retries 0 for generators")
    if s.web is not None and s.is_generator:
        raise _invalid("spec.web", "is set on a generator", "null for generators")
    if s.batching is not None and s.is_generator:
        raise _invalid("spec.batching", "is set on a generator", "null for generators")
    for path, w in [("spec.web", s.web)] + [
        (f"spec.web_methods[{i}][1]", w) for i, (_, w) in enumerate(s.web_methods)
    ]:
        if w is not None and (w.kind == "web_server") != (w.port is not None):
            raise _invalid(
                f"{path}.port", "must be set for web_server only", "a port for web_server, else null"
            )
    if s.kind == "function":
        for key in ("methods", "generator_methods", "async_methods", "web_methods", "parameters"):
            if getattr(s, key):
                raise _invalid(f"spec.{key}", "is set on a function", "an empty list unless kind is 'cls'")
    else:
        if s.schedule is not None:
            raise _invalid("spec.schedule", "is set on a class", "null unless kind is 'function'")
        if s.web is not None:
            raise _invalid("spec.web", "is set on a class", "null for classes (use web_methods)")
    _unique("spec.methods", list(s.methods), "method name")
    methods = set(s.methods)
    for key in ("generator_methods", "async_methods"):
        for i, m in enumerate(getattr(s, key)):
            if m not in methods:
                raise _invalid(
                    f"spec.{key}[{i}]", f"{_short(m)} is not in spec.methods", "names from spec.methods"
                )
    _unique("spec.web_methods", [m for m, _ in s.web_methods], "method name")
    for i, (m, _) in enumerate(s.web_methods):
        if m not in methods:
            raise _invalid(
                f"spec.web_methods[{i}][0]", f"{_short(m)} is not in spec.methods", "names from spec.methods"
            )
    _unique("spec.secrets", list(s.secrets), "secret name")
    _unique("spec.env", [k for k, _ in s.env], "variable name")
    _unique("spec.volumes", [p for p, _ in s.volumes], "mount path")
    _unique("spec.volumes", [v for _, v in s.volumes], "volume")
    _unique("spec.region", list(s.region), "region")
    _unique("spec.experimental_options", [k for k, _ in s.experimental_options], "key")
    names = {v for _, v in s.volumes}
    for i, v in enumerate(s.create_volumes):
        if v not in names:
            raise _invalid(
                f"spec.create_volumes[{i}]",
                f"{_short(v)} is not mounted in spec.volumes",
                "names from spec.volumes",
            )


def validate_wire_spec(d: object, *, ignore_unknown_keys: bool = False) -> dict[str, Any]:
    """Validate a function's wire spec as a client sent it; return its normalized wire form (JSON values).

    Raises :class:`~cloudmodal.exception.InvalidError` naming the field (``spec.autoscaler.min_containers``),
    what is wrong, and what is expected. ``ignore_unknown_keys`` drops keys this version does not know
    instead of refusing them: for rows stored by another version, never for what a client sends.
    """
    if not isinstance(d, dict):
        raise _invalid("spec", f"is {_kind(d)}", "an object (FunctionSpec.to_wire())")
    _measure(d)
    if ignore_unknown_keys:
        d = _drop_unknown(d)
    s: SpecModel = _validate(SpecModel, d, "spec")
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
