"""Immutable, validated descriptions of what the user declared. Pure: no I/O.

The decorators in :mod:`cloudmodal.app` build these; the client sends :meth:`FunctionSpec.to_wire` to the
control plane, whose autoscaler and placement read it back with :meth:`FunctionSpec.from_wire`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from cloudmodal.gpu import GpuTier

SpotPolicy = Literal["allow", "require", "never"]
Kind = Literal["function", "cls"]
WebKind = Literal["fastapi_endpoint", "asgi_app", "wsgi_app", "web_server"]


@dataclass(frozen=True)
class RetryPolicy:
    """Wire form of :class:`cloudmodal.Retries`."""

    max_retries: int = 0
    backoff_coefficient: float = 2.0
    initial_delay: float = 1.0
    max_delay: float = 60.0

    def delay_for(self, attempt: int) -> float:
        """Seconds to wait before retry number ``attempt`` (1-based)."""
        d = self.initial_delay * self.backoff_coefficient ** max(attempt - 1, 0)
        return min(d, self.max_delay)


@dataclass(frozen=True)
class ConcurrencyConfig:
    max_inputs: int
    target_inputs: int | None = None


@dataclass(frozen=True)
class BatchConfig:
    max_batch_size: int
    wait_ms: int


@dataclass(frozen=True)
class WebConfig:
    kind: WebKind
    method: str = "GET"
    label: str | None = None
    port: int | None = None
    docs: bool = False
    requires_proxy_auth: bool = False
    startup_timeout: float = 5.0
    custom_domains: tuple[str, ...] = ()  # hosts routed to this endpoint besides its /web/ path

    def __post_init__(self) -> None:
        object.__setattr__(self, "custom_domains", tuple(self.custom_domains or ()))


@dataclass(frozen=True)
class BucketMountSpec:
    """Wire form of a :class:`cloudmodal.CloudBucketMount` at a mount path."""

    path: str  # the mount path in the container
    bucket_name: str
    endpoint_url: str | None = None  # None: AWS S3
    key_prefix: str = ""  # "" or a prefix ending in "/"
    secret: str | None = None  # the name of the secret holding the credentials (also in ``secrets``)
    read_only: bool = False
    requester_pays: bool = False
    force_path_style: bool = False


@dataclass(frozen=True)
class AutoscalerSettings:
    min_containers: int = 0
    max_containers: int | None = None
    buffer_containers: int = 0
    scaledown_window: int = 60


@dataclass(frozen=True)
class FunctionSpec:
    """Everything a function (or a class's service function) declared, validated."""

    name: str  # function name, or the class name for @app.cls
    module: str  # module the function was defined in ("__main__" replaced by the file stem)
    qualname: str
    kind: Kind = "function"
    source_file: str | None = None
    gpu: tuple[GpuTier, ...] = ()
    cpu: float | None = None
    cpu_limit: float | None = None
    memory: int | None = None  # MiB
    memory_limit: int | None = None
    ephemeral_disk: int | None = None
    timeout: int = 300
    startup_timeout: int | None = None
    retries: RetryPolicy | None = None
    autoscaler: AutoscalerSettings = field(default_factory=AutoscalerSettings)
    concurrency: ConcurrencyConfig | None = None
    batching: BatchConfig | None = None
    is_generator: bool = False
    is_async: bool = False
    schedule: dict[str, Any] | None = None  # wire form of Cron/Period
    image: dict[str, Any] | None = None  # wire form of Image
    image_hash: str | None = None
    secrets: tuple[str, ...] = ()  # secret names (values never travel in a spec)
    env: tuple[tuple[str, str], ...] = ()
    volumes: tuple[tuple[str, str], ...] = ()  # (mount path, volume name)
    # (mount path, read_only, sub_path or "") of the volumes mounted with Volume.with_mount_options
    volume_options: tuple[tuple[str, bool, str], ...] = ()
    bucket_mounts: tuple[BucketMountSpec, ...] = ()  # CloudBucketMounts in volumes=
    cloud: str | None = None
    region: tuple[str, ...] = ()
    spot: SpotPolicy = "allow"
    max_price_per_hour: float | None = None
    nonpreemptible: bool = False
    min_on_demand: int = 0  # on-demand workers kept beside spot ones
    serialized: bool = False
    web: WebConfig | None = None
    methods: tuple[str, ...] = ()  # @app.cls: names of @method (and batched/web) methods
    generator_methods: tuple[str, ...] = ()
    async_methods: tuple[str, ...] = ()
    parameters: tuple[
        tuple[str, str, Any], ...
    ] = ()  # @app.cls: (name, type name, default; None if required)
    single_use_containers: bool = False
    enable_memory_snapshot: bool = False
    block_network: bool = False
    include_source: bool = True
    experimental_options: tuple[tuple[str, str], ...] = ()
    # Modal options accepted and validated for compatibility (placement and networking hints a single
    # control plane has no use for), and per-method web configs for @app.cls classes (each web method is its own endpoint).
    web_methods: tuple[tuple[str, WebConfig], ...] = ()
    create_volumes: tuple[str, ...] = ()  # volume names declared with create_if_missing=True
    routing_region: str | None = None
    restrict_modal_access: bool = False
    restrict_output: bool = False  # Modal's _experimental_restrict_output
    i6pn: bool | None = None

    @property
    def uses_gpu(self) -> bool:
        return bool(self.gpu)

    @property
    def has_mounts(self) -> bool:
        """Whether its containers mount anything (volumes or buckets)."""
        return bool(self.volumes or self.bucket_mounts)

    def mount_options(self, path: str) -> tuple[bool, str]:
        """``(read_only, sub_path)`` of the volume mounted at ``path`` (``(False, "")``: the defaults)."""
        for p, read_only, sub_path in self.volume_options:
            if p == path:
                return bool(read_only), sub_path
        return False, ""

    def to_wire(self) -> dict[str, Any]:
        d = asdict(self)
        d["gpu"] = [t.to_wire() for t in self.gpu]
        return d

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> FunctionSpec:
        from cloudmodal.gpu import parse_gpu

        d = dict(d)
        d["gpu"] = parse_gpu(d.get("gpu") or None)
        for key, sub in (
            ("retries", RetryPolicy),
            ("concurrency", ConcurrencyConfig),
            ("batching", BatchConfig),
            ("web", WebConfig),
        ):
            if d.get(key) is not None:
                d[key] = sub(**d[key])
        d["autoscaler"] = AutoscalerSettings(**(d.get("autoscaler") or {}))
        d["bucket_mounts"] = tuple(
            b if isinstance(b, BucketMountSpec) else BucketMountSpec(**b)
            for b in (d.get("bucket_mounts") or ())
        )
        d["web_methods"] = tuple(
            (name, w if isinstance(w, WebConfig) else WebConfig(**w))
            for name, w in (d.get("web_methods") or ())
        )
        for key in ("secrets", "region", "methods", "generator_methods", "async_methods", "create_volumes"):
            d[key] = tuple(d.get(key) or ())
        for key in ("env", "volumes", "volume_options", "experimental_options", "parameters"):
            d[key] = tuple(tuple(x) for x in (d.get(key) or ()))
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})
