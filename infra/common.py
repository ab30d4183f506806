"""What every cloud's Pulumi program shares: its configuration (:class:`InfraConfig`), the names of the outputs
it exports, the tag every resource carries, and the control host's start-up script.

The programs themselves are ``infra/aws.py``, ``infra/gcp.py``, ``infra/azure.py`` (and ``infra/lambda_cloud.py``,
which explains why Lambda Cloud has none): each has ``program(cfg)``, which declares resources with the Pulumi
SDK and calls ``pulumi.export``. :func:`program_for` imports one lazily, so that importing this module needs no
Pulumi SDK at all (the ``pulumi`` extra is optional).

The bucket's layout, which the exported store URLs name:

- ``volumes/`` — ``CLOUDMODAL_VOLUME_STORE``; versioned, so an overwritten or deleted file can be recovered for
  ``NONCURRENT_EXPIRY_DAYS``;
- ``blobs/`` — ``CLOUDMODAL_BLOB_STORE`` (payloads over 2 MiB). The control plane's retention deletes a blob
  once no row references it (server/retention.py); a deployed function's pickle may be referenced for months,
  so the lifecycle rule must never expire a *current* blob by age. What it expires after ``blob_expiry_days``
  is what retention deleted (the bucket keeps it as a noncurrent version), and it aborts incomplete uploads.
"""

from __future__ import annotations

import importlib
import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pulumi

CLOUDS = ("aws", "gcp", "azure", "lambda")
DEFAULT_REGIONS = {"aws": "us-east-1", "gcp": "us-central1", "azure": "eastus", "lambda": "us-east-1"}

# Output names every program exports (those that apply to its cloud).
OUT_BUCKET_URL = "bucket_url"  # s3://bucket, gs://bucket, az://container (the account: OUT_STORAGE_ACCOUNT)
OUT_BUCKET_REGION = "bucket_region"  # the cloud's region name (us-east-1, us-central1, eastus)
OUT_VOLUME_STORE = "volume_store"  # CLOUDMODAL_VOLUME_STORE: the bucket URL + /volumes
OUT_BLOB_STORE = "blob_store"  # CLOUDMODAL_BLOB_STORE: the bucket URL + /blobs
OUT_VOLUME_STORE_REGION = "volume_store_region"  # CLOUDMODAL_VOLUME_STORE_REGION: "aws:us-east-1"
OUT_STORAGE_ACCOUNT = "storage_account"  # Azure only: the storage account (AZURE_STORAGE_ACCOUNT_NAME)
OUT_WORKER_IDENTITY = "worker_identity"  # AWS: instance profile name; GCP: service account email; Azure: id
OUT_NETWORK = "network"  # AWS: security group id; GCP: VPC network name; Azure: NSG id
OUT_CONTROL_PLANE_URL = "control_plane_url"  # only with with_control_host
OUT_CONTROL_HOST_ADDRESS = "control_host_address"  # only with with_control_host: its public IP

TAG_KEY = "cloudmodal-infra"  # every resource that takes tags (labels on GCP) carries it
TAG_VALUE = "true"

VOLUME_PREFIX = "volumes"
BLOB_PREFIX = "blobs"
NONCURRENT_EXPIRY_DAYS = 30  # an overwritten or deleted volume file stays recoverable this long
ABORT_MULTIPART_DAYS = 1  # an upload left incomplete by a crash is cleaned up after this

SSH_PORT = 22

_NAME = re.compile(r"^[a-z][a-z0-9-]{1,18}[a-z0-9]$")
_REGION = re.compile(r"^[a-z][a-z0-9-]{1,40}$")
_GCP_PROJECT = re.compile(r"^[a-z][a-z0-9-]{4,28}[a-z0-9]$")
_SSH_KEY = re.compile(r"^(ssh-(rsa|ed25519|dss)|ecdsa-sha2-nistp\d+|sk-\S+) [A-Za-z0-9+/=]+( .*)?$")


