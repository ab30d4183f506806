"""The schema of a function's wire spec (:meth:`cloudmodal.spec.FunctionSpec.to_wire`) as the control plane
accepts it: pydantic models that apply the decorators' rules on each field again (types, ranges, allowed
names), forbid unknown keys as the decorators reject unknown keywords, and bound every string and list. Each
field's ``description`` is what an error about it says is expected. The rules that tie fields together are
:mod:`cloudmodal.server.wire_spec`'s."""

from __future__ import annotations

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
    model_validator,
)

from cloudmodal import app as _app_rules
from cloudmodal import partial_function as _pf_rules
from cloudmodal.exception import InvalidError
from cloudmodal.gpu import MAX_GPU_COUNT
from cloudmodal.image import WIRE_VERSION
from cloudmodal.secret import check_object_name
from cloudmodal.server.wire_spec_errors import one_line, short
from cloudmodal.volume import check_sub_path

# Bounds the decorators leave open (they accept any int) but a shared server must not: they fit int32 and
# every real machine, and keep sums and products of them far from overflow.
BIG = 2**31 - 1
MAX_CPU = 4096.0  # cores
MAX_MEMORY_MIB = 64 * 1024 * 1024  # 64 TiB
MAX_PRICE = 100_000.0  # $/h

_CONTROL = r"\x00-\x1f\x7f"
_NO_CONTROL = rf"^[^{_CONTROL}]*$"
_NO_SPACE = rf"^[^\s{_CONTROL}]+$"
_TRIMMED = rf"^[^\s{_CONTROL}]([^{_CONTROL}]*[^\s{_CONTROL}])?$"  # no control characters, no outer spaces
_HEX64 = r"^[0-9a-f]{64}$"
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
CLOUDS = tuple(c for c in _app_rules.CLOUDS if c != "auto")  # the decorator turns "auto" into None

_CFG = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True, hide_input_in_errors=True)


def _text(max_len: int, pattern: str = _NO_CONTROL, min_len: int = 1) -> StringConstraints:
    """A string's bounds, as in ``Annotated[StrictStr, _text(256)]``."""
    return StringConstraints(min_length=min_len, max_length=max_len, pattern=pattern)


def _check(fn: Callable[[Any], Any]) -> AfterValidator:
    """An after-validator from a function that raises InvalidError/ValueError: pydantic reports ValueError."""

    def run(v: Any) -> Any:
        try:
            return fn(v)
        except InvalidError as e:
            raise ValueError(one_line(str(e))) from None

    return AfterValidator(run)


def _object_name(kind: str) -> AfterValidator:
    """The validator of a ``kind`` object's name (after ``_text(64)``)."""
    return _check(lambda v: check_object_name(v, kind))


def _identifier(v: str) -> str:
    if not v.isidentifier():
        raise ValueError(f"{short(v)} is not a Python identifier")
    return v


def _mount_path(p: str) -> str:
    canonical = posixpath.normpath(p)
    if not p.startswith("/"):
        raise ValueError(f"mount path {short(p)} is not absolute")
    if canonical.startswith("//"):
        canonical = "/" + canonical.lstrip("/")
    if canonical != p:
        raise ValueError(f"mount path {short(p)} is not canonical (it would be {short(canonical)})")
    if p in _app_rules._RESERVED_MOUNTS:
        raise ValueError(f"{p!r} is reserved")
    return p


def _env_key(k: str) -> str:
    if "=" in k:
        raise ValueError(f"variable name {short(k)} contains '='")
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
MountPath = Annotated[StrictStr, _text(1024), AfterValidator(_mount_path)]
# (mount path, read_only, sub_path or "") as Volume.with_mount_options checks them
VolumeOption = tuple[
    MountPath,
    StrictBool,
    Annotated[StrictStr, _text(1024, min_len=0), _check(lambda v: v and check_sub_path(v))],
]
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
    custom_domains: list[Annotated[StrictStr, _text(253, _pf_rules.DOMAIN_RE.pattern)]] = Field(
        default_factory=list,
        max_length=_pf_rules.MAX_CUSTOM_DOMAINS,
        description="lowercase host names, such as api.example.com",
    )


class BucketMountModel(BaseModel):
    """A CloudBucketMount's wire form (:class:`cloudmodal.spec.BucketMountSpec`), checked by its constructor."""

    model_config = _CFG
    path: MountPath
    bucket_name: Annotated[StrictStr, _text(255, _NO_SPACE)]
    endpoint_url: Annotated[StrictStr, _text(2048, _NO_SPACE)] | None = None
    key_prefix: Annotated[StrictStr, _text(1024, min_len=0)] = ""
    secret: SecretName | None = None
    read_only: StrictBool = False
    requester_pays: StrictBool = False
    force_path_style: StrictBool = False

    @model_validator(mode="after")
    def _rules(self) -> BucketMountModel:
        from cloudmodal.cloud_bucket_mount import CloudBucketMount
        from cloudmodal.secret import Secret

        try:
            CloudBucketMount(
                self.bucket_name,
                self.endpoint_url,
                self.key_prefix or None,
                Secret(self.secret) if self.secret else None,  # by name: an inline one's too
                read_only=self.read_only,
                requester_pays=self.requester_pays,
                force_path_style=self.force_path_style,
            )
        except InvalidError as e:
            raise ValueError(one_line(str(e))) from None
        return self


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
    volume_options: list[VolumeOption] = Field(
        default_factory=list,
        max_length=64,
        description="a list of at most 64 [mount path from volumes, read_only, sub_path or ''] triples",
    )
    bucket_mounts: list[BucketMountModel] = Field(
        default_factory=list, max_length=64, description="a list of at most 64 bucket mounts"
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
