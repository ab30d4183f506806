"""GCP nodes: Compute Engine VMs through SkyPilot's GCP provisioner (``sky.provision.gcp``).

``create`` builds the ``ProvisionConfig`` SkyPilot's ``gcp-ray.yml.j2`` template would produce for the offer
(machine type, the GPU as ``guestAccelerators``, SkyPilot's GPU image from the catalog's ``gcp/images.csv``,
a pd-balanced boot disk, spot ``scheduling``, the SSH key in ``ssh-keys`` metadata for ``gcpuser``, the tags
as labels), then calls ``bootstrap_instances`` (project, service account and IAM check, VPC/subnet and
firewall check) and ``run_instances``.

Waiting: SkyPilot's GCP ``run_instances`` waits for the ``bulkInsert`` operation (``zoneOperations.wait``)
and then polls every second until no instance of the cluster is PROVISIONING/STAGING, so ``create`` returns
when the VM is RUNNING (tens of seconds on GCP), not merely when the request is accepted. A stockout,
however, comes back at once: GCP reports it on the *operation* (``ZONE_RESOURCE_POOL_EXHAUSTED``), SkyPilot
raises on the first failed operation without retrying (``bulkInsert`` is sent with ``num_retries=0``), and
the driver maps it here.

Reads: ``query`` uses SkyPilot's own instance filter (``GCPComputeInstance.filter``); ``list`` and
``signals`` call the REST API (``instances.aggregatedList``, ``acceleratorTypes.aggregatedList``,
``regions.list``) with clients from the same factory SkyPilot uses (``sky.adaptors.gcp.build``).

Endpoint override (``api_endpoint=`` or ``$CLOUDMODAL_GCP_API_ENDPOINT``): every Google API client SkyPilot
and this driver build goes to ``{api_endpoint}/{service}/{servicePath}`` instead of
``https://{service}.googleapis.com/{servicePath}`` (compute: ``{api_endpoint}/compute/compute/v1/``). It is
applied in one place, :func:`~cloudmodal.providers.gcp_endpoint.use_api_endpoint`, which wraps
``sky.adaptors.gcp.build`` for the whole process (SkyPilot builds its clients in worker threads too), so
every driver of a process must agree on it. For a private gateway, a proxy, or a local fake.

Labels: GCP label keys and values allow only lower-case letters, digits, ``-`` and ``_``. Tag values are
encoded reversibly (``_`` -> ``__``, an upper-case letter -> ``_`` + the letter) and decoded on the way
back, so ``list``/``query`` return the tags that were given (:mod:`cloudmodal.providers.gcp_labels`).

Errors: one table, ``ERRORS`` in :mod:`cloudmodal.providers.gcp_errors`, keyed by GCP's code (the
operation's ``error.errors[].code`` or an HTTP error's ``errors[].reason``); ``reason`` is that code.
SkyPilot wraps both in ``ProvisionerError`` (its ``.errors`` list), or lets
``googleapiclient.errors.HttpError`` and ``google.auth`` errors through; the driver walks the exception and
its causes.
"""

from __future__ import annotations

import builtins
import csv
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from cloudmodal.providers import _sky
from cloudmodal.providers.base import (
    CredentialsError,
    LaunchRequest,
    ProviderError,
    Signal,
)
from cloudmodal.providers.gcp_endpoint import endpoint_for, release_api_endpoint, use_api_endpoint
from cloudmodal.providers.gcp_errors import CREDENTIALS_FIX, ERRORS, gcp_errors, map_gcp_error
from cloudmodal.providers.gcp_labels import decode_label, encode_label, encode_labels
from cloudmodal.providers.nodes import (
    TAG_APP,
    TAG_CONTROL_PLANE,
    TAG_FUNCTION,
    TAG_WORKER,
    NodeDriver,
    NodeInfo,
    NodeRef,
    NodeState,
)

log = logging.getLogger(__name__)

