"""Every ``CLOUDMODAL_*`` environment variable, declared once: its type, default and meaning.

Read them through :func:`settings`, never through ``os.environ``::

    from cloudmodal.settings import settings

    lease = settings().lease_s  # CLOUDMODAL_LEASE_S, a float > 0, default 30

:func:`settings` re-reads the environment when it changes (tests and the CLI set variables at run time) and
is cheap when it has not: the parsed :class:`Settings` is cached under the ``CLOUDMODAL_*`` items of the
environment, which take a few microseconds to collect. A bad value raises :class:`SettingsError` naming the
variable, its value and what is expected.

Groups (``Settings.group(name)``): ``client`` (any process that runs an app), ``control plane`` (read by
``cloudmodal server start`` and the embedded control plane), ``worker`` (set by cloudmodal for its own worker
processes, never by users), ``catalog`` (GPU prices and this machine's GPUs) and ``sim`` (the simulated cloud).

This module imports pydantic-settings, which costs tens of milliseconds in a process that has not loaded
pydantic yet: import it where a value is read (inside the function), not at the top of a module that
``import cloudmodal`` loads. ``python -m cloudmodal.settings`` prints the README's configuration table.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from cloudmodal.exception import InvalidError

PREFIX = "CLOUDMODAL_"
_PREFIX_BYTES = PREFIX.encode()

GROUPS = ("client", "control plane", "worker", "catalog", "sim")

_MAX = 1e15  # an upper bound on sizes and durations: larger is a typo, and overflows timers


def _var(default: Any, description: str, *, group: str, set_by_cloudmodal: bool = False, **kw: Any) -> Any:
    """A field: ``description`` is its one line in the README's table; ``set_by_cloudmodal`` marks variables
    cloudmodal sets for its own processes (users do not set them)."""
    return Field(
        default,
        description=description,
        json_schema_extra={"group": group, "set_by_cloudmodal": set_by_cloudmodal},
        **kw,
    )


def _seconds(default: float, description: str, *, group: str) -> Any:
    return _var(default, description, group=group, gt=0, lt=_MAX)


class Settings(BaseSettings):
    """cloudmodal's configuration: each field is the variable ``CLOUDMODAL_<FIELD NAME IN CAPITALS>``.
    Empty variables count as unset."""

    model_config = SettingsConfigDict(
        env_prefix=PREFIX, env_ignore_empty=True, extra="ignore", frozen=True, validate_default=False
    )

    # -- client ------------------------------------------------------------------------------------------------
    server_url: str | None = _var(
        None,
        "the control plane to use (with `CLOUDMODAL_TOKEN`); unset: the active `cloudmodal login` profile, else a "
        "running `cloudmodal server start`, else an embedded one in the client's process",
        group="client",
    )
    token: str | None = _var(
        None, "the token for `CLOUDMODAL_SERVER_URL` (also handed to workers)", group="client", repr=False
    )
    tls_fingerprint: str | None = _var(
        None,
        "the SHA-256 fingerprint (hex, colons optional) of the control plane's TLS certificate, the only one "
        "clients and workers accept (unset: the system's CAs verify an https:// URL; set for its workers)",
        group="client",
    )
    profile: str | None = _var(
        None,
        "the `cloudmodal login` profile to use (unset: the active one; `cloudmodal profile list`)",
        group="client",
    )
    home: Path | None = _var(
        None,
        "state directory: database, secret key, owner token (unset: `~/.cloudmodal`)",
        group="client",
    )
    cache_dir: Path | None = _var(
        None,
        "caches: shipped sources, image venvs, price catalogs (unset: `$XDG_CACHE_HOME/cloudmodal`, "
        "else `~/.cache/cloudmodal`)",
        group="client",
    )
    gpu_fallback: Literal["cpu"] | None = _var(
        None,
        "`cpu`: run GPU functions on CPU when no provider has the GPU (as `cloudmodal run --gpu-fallback cpu`)",
        group="client",
    )
    allow_inert: bool = _var(
        False,
        "development switch: run or deploy an app that declares features not implemented yet (a function's "
        "`startup_timeout`) with a warning instead of an error; they are ignored",
        group="client",
    )
    max_payload_bytes: int = _var(
        1024 * 1024 * 1024,
        "the largest pickled argument a client sends",
        group="client",
        gt=0,
        lt=_MAX,
    )

    # -- control plane -----------------------------------------------------------------------------------------
    database_url: str | None = _var(
        None,
        "the control plane's database as a SQLAlchemy URL, e.g. `postgresql+psycopg://…` (unset: SQLite in "
        "`CLOUDMODAL_HOME`)",
        group="control plane",
        repr=False,
    )
    kv_synchronous_commit: Literal["on", "off"] = _var(
        "on",
        "`off`: Dict and Queue writes are answered before their commit reaches the database server's disk "
        "(PostgreSQL's `synchronous_commit`; faster batched puts and gets): a crash of the database server may "
        "lose the last fraction of a second of kv writes already answered (the database stays consistent); only "
        "dicts and queues are affected, and SQLite ignores it",
        group="control plane",
    )
    blob_dir: Path | None = _var(
        None,
        "where payloads over 2 MiB are kept (unset: `blobs/` in the state directory). Several control planes "
        "may share one database (all serve the API; one reconciles, another takes over when it stops) if they "
        "share this directory too",
        group="control plane",
    )
    blob_store: str | None = _var(
        None,
        "where payloads over 2 MiB are kept, as a URL: `s3://bucket/prefix`, `gs://bucket/prefix`, "
        "`az://container/prefix` (credentials and endpoints as for `CLOUDMODAL_VOLUME_STORE`), or a directory "
        "(unset: `CLOUDMODAL_BLOB_DIR`). Control planes sharing a database must share it",
        group="control plane",
    )
    volume_store: str | None = _var(
        None,
        "where volumes keep their files: a directory, `s3://bucket/prefix`, `gs://bucket/prefix` or "
        "`az://container/prefix` (unset: `volumes/` in the state directory). Workers read and write it directly, "
        "so a cloud worker needs a bucket it can reach",
        group="control plane",
    )
    volume_store_region: str | None = _var(
        None,
        "where `CLOUDMODAL_VOLUME_STORE`'s bucket is, as `CLOUD:REGION` (`aws:us-east-1`, `gcp:us-central1`, "
        "`azure:eastus`): placement then prefers offers near the volumes a function mounts, by the egress a "
        "worker's start would cost (unset: the cloud is read from the URL's scheme, the region is unknown, and "
        "egress within that cloud is not counted)",
        group="control plane",
        pattern=r"^\s*([A-Za-z0-9_-]+:[A-Za-z0-9_-]+|local)\s*$",
    )
    providers: Annotated[tuple[str, ...], NoDecode] = _var(
        ("local",),
        "the providers to launch workers with, comma-separated: `local`, `sim`, `aws`, `gcp`, `azure`, `lambda` "
        "(`local` is always added, for CPU-only work; `cloudmodal setup` says which clouds are usable)",
        group="control plane",
    )
    public_url: str | None = _var(
        None,
        "the one address of several control-plane replicas on one database (a load balancer in front of them): "
        "workers and sandboxes are given it instead of this control plane's own address, so they reconnect to a "
        "replica that still runs when one goes",
        group="control plane",
    )
    node_server_url: str | None = _var(
        None,
        "the URL cloud nodes reach this control plane at (unset: each node reaches it through a reverse SSH "
        "tunnel over its SSH connection, so a control plane behind NAT works)",
        group="control plane",
    )
    ssh_config: Path | None = _var(
        None,
        "an OpenSSH client config file used for every SSH connection to cloud nodes (bastions, jump hosts)",
        group="control plane",
    )
    any_skypilot: bool = _var(
        False,
        "`1`: use an installed SkyPilot other than the version cloudmodal is built against (its provisioner "
        "is SkyPilot's internal layer: expect breakage)",
        group="control plane",
    )
    lambda_api_endpoint: str | None = _var(
        None,
        "Lambda Cloud's API base URL (unset: Lambda's own; set for a proxy or a test double)",
        group="control plane",
    )
    gcp_api_endpoint: str | None = _var(
        None,
        "the Google Cloud API root for Compute Engine calls (unset: Google's own; set for a proxy, a private "
        "endpoint or a test double)",
        group="control plane",
    )
    azure_arm_endpoint: str | None = _var(
        None,
        "the Azure Resource Manager endpoint (unset: Azure's public cloud; set for sovereign clouds, a proxy or a "
        "test double)",
        group="control plane",
    )
    azure_arm_ca_bundle: Path | None = _var(
        None,
        "a CA bundle to verify `CLOUDMODAL_AZURE_ARM_ENDPOINT`'s certificate with (unset: the system's)",
        group="control plane",
    )
    node_ssh_user: str | None = _var(
        None,
        "the SSH login on cloud nodes (unset: the one of the cloud's image, e.g. `ubuntu`)",
        group="control plane",
    )
    node_prepared: bool = _var(
        False,
        "`1`: the nodes' Python already has cloudmodal's dependencies (a prepared image, or nodes without "
        "internet): image environments see its packages and nothing is downloaded for cloudmodal itself",
        group="control plane",
    )
    node_python: str = _var(
        "python3",
        "the Python interpreter on cloud nodes that their image environments are made from",
        group="control plane",
    )
    lease_s: float = _seconds(30.0, "how long a claimed input is leased to its worker", group="control plane")
    heartbeat_s: float = _seconds(3.0, "how often workers heartbeat", group="control plane")
    worker_timeout_s: float = _seconds(
        30.0, "how long a silent worker is taken for dead", group="control plane"
    )
    ledger_accrual_s: float = _seconds(
        30.0,
        "how often the cost ledger accrues running workers' time (a stopped worker's is accrued at once)",
        group="control plane",
    )
    web_start_timeout_s: float = _seconds(
        120.0,
        "how long a web request waits for a worker of its endpoint to start (scaling from zero) before it is "
        "answered 503",
        group="control plane",
    )
    web_domain: str | None = _var(
        None,
        "a domain whose subdomains route to web endpoints by host (`LABEL--APP.DOMAIN`; `APP-dev` for an "
        "ephemeral app), besides the `/web/APP/LABEL` paths; unset: paths only",
        group="control plane",
    )
    worker_reconnect_s: float = _seconds(
        600.0,
        "how long workers keep trying to reach a control plane that went away before exiting (an embedded "
        "control plane, which does not come back, uses 30 unless this is set)",
        group="control plane",
    )
    retention_calls_ephemeral_s: float = _seconds(
        86400.0,
        "how long a finished call of an ephemeral run (its inputs, outputs and the blobs only they reference) "
        "is kept after its last activity; a blob no row references is removed once its file is older than the "
        "shorter of the two call retentions",
        group="control plane",
    )
    retention_calls_deployed_s: float = _seconds(
        7 * 86400.0, "the same for a deployed app's calls", group="control plane"
    )
    retention_logs_ephemeral_s: float = _seconds(
        86400.0,
        "logs and events of an ephemeral run stopped this long ago are removed, then the run's own rows",
        group="control plane",
    )
    retention_logs_deployed_s: float = _seconds(
        30 * 86400.0,
        "how long everything else's logs and events are kept",
        group="control plane",
    )
    retention_interval_s: float = _seconds(
        60.0, "how often the reconciling control plane prunes", group="control plane"
    )
    header_timeout_s: float = _seconds(
        15.0,
        "time allowed for a request's line and headers before the connection is closed",
        group="control plane",
    )
    body_timeout_s: float = _seconds(
        30.0, "the longest pause within a request's body before a 408", group="control plane"
    )
    body_budget_bytes: int = _var(
        256 * 1024 * 1024,
        "bytes of request bodies buffered at once across all requests",
        group="control plane",
        gt=0,
        lt=_MAX,
    )
    body_budget_wait_s: float = _seconds(
        5.0, "how long a request body waits for room in that budget before a 503", group="control plane"
    )
    secret_key: str | None = _var(
        None,
        "the key that seals secrets at rest: one or more comma-separated Fernet keys (the first seals, all "
        "open: rotation). Control planes sharing a database must share it",
        group="control plane",
        repr=False,
    )
    secret_key_file: Path | None = _var(
        None,
        "a file holding that key when `CLOUDMODAL_SECRET_KEY` is unset (unset: `secret.key` in the state "
        "directory, created 0600)",
        group="control plane",
    )
    local_max_workers: int | None = _var(
        None,
        "worker processes this machine may run at once (unset: `max(4, 2 × cores)`)",
        group="control plane",
        gt=0,
    )
    launch_threads: int = _var(
        64,
        "launches in flight at once, all pools together (a walk holds one while it waits on a cloud's API)",
        group="control plane",
        gt=0,
        le=1024,
    )
    launch_hedge: int = _var(
        4,
        "after a capacity failure, how many cloud candidates a launch tries at once (1: one at a time); a "
        "surplus node that also starts is terminated at once, billed the cloud's minimum (about a minute)",
        group="control plane",
        ge=1,
        le=16,
    )
    spot_settings: Annotated[dict[str, Any] | None, NoDecode] = _var(
        None,
        'the spot policy\'s thresholds, windows and block times as a JSON object, e.g. `{"probe_interval_s": 60}`',
        group="control plane",
    )

    # -- worker: set by cloudmodal for the processes it starts -----------------------------------------------------
    worker_id: str | None = _var(
        None, "this process is the worker with this id", group="worker", set_by_cloudmodal=True
    )
    function_id: str | None = _var(
        None, "the function the worker serves", group="worker", set_by_cloudmodal=True
    )
    app_id: str | None = _var(None, "the app the worker belongs to", group="worker", set_by_cloudmodal=True)
    credentials: str | None = _var(
        None,
        '`stdin`: the worker\'s token comes as one JSON line `{"CLOUDMODAL_TOKEN": …}` on stdin',
        group="worker",
        set_by_cloudmodal=True,
    )
    token_file: Path | None = _var(
        None, "a file holding the worker's token (cloud nodes)", group="worker", set_by_cloudmodal=True
    )
    sandbox_debug: bool = _var(
        False,
        "development switch: a sandbox host's own errors go to the control plane's stderr instead of nowhere",
        group="control plane",
    )
    snapshot_agent: str | None = _var(
        None,
        "the local provider's memory-snapshot agent (a Unix socket) a worker of an `enable_memory_snapshot` "
        "function hands itself over to",
        group="worker",
        set_by_cloudmodal=True,
    )
    zygote_fd: int | None = _var(
        None,
        "a snapshot zygote's end of its control socket (a file descriptor)",
        group="worker",
        set_by_cloudmodal=True,
    )
    preemption_source: str | None = _var(
        None,
        "the cloud whose preemption notices the worker watches on its node: `aws` (IMDS spot instance-action), "
        "`gcp` (metadata `preempted`), `azure` (Scheduled Events)",
        group="worker",
        set_by_cloudmodal=True,
    )
    metadata_url: str | None = _var(
        None,
        "the base URL of the node's metadata service (unset: the cloud's link-local address)",
        group="worker",
        set_by_cloudmodal=True,
    )
    is_remote: bool = _var(
        False,
        "`1` in workers and `cloudmodal shell`: the code runs inside a function's environment",
        group="worker",
        set_by_cloudmodal=True,
    )
    cpu_fallback: bool = _var(
        False,
        "`1`: the worker runs a GPU function on CPU (`--gpu-fallback cpu`)",
        group="worker",
        set_by_cloudmodal=True,
    )
    venv: Path | None = _var(
        None,
        "the image's virtual environment, in the image setup script",
        group="worker",
        set_by_cloudmodal=True,
    )

    # -- catalog ---------------------------------------------------------------------------------------------
    catalog_dir: Path | None = _var(
        None,
        "GPU price catalogs in SkyPilot's v8 layout (unset: `catalogs/v8` in the cache, filled by "
        "`cloudmodal pricing refresh`)",
        group="catalog",
    )
    fake_gpus: str | None = _var(
        None,
        "development switch: pretend this machine has these GPUs, e.g. `H100:2` or `H100:2,A10G` (`none`: no "
        "GPUs); never in production",
        group="catalog",
    )

    # -- sim ---------------------------------------------------------------------------------------------------
    sim_scenario: str | None = _var(
        None, "the `sim` provider's scenario: a JSON or TOML file, or inline JSON", group="sim"
    )
    sim_seed: int | None = _var(None, "the `sim` provider's random seed", group="sim")
    sim_notice_file: Path | None = _var(
        None,
        'a file a simulated worker\'s preemption notice is written to (JSON `{"reclaim_at": …}`)',
        group="sim",
        set_by_cloudmodal=True,
    )
    sim_offer: str | None = _var(
        None, "the offer a simulated worker was launched on", group="sim", set_by_cloudmodal=True
    )
    sim_market: str | None = _var(
        None, "the market (`spot`, `on-demand`) of a simulated worker", group="sim", set_by_cloudmodal=True
    )

    @field_validator("providers", mode="before")
    @classmethod
    def _split_providers(cls, v: Any) -> Any:
        if isinstance(v, str):
            names = tuple(n.strip() for n in v.split(",") if n.strip())
            if not names:
                raise ValueError("expected provider names separated by commas, e.g. local,sim")
            return names
        return v

    @field_validator("spot_settings", mode="before")
    @classmethod
    def _parse_json_object(cls, v: Any) -> Any:
        if isinstance(v, str):
            try:
                v = json.loads(v)
            except ValueError as e:
                raise ValueError(
                    f'not JSON ({e}); expected an object like {{"probe_interval_s": 30}}'
                ) from None
            if not isinstance(v, dict):
                raise ValueError('expected a JSON object like {"probe_interval_s": 30}')
        return v

    # -- reading ----------------------------------------------------------------------------------------------
    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The environment (or the mapping given to settings()), then the outputs `cloudmodal infra up` wrote
        # (<home>/infra/<cloud>.json), which a CLOUDMODAL_* variable always overrides; no .env or secret files.
        # The outputs are read when settings are first built for an environment: a running control plane
        # takes new ones at its next start.
        from cloudmodal.infra.outputs import InfraOutputsSource

        return init_settings, _ItemsSource(settings_cls), InfraOutputsSource(settings_cls)

    @classmethod
    def env_name(cls, field: str) -> str:
        """``"lease_s"`` -> ``"CLOUDMODAL_LEASE_S"``."""
        if field not in cls.model_fields:
            raise KeyError(field)
        return PREFIX + field.upper()

    @classmethod
    def group(cls, field: str) -> str:
        return _extra(cls.model_fields[field])["group"]

    @classmethod
    def set_by_cloudmodal(cls, field: str) -> bool:
        return bool(_extra(cls.model_fields[field])["set_by_cloudmodal"])

    def is_set(self, field: str) -> bool:
        """Whether the environment gave ``field`` a value (rather than it taking its default)."""
        return field in self.model_fields_set


def _extra(info: FieldInfo) -> dict[str, Any]:
    extra = info.json_schema_extra
    assert isinstance(extra, dict)
    return extra


class SettingsError(InvalidError, ValueError):
    """A ``CLOUDMODAL_*`` variable has a value its type does not accept; the message names each one."""


# The CLOUDMODAL_* items the Settings being built reads (set by _build, read by _ItemsSource).
_items: ContextVar[tuple[tuple[str, str], ...] | None] = ContextVar("cloudmodal_settings_items", default=None)


class _ItemsSource(EnvSettingsSource):
    """pydantic-settings' environment source, reading the items :func:`settings` collected instead of
    ``os.environ`` (the same items it caches under, also when a caller passes its own mapping). A plain
    ``Settings()`` reads ``os.environ`` as usual."""

    def _load_env_vars(self) -> Mapping[str, str | None]:
        items = _items.get()
        if items is None:
            return super()._load_env_vars()
        return {k.lower(): v for k, v in items if v != ""}


_Key = tuple[tuple[str, str], ...]
_cache: dict[_Key, Settings] = {}
_cache_lock = threading.Lock()
_CACHE_MAX = 16  # distinct environments kept (tests flip a few variables back and forth)


def _key(environ: Mapping[str, str] | None) -> _Key:
    if environ is None or environ is os.environ:
        # os.environ keeps its items encoded in ``_data``; filtering those first avoids decoding every
        # variable on each read (a few microseconds for the whole environment).
        data = getattr(os.environ, "_data", None)
        decode_key = getattr(os.environ, "decodekey", None)
        decode_value = getattr(os.environ, "decodevalue", None)
        if isinstance(data, dict) and decode_key is not None and decode_value is not None:
            return tuple(
                sorted(
                    (decode_key(k), decode_value(v))
                    for k, v in data.items()
                    if isinstance(k, bytes) and k.startswith(_PREFIX_BYTES)
                )
            )
        environ = os.environ
    return tuple(sorted((k, v) for k, v in environ.items() if k.startswith(PREFIX)))


def _build(items: _Key) -> Settings:
    token = _items.set(items)
    try:
        return Settings()
    except ValidationError as e:
        raise SettingsError(_explain(e, dict(items))) from None
    finally:
        _items.reset(token)


def _explain(e: ValidationError, items: Mapping[str, str]) -> str:
    lines = []
    for err in e.errors(include_url=False):
        field = str(err["loc"][0]) if err["loc"] else ""
        name = PREFIX + field.upper()
        info = Settings.model_fields.get(field)
        what = f" ({info.description})" if info is not None and info.description else ""
        msg = err["msg"].removeprefix("Value error, ")  # pydantic's prefix for a validator's ValueError
        lines.append(f"{name}={items.get(name, '')!r} is invalid: {msg}{what}.")
    return "\n".join(lines)


def settings(environ: Mapping[str, str] | None = None) -> Settings:
    """The settings the environment gives now (``environ``: read this mapping instead of ``os.environ``).

    Cached under the ``CLOUDMODAL_*`` items, so a changed variable is seen at the next call. Raises
    :class:`SettingsError` for a value its variable's type does not accept."""
    key = _key(environ)
    s = _cache.get(key)
    if s is None:
        s = _build(key)
        with _cache_lock:
            if len(_cache) >= _CACHE_MAX:
                _cache.pop(next(iter(_cache)))
            _cache[key] = s
    return s