@dataclass(frozen=True)
class InfraConfig:
    """The standing infrastructure of one cloud, as ``cloudmodal infra`` builds it."""

    cloud: str  # "aws" | "gcp" | "azure" | "lambda"
    name: str = "cloudmodal"  # prefix of resource names
    region: str | None = None  # the cloud's region (None: DEFAULT_REGIONS)
    project: str | None = None  # GCP project id (required for gcp)
    # Where the team control plane is reached FROM for SSH to workers (the control plane's address, /32). With
    # with_control_host, the control host made here may SSH to workers too, whatever this says.
    control_plane_cidrs: tuple[str, ...] = ()
    control_plane_port: int = 8765  # the only port opened to the world, and only with with_control_host
    with_control_host: bool = False  # also make a small host for a team control plane (PostgreSQL on it)
    ssh_public_key: str | None = None  # the control host's admin key (SSH to it only from admin_cidrs)
    blob_expiry_days: int = 7  # deleted blobs (noncurrent versions under blobs/) are purged after this
    admin_cidrs: tuple[
        str, ...
    ] = ()  # where an administrator may SSH to the control host from (none: nobody)

    @property
    def resolved_region(self) -> str:
        return self.region or DEFAULT_REGIONS[self.cloud]

    def ssh_cidrs(self) -> list[str]:
        """``control_plane_cidrs`` in canonical form (``203.0.113.7`` → ``203.0.113.7/32``)."""
        return [str(ipaddress.ip_network(c.strip(), strict=True)) for c in self.control_plane_cidrs]

    def admin_ssh_cidrs(self) -> list[str]:
        return [str(ipaddress.ip_network(c.strip(), strict=True)) for c in self.admin_cidrs]

    def validate(self) -> None:
        """Raise ValueError, naming the fix, for a configuration no program should be run with."""
        if self.cloud not in CLOUDS:
            raise ValueError(f"unknown cloud {self.cloud!r}: use one of {', '.join(CLOUDS)}")
        if not _NAME.match(self.name):
            raise ValueError(
                f"name {self.name!r} cannot prefix bucket and role names: use 3 to 20 lowercase letters, digits "
                "and hyphens, starting with a letter and not ending with a hyphen (e.g. 'cloudmodal' or 'team-a')"
            )
        if self.region is not None and not _REGION.match(self.region):
            raise ValueError(
                f"region {self.region!r} is not a region name: use e.g. {DEFAULT_REGIONS.get(self.cloud, 'us-east-1')}"
            )
        if self.cloud == "gcp":
            if not self.project:
                raise ValueError(
                    "GCP needs a project: pass the project id (e.g. --project my-project-123, or set "
                    "GOOGLE_CLOUD_PROJECT)"
                )
            if not _GCP_PROJECT.match(self.project):
                raise ValueError(
                    f"GCP project {self.project!r} is not a project id: 6 to 30 lowercase letters, digits and "
                    "hyphens, starting with a letter (the id, not the project's display name or number)"
                )
        for field_name, cidrs in (
            ("control_plane_cidrs", self.control_plane_cidrs),
            ("admin_cidrs", self.admin_cidrs),
        ):
            for cidr in cidrs:
                _check_ssh_cidr(field_name, cidr)
        if not 1 <= self.control_plane_port <= 65535:
            raise ValueError(f"control_plane_port {self.control_plane_port} is not a port: use 1 to 65535")
        if self.control_plane_port == SSH_PORT:
            raise ValueError(
                "control_plane_port 22 would open SSH to the world: pick another port for the control plane "
                "(the default is 8765)"
            )
        if self.blob_expiry_days < 1:
            raise ValueError(f"blob_expiry_days {self.blob_expiry_days} must be at least 1 day")
        if self.ssh_public_key is not None and not _SSH_KEY.match(self.ssh_public_key.strip()):
            raise ValueError(
                "ssh_public_key is not an OpenSSH public key: pass the one line of a .pub file "
                "(e.g. ~/.ssh/id_ed25519.pub), never a private key"
            )
        if self.admin_cidrs and not self.with_control_host:
            raise ValueError(
                "admin_cidrs only apply to the control host: add --with-control-host or drop them"
            )
        if self.cloud == "azure" and self.with_control_host and not self.ssh_public_key:
            raise ValueError(
                "Azure's control host needs ssh_public_key (its Linux VMs take a key or a password, and no "
                "password is made): pass the one line of e.g. ~/.ssh/id_ed25519.pub"
            )
        if self.cloud == "lambda" and self.with_control_host:
            raise ValueError(
                "Lambda Cloud has no Pulumi provider for a control host: make the control host on aws, gcp or "
                "azure (--with-control-host there) and point Lambda's workers at it"
            )


def _check_ssh_cidr(field_name: str, cidr: str) -> None:
    try:
        net = ipaddress.ip_network(cidr.strip(), strict=True)
    except ValueError as e:
        raise ValueError(
            f"{field_name}: {cidr!r} is not a CIDR block ({e}): use the control plane's address as "
            "203.0.113.7/32 (IPv4) or 2001:db8::7/128 (IPv6)"
        ) from None
    if net.prefixlen == 0:
        raise ValueError(
            f"{field_name}: {cidr!r} would let the whole internet SSH to the machines: name the address SSH "
            "comes from instead, as a /32 (IPv4) or /128 (IPv6), e.g. the control plane's public IP"
        )
    too_wide = net.prefixlen < 8 if net.version == 4 else net.prefixlen < 32
    if too_wide:
        raise ValueError(
            f"{field_name}: {cidr!r} is wider than a /8 (IPv4) or /32 (IPv6): name the control plane's own "
            "address (a /32 or /128), or at most its network"
        )