CLOUD = "gcp"
ENDPOINT_ENV = "CLOUDMODAL_GCP_API_ENDPOINT"
SSH_USER = "gcpuser"  # SkyPilot's user on its GCP images (gcp-ray.yml.j2: auth.ssh_user)
DEFAULT_DISK_GB = 256  # SkyPilot's default disk size
IMAGES_FILE = "images.csv"
SIGNALS_TTL_S = 300.0
TAG_CLUSTER = "ray-cluster-name"  # sky.provision.constants.TAG_RAY_CLUSTER_NAME
TAG_SKY_CLUSTER = "skypilot-cluster-name"
OUR_TAGS = (TAG_CONTROL_PLANE, TAG_APP, TAG_FUNCTION, TAG_WORKER)
PREEMPTED_OP = "compute.instances.preempted"  # the zone operation GCP records when it reclaims a spot VM
MAX_CLUSTER_NAME = 42  # SkyPilot appends "-head-<8 chars>-compute" (22) and asserts the name fits in 64

# GCP accelerator type -> (cloudmodal's canonical GPU name, regional quota metric, SkyPilot's catalog name).
GPUS: dict[str, tuple[str, str, str]] = {
    "nvidia-tesla-t4": ("T4", "NVIDIA_T4_GPUS", "T4"),
    "nvidia-tesla-v100": ("V100", "NVIDIA_V100_GPUS", "V100"),
    "nvidia-tesla-p100": ("P100", "NVIDIA_P100_GPUS", "P100"),
    "nvidia-tesla-p4": ("P4", "NVIDIA_P4_GPUS", "P4"),
    "nvidia-tesla-k80": ("K80", "NVIDIA_K80_GPUS", "K80"),
    "nvidia-tesla-a100": ("A100-40GB", "NVIDIA_A100_GPUS", "A100"),
    "nvidia-a100-80gb": ("A100-80GB", "NVIDIA_A100_80GB_GPUS", "A100-80GB"),
    "nvidia-l4": ("L4", "NVIDIA_L4_GPUS", "L4"),
    "nvidia-h100-80gb": ("H100", "NVIDIA_H100_GPUS", "H100"),
    "nvidia-h100-mega-80gb": ("H100", "NVIDIA_H100_MEGA_GPUS", "H100-MEGA"),
    "nvidia-h200-141gb": ("H200", "NVIDIA_H200_GPUS", "H200"),
    "nvidia-b200": ("B200", "NVIDIA_B200_GPUS", "B200"),
    "nvidia-rtx-pro-6000": ("RTX-PRO-6000", "NVIDIA_RTX_PRO_6000_GPUS", "RTXPRO6000"),
}
# SkyPilot's image tags (sky/clouds/gcp.py): CUDA 13 by default, CUDA 12 for pre-Turing GPUs, K80 apart.
IMAGE_DEFAULT = "skypilot:custom-gpu-ubuntu-2204-cuda13"
IMAGE_LEGACY = "skypilot:custom-gpu-ubuntu-2204"
IMAGE_K80 = "skypilot:k80-debian-10"
LEGACY_DRIVER_GPUS = ("V100", "P100", "P4", "M60")
# Machine series that only take Hyperdisk (SkyPilot's _get_disk_type); everything else gets pd-balanced.
HYPERDISK_ONLY = ("a3-ultragpu", "a4-", "g4-", "n4-")


# --- helpers -------------------------------------------------------------------------------------------


def _field(offer: Any, name: str) -> Any:
    return offer.get(name) if isinstance(offer, dict) else getattr(offer, name, None)


def accelerator_type(gpu: str, instance_type: str) -> str:
    """GCP's accelerator type for cloudmodal's canonical GPU name on ``instance_type``."""
    if gpu == "H100" and instance_type.startswith("a3-megagpu"):
        return "nvidia-h100-mega-80gb"
    for gcp_name, (canonical, _metric, _sky_name) in GPUS.items():
        if canonical == gpu and gcp_name != "nvidia-h100-mega-80gb":
            return gcp_name
    raise ProviderError(f"GPU {gpu!r} has no GCP accelerator type known to cloudmodal.", reason="unknown-gpu")