# -- documentation ------------------------------------------------------------------------------------------
def _shown_default(field: str, info: FieldInfo) -> str:
    d = info.default
    if d is None:
        return "—"
    if isinstance(d, bool):
        return "`1`" if d else "`0`"
    if isinstance(d, tuple):
        return f"`{','.join(d)}`"
    if isinstance(d, float) and d.is_integer():
        d = int(d)
    if field.endswith("_s"):
        days = d / 86400
        return f"`{d}` s ({days:g} day{'s' if days != 1 else ''})" if days >= 1 else f"`{d}` s"
    if isinstance(d, int) and d >= 1024 * 1024 and d % (1024 * 1024) == 0:
        mib = d // (1024 * 1024)
        return f"`{d}` ({mib // 1024} GiB)" if mib % 1024 == 0 else f"`{d}` ({mib} MiB)"
    return f"`{d}`"


def markdown_table() -> str:
    """The README's configuration table: every variable, its default and its meaning, by group."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for group in GROUPS:
        for field, info in Settings.model_fields.items():
            if Settings.group(field) != group:
                continue
            meaning = f"{group}: {info.description}"
            if Settings.set_by_cloudmodal(field):
                meaning += " (set by cloudmodal, not by users)"
            rows.append(f"| `{Settings.env_name(field)}` | {_shown_default(field, info)} | {meaning} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())