def program_for(cloud: str) -> Callable[[InfraConfig], None]:
    """The Pulumi program of ``cloud`` (``infra.<cloud>.program``), imported only now: it needs the SDKs of the
    ``pulumi`` extra (``pip install 'cloudmodal[pulumi]'``)."""
    if cloud not in CLOUDS:
        raise ValueError(f"unknown cloud {cloud!r}: use one of {', '.join(CLOUDS)}")
    module = "lambda_cloud" if cloud == "lambda" else cloud
    package = __name__.rpartition(".")[0] or "infra"
    try:
        mod = importlib.import_module(f"{package}.{module}")
    except ModuleNotFoundError as e:
        if e.name and e.name.split(".")[0] in ("pulumi", "pulumi_aws", "pulumi_gcp", "pulumi_azure_native"):
            raise RuntimeError(
                f"the {cloud} program needs the Pulumi SDK ({e.name} is missing): "
                "pip install 'cloudmodal[pulumi]'"
            ) from e
        raise
    program: Callable[[InfraConfig], None] = mod.program
    return program


def store_url(bucket_url: str, prefix: str) -> str:
    return f"{bucket_url.rstrip('/')}/{prefix}"


def resource_name(cfg: InfraConfig, kind: str) -> str:
    """The logical (Pulumi) name of one of ``cfg``'s resources: ``<name>-<kind>``."""
    return f"{cfg.name}-{kind}"


def resource_tags() -> dict[str, str]:
    """The tags (labels on GCP) every resource that takes them carries, and the provider's defaults."""
    return {TAG_KEY: TAG_VALUE}


@dataclass(frozen=True)
class LifecycleRule:
    """One of the bucket's lifecycle rules, whatever the cloud: what under ``prefix/`` is deleted when."""

    id: str
    prefix: str
    noncurrent_days: int  # a noncurrent (overwritten or deleted) version is deleted this long after
    current_days: int | None = None  # a current object is deleted at this age (None: never by age)


def lifecycle_rules(cfg: InfraConfig) -> list[LifecycleRule]:
    """The bucket's lifecycle rules (each program adds the abort of incomplete uploads its cloud has). Current
    blobs never expire by age: the control plane's retention knows which are still referenced."""
    return [
        LifecycleRule("deleted-blobs", BLOB_PREFIX, noncurrent_days=cfg.blob_expiry_days),
        LifecycleRule("old-volume-versions", VOLUME_PREFIX, noncurrent_days=NONCURRENT_EXPIRY_DAYS),
        LifecycleRule("old-backups", BACKUP_PREFIX, noncurrent_days=1, current_days=BACKUP_EXPIRY_DAYS),
    ]


def export_outputs(
    cfg: InfraConfig,
    *,
    bucket_url: pulumi.Input[str],
    worker_identity: pulumi.Input[str],
    network: pulumi.Input[str],
) -> None:
    """Export the outputs every program has: the bucket, its stores and region, the workers' identity and
    network. Called from a program only (it imports the Pulumi SDK)."""
    import pulumi

    url = pulumi.Output.from_input(bucket_url)
    region = cfg.resolved_region
    pulumi.export(OUT_BUCKET_URL, url)
    pulumi.export(OUT_VOLUME_STORE, url.apply(lambda u: store_url(u, VOLUME_PREFIX)))
    pulumi.export(OUT_BLOB_STORE, url.apply(lambda u: store_url(u, BLOB_PREFIX)))
    pulumi.export(OUT_BUCKET_REGION, region)
    pulumi.export(OUT_VOLUME_STORE_REGION, f"{cfg.cloud}:{region}")
    pulumi.export(OUT_WORKER_IDENTITY, worker_identity)
    pulumi.export(OUT_NETWORK, network)


def export_control_host(cfg: InfraConfig, address: pulumi.Output[str] | pulumi.Output[str | None]) -> None:
    """Export the control host's public address and its control plane's URL (a program's, with_control_host)."""
    import pulumi

    pulumi.export(OUT_CONTROL_HOST_ADDRESS, address)
    pulumi.export(
        OUT_CONTROL_PLANE_URL,
        address.apply(lambda ip: control_plane_url(ip or "", cfg.control_plane_port)),
    )