def image_tag(gpu: str, instance_type: str) -> str:
    sky_name = GPUS[accelerator_type(gpu, instance_type)][2]
    if sky_name == "K80":
        return IMAGE_K80
    return IMAGE_LEGACY if sky_name in LEGACY_DRIVER_GPUS else IMAGE_DEFAULT


def disk_type(instance_type: str) -> str:
    return "hyperdisk-balanced" if instance_type.startswith(HYPERDISK_ONLY) else "pd-balanced"


def _basename(link: str | None) -> str:
    return (link or "").rsplit("/", 1)[-1]


def _credentials_file() -> tuple[Path | None, str]:
    """The credentials file google.auth would use, and where it came from."""
    env = os.environ.get("GOOGLE_APPLICATION_CREDENTIALS")
    if env:
        return Path(env).expanduser(), "GOOGLE_APPLICATION_CREDENTIALS"
    config = os.environ.get("CLOUDSDK_CONFIG") or str(Path.home() / ".config" / "gcloud")
    adc = Path(config) / "application_default_credentials.json"
    return (adc, "gcloud application-default credentials") if adc.exists() else (None, "")


class GcpNodes(NodeDriver):
    """Compute Engine VMs through SkyPilot's GCP provisioner. Thread-safe."""

    cloud = CLOUD

    def __init__(
        self,
        *,
        project: str | None = None,
        regions: list[str] | tuple[str, ...] | None = None,
        catalog_dir: str | os.PathLike[str] | None = None,
        api_endpoint: str | None = None,
        service_account: str | None = None,
    ) -> None:
        """``service_account``: the email of the service account nodes run as (``cloudmodal infra up --cloud
        gcp`` makes one allowed on its bucket only); None leaves SkyPilot's ``skypilot-v1`` account, which may
        manage compute and storage in the whole project."""
        self._project = project
        self._service_account = service_account
        self.regions = tuple(regions) if regions else None
        self._catalog_dir = catalog_dir
        self.api_endpoint = api_endpoint or os.environ.get(ENDPOINT_ENV) or None
        self._endpoint_installed = False
        self._lock = threading.Lock()
        self._signals: tuple[float, builtins.list[Signal]] | None = None
        self._images: dict[str, str] | None = None

    # -- set-up ----------------------------------------------------------------------------------------

    def _provision(self) -> Any:
        """``sky.provision``, with this driver's endpoint override applied first."""
        sky_provision = _sky.provision()
        with self._lock:
            if self.api_endpoint and not self._endpoint_installed:
                use_api_endpoint(self.api_endpoint)
                self._endpoint_installed = True
        return sky_provision

    def close(self) -> None:
        with self._lock:
            if self._endpoint_installed:
                release_api_endpoint()
                self._endpoint_installed = False

    def _build(self, service: str = "compute", version: str = "v1") -> Any:
        """A client from SkyPilot's factory (so the endpoint override applies); credentials from google.auth."""
        self._provision()
        import sky.adaptors.gcp as adaptor

        return adaptor.build(service, version, credentials=None, cache_discovery=False)

    @property
    def project(self) -> str:
        """The project: as given, else the credentials file's, else ``$GOOGLE_CLOUD_PROJECT``."""
        if self._project:
            return self._project
        path, _ = _credentials_file()
        if path is not None:
            try:
                info = json.loads(path.read_text())
                found = info.get("project_id") or info.get("quota_project_id")
                if found:
                    return str(found)
            except (OSError, ValueError):
                pass
        for var in ("GOOGLE_CLOUD_PROJECT", "CLOUDSDK_CORE_PROJECT", "GCLOUD_PROJECT"):
            if os.environ.get(var):
                return os.environ[var]
        raise CredentialsError(
            "No GCP project: the credentials do not name one. Fix: pass GcpNodes(project='my-project') or "
            "export GOOGLE_CLOUD_PROJECT=my-project.",
            reason="no-project",
        )

    def _catalog_path(self) -> Path:
        if self._catalog_dir is not None:
            return Path(self._catalog_dir).expanduser()
        from cloudmodal.pricing.catalog import catalog_dir

        return catalog_dir()

    def image_id(self, tag: str) -> str:
        """The image behind a SkyPilot tag, from the catalog's ``gcp/images.csv``."""
        with self._lock:
            if self._images is None:
                images: dict[str, str] = {}
                path = self._catalog_path() / CLOUD / IMAGES_FILE
                try:
                    with open(path, newline="", encoding="utf-8") as f:
                        for row in csv.DictReader(f):
                            if row.get("Tag") and row.get("ImageId"):
                                images[row["Tag"]] = row["ImageId"]
                except FileNotFoundError:
                    pass
                self._images = images
        found = self._images.get(tag)
        if found is None:
            raise ProviderError(
                f"No GCP image for {tag!r} in {self._catalog_path() / CLOUD / IMAGES_FILE}. Fix: run "
                "`cloudmodal pricing refresh` (it downloads SkyPilot's images.csv with the catalogs).",
                reason="no-image",
            )
        return found

    # -- offers and check ------------------------------------------------------------------------------

    def offers(self) -> list[Any]:
        from cloudmodal.pricing.catalog import load_offer_table

        table = load_offer_table(self._catalog_path())
        return [o for o in table if o.cloud == CLOUD and (self.regions is None or o.region in self.regions)]

    def check(self) -> tuple[bool, str]:
        path, source = _credentials_file()
        if path is None:
            return False, (
                "No GCP credentials: neither GOOGLE_APPLICATION_CREDENTIALS nor gcloud's application-default "
                "credentials (~/.config/gcloud/application_default_credentials.json) are set. Fix: run "
                "`gcloud auth application-default login`, or export GOOGLE_APPLICATION_CREDENTIALS=/path/key.json "
                "for a service account."
            )
        try:
            info = json.loads(path.read_text())
        except FileNotFoundError:
            return False, f"{source} names {path}, which does not exist. Fix: point it at your key file."
        except (OSError, ValueError) as e:
            return (
                False,
                f"{source} ({path}) is not a readable JSON key file ({type(e).__name__}). {CREDENTIALS_FIX}",
            )
        kind = info.get("type", "?")
        who = info.get("client_email") or ("your gcloud user" if kind == "authorized_user" else kind)
        try:
            project = self.project
        except CredentialsError as e:
            return False, e.message
        try:
            with gcp_errors(doing=f"reading project {project}"):
                self._build().projects().get(project=project).execute(num_retries=1)
        except ProviderError as e:
            return False, e.message
        return True, f"{who} ({kind} from {source}), project {project}"

    # -- create ----------------------------------------------------------------------------------------

    def _provider_config(self, region: str, zone: str) -> dict[str, Any]:
        return {
            "type": "external",
            "module": "sky.provision.gcp",
            "region": region,
            "availability_zone": zone,
            "project_id": self.project,
            "cache_stopped_nodes": False,
            "use_internal_ips": False,
            "force_enable_external_ips": False,
            "disable_launch_config_check": True,
            "use_managed_instance_group": False,
            "network_tier": "standard",
        }

    def node_config(
        self, req: LaunchRequest, *, zone: str, labels: dict[str, str], ssh_public_key: str
    ) -> dict[str, Any]:
        """The ``node_config`` SkyPilot's GCP template makes for the offer (no optimizer involved)."""
        offer = req.offer
        instance_type = str(_field(offer, "instance_type"))
        gpu = _field(offer, "gpu")
        count = int(_field(offer, "gpu_count") or 0)
        items = [{"key": "ssh-keys", "value": f"{SSH_USER}:{ssh_public_key.strip()}"}]
        config: dict[str, Any] = {
            "labels": dict(labels),
            "machineType": instance_type,
            "disks": [
                {
                    "boot": True,
                    "autoDelete": True,
                    "type": "PERSISTENT",
                    "initializeParams": {
                        "diskSizeGb": DEFAULT_DISK_GB,
                        "sourceImage": self.image_id(image_tag(gpu, instance_type) if gpu else IMAGE_DEFAULT),
                        "diskType": f"zones/{zone}/diskTypes/{disk_type(instance_type)}",
                    },
                }
            ],
            "metadata": {"items": items},
        }
        scheduling: dict[str, Any] = {}
        if gpu and count:
            config["guestAccelerators"] = [
                {
                    "acceleratorType": f"projects/{self.project}/zones/{zone}/acceleratorTypes/"
                    f"{accelerator_type(gpu, instance_type)}",
                    "acceleratorCount": count,
                }
            ]
            items.append({"key": "install-nvidia-driver", "value": "True"})
            scheduling["onHostMaintenance"] = "TERMINATE"  # GPU VMs cannot live-migrate
        if req.market == "spot":
            # As SkyPilot, except that a reclaimed VM is stopped (status TERMINATED) rather than deleted, so
            # query() can tell a preemption from a deletion; terminate() then deletes it.
            scheduling.update(
                {
                    "automaticRestart": False,
                    "instanceTerminationAction": "STOP",
                    "onHostMaintenance": "TERMINATE",
                    "provisioningModel": "SPOT",
                    "preemptible": True,
                }
            )
        if scheduling:
            config["scheduling"] = scheduling
        return config

    def create(self, req: LaunchRequest, *, name: str, tags: dict[str, str], ssh_public_key: str) -> NodeRef:
        offer = req.offer
        if offer is None:
            raise ProviderError("A GCP node needs an offer (machine type, zone).", reason="no-offer")
        region = str(_field(offer, "region"))
        zone = _field(offer, "zone")
        if not zone:
            raise ProviderError(
                f"GCP offers must name a zone; {offer!r} does not.", offer=offer, reason="no-zone"
            )
        if len(name) > MAX_CLUSTER_NAME:
            raise ProviderError(
                f"Node name {name!r} is longer than {MAX_CLUSTER_NAME} characters (GCP instance names are at most "
                "63 once SkyPilot adds its suffix).",
                offer=offer,
                reason="name-too-long",
            )
        sky_provision = self._provision()
        from sky.provision import common

        labels = encode_labels(tags)
        doing = f"creating {name} ({_field(offer, 'instance_type')} in {zone}, {req.market})"
        with gcp_errors(offer=offer, doing=doing):
            config = common.ProvisionConfig(
                provider_config=self._provider_config(region, str(zone)),
                authentication_config={"ssh_user": SSH_USER},
                docker_config={},
                node_config=self.node_config(
                    req, zone=str(zone), labels=labels, ssh_public_key=ssh_public_key
                ),
                count=1,
                tags=labels,
                resume_stopped_nodes=False,
                ports_to_open_on_launch=None,
            )
            config = sky_provision.bootstrap_instances(CLOUD, region, name, config)
            if self._service_account:
                # SkyPilot's bootstrap always sets its own account; nodes run as the configured one instead
                config.node_config["serviceAccounts"] = [
                    {
                        "email": self._service_account,
                        "scopes": ["https://www.googleapis.com/auth/cloud-platform"],
                    }
                ]
            record = sky_provision.run_instances(CLOUD, region, name, name, config)
        return NodeRef(
            cloud=CLOUD, region=region, zone=str(zone), cluster=name, instance_id=record.head_instance_id
        )

    # -- reads -----------------------------------------------------------------------------------------

    def _info(self, inst: dict[str, Any], ref: NodeRef | None = None) -> NodeInfo:
        zone = _basename(inst.get("zone"))
        labels = dict(inst.get("labels") or {})
        cluster = labels.get(TAG_CLUSTER) or labels.get(TAG_SKY_CLUSTER) or (ref.cluster if ref else "")
        sched = inst.get("scheduling") or {}
        spot = sched.get("provisioningModel") == "SPOT" or bool(sched.get("preemptible"))
        status = str(inst.get("status", ""))
        state: NodeState
        detail = status
        if status in ("PROVISIONING", "STAGING", "REPAIRING"):
            state = "pending"
        elif status == "RUNNING":
            state = "running"
        elif status in ("STOPPING", "SUSPENDING", "PENDING_STOP"):
            state = "stopping"
        elif status in ("TERMINATED", "SUSPENDED"):
            # Our nodes are never stopped by the driver: a stopped spot VM was reclaimed by GCP.
            state = "preempted" if spot else "terminated"
        else:
            state = "unknown"
        nic = (inst.get("networkInterfaces") or [{}])[0]
        access = (nic.get("accessConfigs") or [{}])[0]
        tags = {k: decode_label(v) if k in OUR_TAGS else v for k, v in labels.items()}
        return NodeInfo(
            ref=NodeRef(
                cloud=CLOUD,
                region=zone.rsplit("-", 1)[0],
                zone=zone,
                cluster=cluster,
                instance_id=str(inst.get("name")),
            ),
            state=state,
            public_ip=access.get("natIP"),
            private_ip=nic.get("networkIP"),
            ssh_user=SSH_USER,
            market="spot" if spot else "on-demand",
            instance_type=_basename(inst.get("machineType")) or None,
            tags=tags,
            detail=detail,
        )

    def _preemption_detail(self, zone: str, inst: dict[str, Any]) -> str | None:
        """GCP's record of the preemption (a ``compute.instances.preempted`` zone operation), if any."""
        flt = f'(operationType = "{PREEMPTED_OP}") AND (targetLink = "{inst.get("selfLink", "")}")'
        ops = self._build().zoneOperations().list(project=self.project, zone=zone, filter=flt).execute()
        for op in ops.get("items") or []:
            return f"{PREEMPTED_OP} at {op.get('endTime') or op.get('insertTime') or '?'}"
        return None

    def list(self, tags: dict[str, str]) -> list[NodeInfo]:
        """Every instance still present (stopped ones included: they keep a disk) carrying all ``tags``."""
        labels = encode_labels(tags)
        flt = " AND ".join(f"(labels.{k} = {v})" for k, v in sorted(labels.items()))
        out: builtins.list[NodeInfo] = []
        with gcp_errors(doing="listing instances"):
            compute = self._build()
            request = compute.instances().aggregatedList(project=self.project, filter=flt or None)
            while request is not None:
                page = request.execute(num_retries=3)
                for scope in (page.get("items") or {}).values():
                    for inst in scope.get("instances") or []:
                        if all((inst.get("labels") or {}).get(k) == v for k, v in labels.items()):
                            info = self._info(inst)
                            if self.regions is None or info.ref.region in self.regions:
                                out.append(info)
                request = compute.instances().aggregatedList_next(request, page)
        return out

    def query(self, ref: NodeRef) -> NodeInfo:
        if not ref.zone:
            found = [n for n in self.list({}) if n.ref.cluster == ref.cluster]
            return (
                found[0]
                if found
                else NodeInfo(ref=ref, state="terminated", ssh_user=SSH_USER, detail="not found")
            )
        self._provision()
        from sky.provision.gcp import instance_utils

        with gcp_errors(doing=f"querying {ref.cluster}"):
            instances = instance_utils.GCPComputeInstance.filter(
                project_id=self.project,
                zone=ref.zone,
                label_filters={TAG_CLUSTER: ref.cluster},
                status_filters=None,
            )
            if ref.instance_id and ref.instance_id in instances:
                inst = instances[ref.instance_id]
            elif instances:
                inst = next(iter(instances.values()))
            else:
                return NodeInfo(ref=ref, state="terminated", ssh_user=SSH_USER, detail="not found")
            info = self._info(inst, ref)
            if info.state == "preempted":
                marker = self._preemption_detail(ref.zone, inst)
                if marker:
                    info = NodeInfo(**{**info.__dict__, "detail": marker})
        return info

    def terminate(self, ref: NodeRef) -> None:
        zone = ref.zone
        if not zone:
            info = self.query(ref)
            if info.state == "terminated" and info.detail == "not found":
                return
            zone = info.ref.zone
        sky_provision = self._provision()
        with gcp_errors(doing=f"terminating {ref.cluster}"):
            sky_provision.terminate_instances(
                CLOUD, ref.cluster, self._provider_config(ref.region, str(zone))
            )

    # -- signals ---------------------------------------------------------------------------------------

    def signals(self) -> builtins.list[Signal]:
        """Accelerator types per zone (``available``) and regional GPU quota left, cached 5 minutes."""
        with self._lock:
            cached = self._signals
        if cached is not None and time.time() - cached[0] < SIGNALS_TTL_S:
            return builtins.list(cached[1])
        now = time.time()
        with gcp_errors(doing="reading accelerator types and quotas"):
            compute = self._build()
            accel_page = (
                compute.acceleratorTypes().aggregatedList(project=self.project).execute(num_retries=3)
            )
            regions_page = compute.regions().list(project=self.project).execute(num_retries=3)
        quotas: dict[str, dict[str, float]] = {}
        for region in regions_page.get("items") or []:
            quotas[region["name"]] = {
                q["metric"]: float(q.get("limit", 0)) - float(q.get("usage", 0))
                for q in region.get("quotas") or []
            }
        offered: dict[str, set[str]] = {}  # zone -> GCP accelerator types
        for scope, body in (accel_page.get("items") or {}).items():
            zone = scope.rsplit("/", 1)[-1]
            offered[zone] = {a["name"] for a in body.get("acceleratorTypes") or []}
        # The catalog's (zone, accelerator type) pairs, so a GPU missing from a zone reads as unavailable.
        expected: dict[str, set[str]] = {}
        try:
            for o in self.offers():
                if o.zone:
                    expected.setdefault(o.zone, set()).add(accelerator_type(o.gpu, o.instance_type))
        except Exception as e:  # no catalog, or a GPU unknown here: signals still report what GCP says
            log.debug("gcp signals without catalog offers: %s", e)
        out: builtins.list[Signal] = []
        for zone in sorted(set(offered) | set(expected)):
            region = zone.rsplit("-", 1)[0]
            if self.regions is not None and region not in self.regions:
                continue
            for acc in sorted(offered.get(zone, set()) | expected.get(zone, set())):
                if acc not in GPUS:
                    continue
                canonical, metric, _ = GPUS[acc]
                left = quotas.get(region, {})
                od = left.get(metric)
                spot = left.get(f"PREEMPTIBLE_{metric}")
                available = acc in offered.get(zone, set()) if zone in offered else None
                out.append(
                    Signal(
                        cloud=CLOUD,
                        region=region,
                        zone=zone,
                        gpu=canonical,
                        available=available,
                        quota_left_gpus=None if od is None else max(0, int(od)),
                        observed_at=now,
                        detail=f"{acc}; {metric} left {od if od is not None else '?'}"
                        + (f", PREEMPTIBLE_{metric} left {spot}" if spot is not None else ""),
                    )
                )
        with self._lock:
            self._signals = (now, out)
        return builtins.list(out)


__all__ = [
    "CLOUD",
    "ENDPOINT_ENV",
    "ERRORS",
    "GPUS",
    "GcpNodes",
    "accelerator_type",
    "decode_label",
    "encode_label",
    "endpoint_for",
    "map_gcp_error",
    "use_api_endpoint",
]