# --- the control host ----------------------------------------------------------------------------------------

BACKUP_PREFIX = "backups"  # the control host's nightly pg_dump, kept BACKUP_EXPIRY_DAYS
BACKUP_EXPIRY_DAYS = 30
# What the control host installs (the extras its control plane needs: PostgreSQL's driver, the bucket stores).
CONTROL_HOST_PACKAGE = "cloudmodal[postgres,volumes]"
DATABASE_URL = "postgresql+psycopg://cloudmodal@/cloudmodal?host=/var/run/postgresql"


def control_plane_url(address: str, port: int) -> str:
    """The control host's URL. It serves TLS with a certificate generated on its first start, whose fingerprint
    clients pin at ``cloudmodal login``."""
    return f"https://{address}:{port}"


def control_host_user_data(cfg: InfraConfig, *, bucket_url: str, address: str, env: dict[str, str]) -> str:
    """The control host's cloud-init: PostgreSQL on the host (peer authentication over its Unix socket, so no
    password exists anywhere), the control plane as a systemd service listening on ``control_plane_port``, and a
    nightly ``pg_dump`` to ``backups/`` in the bucket. ``env``: the cloud's own variables (Azure's account and
    identity); the bucket's credentials come from the host's identity, never from this script."""
    region = f"{cfg.cloud}:{cfg.resolved_region}"
    service_env = {
        "CLOUDMODAL_DATABASE_URL": DATABASE_URL,
        "CLOUDMODAL_VOLUME_STORE": store_url(bucket_url, VOLUME_PREFIX),
        "CLOUDMODAL_BLOB_STORE": store_url(bucket_url, BLOB_PREFIX),
        "CLOUDMODAL_VOLUME_STORE_REGION": region,
        "CLOUDMODAL_NODE_SERVER_URL": control_plane_url(address, cfg.control_plane_port),
        "CLOUDMODAL_HOME": "/var/lib/cloudmodal",
        **env,
    }
    env_lines = "\n".join(f"      {k}={v}" for k, v in sorted(service_env.items()))
    backup_url = store_url(bucket_url, BACKUP_PREFIX)
    return f"""#cloud-config
package_update: true
packages: [postgresql, python3-venv]
users:
  - name: cloudmodal
    system: true
    homedir: /var/lib/cloudmodal
    shell: /usr/sbin/nologin
write_files:
  - path: /etc/cloudmodal/env
    permissions: "0600"
    content: |
{env_lines}
  - path: /etc/systemd/system/cloudmodal.service
    content: |
      [Unit]
      Description=cloudmodal control plane
      After=network-online.target postgresql.service
      Wants=network-online.target
      [Service]
      User=cloudmodal
      EnvironmentFile=/etc/cloudmodal/env
      ExecStart=/opt/cloudmodal/bin/cloudmodal server start --foreground --host 0.0.0.0 --port {cfg.control_plane_port}
      Restart=always
      RestartSec=5
      NoNewPrivileges=true
      ProtectSystem=strict
      ReadWritePaths=/var/lib/cloudmodal
      [Install]
      WantedBy=multi-user.target
  - path: /etc/systemd/system/cloudmodal-backup.service
    content: |
      [Unit]
      Description=cloudmodal database backup to {backup_url}
      [Service]
      Type=oneshot
      User=cloudmodal
      EnvironmentFile=/etc/cloudmodal/env
      ExecStart=/bin/sh -c 'pg_dump -Fc cloudmodal > /var/lib/cloudmodal/db.dump && /opt/cloudmodal/bin/python -c "import sys, time; from cloudmodal.volumes.store import open_store; open_store(sys.argv[1]).put(time.strftime(\\"%%Y%%m%%dT%%H%%M%%SZ\\", time.gmtime()) + \\".dump\\", open(sys.argv[2], \\"rb\\"))" {backup_url} /var/lib/cloudmodal/db.dump'
  - path: /etc/systemd/system/cloudmodal-backup.timer
    content: |
      [Timer]
      OnCalendar=daily
      Persistent=true
      [Install]
      WantedBy=timers.target
runcmd:
  - install -d -o cloudmodal -g cloudmodal -m 0700 /var/lib/cloudmodal
  - python3 -m venv /opt/cloudmodal
  - /opt/cloudmodal/bin/pip install '{CONTROL_HOST_PACKAGE}'
  - sudo -u postgres createuser cloudmodal
  - sudo -u postgres createdb -O cloudmodal cloudmodal
  - systemctl daemon-reload
  - systemctl enable --now cloudmodal.service cloudmodal-backup.timer
"""
