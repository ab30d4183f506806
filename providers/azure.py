"""Azure nodes through SkyPilot's Azure provisioner (``sky.provision.azure``, SkyPilot 0.14.1).

One node = one SkyPilot "cluster" of one VM in a resource group of its own (``<node name>-<region>``,
SkyPilot's default naming), so terminating a node deletes its resource group and with it the VM, NIC, public
IP, NSG, VNet and managed identity SkyPilot's bootstrap made for it.

How a create runs (all SkyPilot code, against the azure-mgmt SDK):
``bootstrap_instances`` (PUT resource group, GET/PUT the ``skypilot-config`` ARM template deployment whose
outputs name the NSG, subnet and managed identity) → ``run_instances`` (PUT public IP, PUT NIC, PUT VM, each a
long-running operation; then it polls instance views until the VM is running, and tags the head node).
SkyPilot's ``run_instances`` blocks on the VM's create operation (``_create_vm`` calls ``poller.result()``):
Azure reports allocation failures (``AllocationFailed``...) only at the end of that operation, so "accepted"
on Azure means "allocated"; ``create`` returns then, never waiting for SSH (``wait_instances`` is a no-op on
Azure).

Spot: SkyPilot sends ``priority: Spot`` and no eviction policy, so Azure applies its default, *Deallocate*:
an evicted VM stays, deallocated. :meth:`AzureNodes.query` reports a deallocated Spot VM as ``preempted``
(cloudmodal never stops VMs, so a deallocated Spot VM was evicted) and the control plane terminates it.

The one seam into SkyPilot (:mod:`cloudmodal.providers.azure_clients`, SkyPilot-internal, pinned):
SkyPilot builds every azure-mgmt client in ``sky.adaptors.azure.get_client(name, subscription_id)`` with the
Azure CLI credential and no options. The driver replaces that function, for the subscriptions drivers registered, with one that
builds the clients itself: the credential (az CLI login, or a service principal from ``AZURE_CLIENT_ID`` /
``AZURE_TENANT_ID`` / ``AZURE_CLIENT_SECRET``), and the driver's ARM options — ``arm_endpoint`` (env
``CLOUDMODAL_AZURE_ARM_ENDPOINT``; e.g. a sovereign cloud's ARM, or a local fake), ``arm_ca_bundle`` (env
``CLOUDMODAL_AZURE_ARM_CA_BUNDLE``; a CA file to verify that endpoint's TLS certificate), ``arm_retry_total``
and ``arm_polling_interval`` (the SDK's retry count and seconds between polls of a long-running operation;
SDK defaults when None). Other subscriptions and clients fall through to SkyPilot's own function.
"""

from __future__ import annotations

import builtins
import json
import logging
import os
import re
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from cloudmodal.providers import _sky
from cloudmodal.providers.azure_clients import ArmTarget, install_client_seam
from cloudmodal.providers.azure_errors import LOGIN_FIX, azure_error_code, map_azure_error
from cloudmodal.providers.base import (
    CredentialsError,
    LaunchRequest,
    ProviderError,
    Signal,
)
from cloudmodal.providers.nodes import NodeDriver, NodeInfo, NodeRef, NodeState

log = logging.getLogger(__name__)

CLOUD = "azure"
ENV_ARM_ENDPOINT = "CLOUDMODAL_AZURE_ARM_ENDPOINT"
ENV_ARM_CA_BUNDLE = "CLOUDMODAL_AZURE_ARM_CA_BUNDLE"
SSH_USER = "azureuser"
# Ubuntu 22.04 with NVIDIA drivers and CUDA (Microsoft's HPC image; SkyPilot's GPU fallback image too).
DEFAULT_IMAGE = "microsoft-dsvm:ubuntu-hpc:2204:latest"
SIGNALS_TTL_S = 300.0
# The driver's own tags, read back by query (SkyPilot's cluster info carries tags but not the VM's priority
# or size): spot / on-demand, and the VM size.
TAG_MARKET = "cloudmodal-market"
TAG_INSTANCE_TYPE = "cloudmodal-instance-type"
TAG_CLUSTER = "skypilot-cluster-name"  # SkyPilot's tag with the cluster (node) name

# --- credentials and subscription discovery --------------------------------------------------------------


def azure_config_dir() -> Path:
    return Path(os.environ.get("AZURE_CONFIG_DIR") or Path.home() / ".azure")


def _cli_profile() -> dict[str, Any] | None:
    """The az CLI's ``azureProfile.json`` (written with a UTF-8 byte order mark), or None."""
    path = azure_config_dir() / "azureProfile.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _default_cli_subscription(profile: dict[str, Any] | None) -> dict[str, Any] | None:
    subs = [s for s in (profile or {}).get("subscriptions") or [] if isinstance(s, dict)]
    return next((s for s in subs if s.get("isDefault")), subs[0] if subs else None)


def _service_principal() -> str | None:
    """The service principal's client id when the environment configures one (azure-identity's names)."""
    if (
        os.environ.get("AZURE_CLIENT_ID")
        and os.environ.get("AZURE_TENANT_ID")
        and (os.environ.get("AZURE_CLIENT_SECRET") or os.environ.get("AZURE_CLIENT_CERTIFICATE_PATH"))
    ):
        return os.environ["AZURE_CLIENT_ID"]
    return None


# --- the driver -----------------------------------------------------------------------------------------


class AzureNodes(NodeDriver):
    """Azure VMs through SkyPilot's provisioner (see the module docstring for options and behaviour)."""

    cloud = CLOUD

    def __init__(
        self,
        *,
        subscription_id: str | None = None,
        regions: list[str] | tuple[str, ...] | None = None,
        catalog_dir: str | os.PathLike[str] | None = None,
        arm_endpoint: str | None = None,
        arm_ca_bundle: str | None = None,
        arm_retry_total: int | None = None,
        arm_polling_interval: float | None = None,
        image_id: str = DEFAULT_IMAGE,
        disk_size_gb: int = 256,
    ) -> None:
        self._subscription_id = subscription_id
        self.regions = tuple(regions) if regions else None
        self.catalog_dir = catalog_dir
        self.arm_endpoint = (arm_endpoint or os.environ.get(ENV_ARM_ENDPOINT) or "").rstrip("/") or None
        self.arm_ca_bundle = arm_ca_bundle or os.environ.get(ENV_ARM_CA_BUNDLE) or None
        self.arm_retry_total = arm_retry_total
        self.arm_polling_interval = arm_polling_interval
        self.image_id = image_id
        self.disk_size_gb = disk_size_gb
        self._signals: dict[str, tuple[float, list[Signal]]] = {}
        self._lock = threading.Lock()

    # --- set-up ---

    @property
    def subscription_id(self) -> str:
        """The subscription: the option, else ``AZURE_SUBSCRIPTION_ID``, else the az CLI's default."""
        sub = self._subscription_id or os.environ.get("AZURE_SUBSCRIPTION_ID")
        if not sub:
            default = _default_cli_subscription(_cli_profile())
            sub = str(default.get("id") or "") if default else ""
        if not sub:
            raise CredentialsError(
                "No Azure subscription is configured: " + LOGIN_FIX + " and set AZURE_SUBSCRIPTION_ID "
                "(or `az account set --subscription <id>`).",
                reason="no-subscription",
            )
        return sub

    def _target(self) -> ArmTarget:
        return ArmTarget(
            endpoint=self.arm_endpoint,
            ca_bundle=self.arm_ca_bundle,
            retry_total=self.arm_retry_total,
            polling_interval=self.arm_polling_interval,
            service_principal=_service_principal() is not None,
        )

    def _provision(self) -> Any:
        """``sky.provision`` with this driver's subscription routed through the client seam."""
        sky_provision = _sky.provision()
        install_client_seam(self.subscription_id, self._target())
        return sky_provision

    def _client(self, name: str) -> Any:
        self._provision()
        import sky.adaptors.azure as adaptor

        return adaptor.get_client(name, self.subscription_id)

    @staticmethod
    def resource_group(cluster: str, region: str) -> str:
        return f"{cluster}-{region}"

    def _provider_config(
        self, cluster: str, region: str, tags: dict[str, str] | None = None
    ) -> dict[str, Any]:
        cfg: dict[str, Any] = {
            "type": "external",
            "module": "sky.provision.azure",
            "location": region,
            "resource_group": self.resource_group(cluster, region),
            "use_external_resource_group": False,
            "subscription_id": self.subscription_id,
            "use_internal_ips": False,
            "cache_stopped_nodes": False,
            "disable_launch_config_check": True,
        }
        if tags:
            cfg["tags"] = dict(tags)  # on the resource group too: leaked groups are findable by tag
        return cfg

    # --- NodeDriver ---

    def offers(self) -> list[Any]:
        from cloudmodal.pricing.catalog import load_offer_table

        table = load_offer_table(self.catalog_dir)
        return [
            o for o in table.offers if o.cloud == CLOUD and (self.regions is None or o.region in self.regions)
        ]

    def check(self) -> tuple[bool, str]:
        sp = _service_principal()
        profile = _cli_profile()
        if sp is None:
            if shutil.which("az") is None:
                return (
                    False,
                    "The Azure CLI (`az`) is not on PATH and no service principal is set: " + LOGIN_FIX + ".",
                )
            if _default_cli_subscription(profile) is None:
                return False, (
                    f"The Azure CLI has no login ({azure_config_dir() / 'azureProfile.json'} lists no "
                    "subscription): " + LOGIN_FIX + "."
                )
        try:
            sub = self.subscription_id
        except CredentialsError as e:
            return False, e.message
        try:
            client = self._client("resource")
            next(iter(client.resource_groups.list(top=1)), None)  # the one read-only call
        except Exception as e:
            err = map_azure_error(e, doing=f"list resource groups of subscription {sub}")
            return False, err.message
        if sp is not None:
            who = f"service principal {sp}"
        else:
            default = _default_cli_subscription(profile) or {}
            user = (default.get("user") or {}).get("name") or "?"
            who = f"az CLI login {user}"
        endpoint = f" at {self.arm_endpoint}" if self.arm_endpoint else ""
        return True, f"Azure subscription {sub} as {who}{endpoint}"

    def _node_config(self, req: LaunchRequest, tags: dict[str, str], ssh_public_key: str) -> dict[str, Any]:
        offer = req.offer
        publisher, image_offer, sku, version = self.image_id.split(":")
        params: dict[str, Any] = {
            "adminUsername": SSH_USER,
            "publicKey": ssh_public_key.strip(),
            "vmSize": offer.instance_type,
            "imagePublisher": publisher,
            "imageOffer": image_offer,
            "imageSku": sku,
            "imageVersion": version,
            "osDiskSizeGB": self.disk_size_gb,
            "osDiskTier": _disk_tier(offer.instance_type),
            # Keep apt free for the node bootstrap (cloudmodal installs over SSH right after boot).
            "cloudInitSetupCommands": "\n".join(
                [
                    "#cloud-config",
                    "write_files:",
                    "  - path: /etc/apt/apt.conf.d/20auto-upgrades",
                    "    content: |",
                    '      APT::Periodic::Update-Package-Lists "0";',
                    '      APT::Periodic::Unattended-Upgrade "0";',
                ]
            ),
        }
        if req.market == "spot":
            params["priority"] = "Spot"
            # SkyPilot 0.14.1's _create_vm reads only `priority`; this documents the intent (Azure's default
            # for Spot, Deallocate, is what the VM gets — see the module docstring).
            params["evictionPolicy"] = "Delete"
        return {"tags": dict(tags), "azure_arm_parameters": params}

    def create(self, req: LaunchRequest, *, name: str, tags: dict[str, str], ssh_public_key: str) -> NodeRef:
        offer = req.offer
        if offer is None or getattr(offer, "cloud", CLOUD) != CLOUD:
            raise ProviderError(f"AzureNodes.create needs an Azure offer, got {offer!r}.", reason="bad-offer")
        region = offer.region
        all_tags = {**tags, TAG_MARKET: req.market, TAG_INSTANCE_TYPE: offer.instance_type}
        sky_provision = self._provision()
        from sky.provision import common as sky_common

        config = sky_common.ProvisionConfig(
            provider_config=self._provider_config(name, region, all_tags),
            authentication_config={"ssh_user": SSH_USER},
            docker_config={},
            node_config=self._node_config(req, all_tags, ssh_public_key),
            count=1,
            tags=all_tags,
            resume_stopped_nodes=False,
            ports_to_open_on_launch=None,
        )
        try:
            config = sky_provision.bootstrap_instances(CLOUD, region, name, config)
            record = sky_provision.run_instances(CLOUD, region, name, name, config)
        except Exception as e:
            err = map_azure_error(e, offer=offer, doing=f"create node {name}")
            self._cleanup(name, region)
            raise err from e
        return NodeRef(
            cloud=CLOUD, region=region, zone=None, cluster=name, instance_id=record.head_instance_id
        )

    def _cleanup(self, cluster: str, region: str) -> None:
        """Best effort after a failed create: delete the node's resource group (NIC, IP, failed VM...)."""
        try:
            self._provision().terminate_instances(CLOUD, cluster, self._provider_config(cluster, region))
        except Exception as e:  # the create's own error is the one to report
            log.warning("cleanup of Azure node %s in %s failed: %s", cluster, region, type(e).__name__)

    def list(self, tags: dict[str, str]) -> list[NodeInfo]:
        try:
            compute = self._client("compute")
            vms = list(compute.virtual_machines.list_all(status_only="true"))
        except Exception as e:
            raise map_azure_error(e, doing="list VMs") from e
        out: list[NodeInfo] = []
        for vm in vms:
            vm_tags = dict(vm.tags or {})
            if any(vm_tags.get(k) != v for k, v in tags.items()):
                continue
            if self.regions is not None and vm.location not in self.regions:
                continue
            statuses = [s.code for s in ((vm.instance_view.statuses or []) if vm.instance_view else [])]
            spot = vm.priority == "Spot" or vm_tags.get(TAG_MARKET) == "spot"
            state, detail = _state(vm.provisioning_state, _power(statuses), spot)
            if state == "terminated":
                continue
            ref = NodeRef(CLOUD, vm.location, None, vm_tags.get(TAG_CLUSTER, vm.name), vm.name)
            out.append(
                NodeInfo(
                    ref=ref,
                    state=state,
                    ssh_user=SSH_USER,
                    market="spot" if spot else "on-demand",
                    instance_type=vm.hardware_profile.vm_size if vm.hardware_profile else None,
                    tags=vm_tags,
                    detail=detail,
                )
            )
        return out

    def query(self, ref: NodeRef) -> NodeInfo:
        sky_provision = self._provision()
        cfg = self._provider_config(ref.cluster, ref.region)
        try:
            statuses = sky_provision.query_instances(
                CLOUD, ref.cluster, ref.cluster, cfg, non_terminated_only=True
            )
        except Exception as e:
            raise map_azure_error(e, doing=f"query node {ref.cluster}") from e
        if not statuses:
            return NodeInfo(ref=ref, state="terminated", ssh_user=SSH_USER, detail="not found")
        vm_name, (status, _) = sorted(statuses.items())[0]
        from sky.utils.status_lib import ClusterStatus

        ref = NodeRef(ref.cloud, ref.region, ref.zone, ref.cluster, vm_name)
        if status == ClusterStatus.UP:
            try:
                info = sky_provision.get_cluster_info(CLOUD, ref.region, ref.cluster, cfg)
            except Exception as e:
                raise map_azure_error(e, doing=f"read node {ref.cluster}") from e
            inst = info.instances.get(vm_name, [None])[0]
            tags = dict(inst.tags or {}) if inst is not None else {}
            return NodeInfo(
                ref=ref,
                state="running",
                public_ip=inst.external_ip if inst is not None else None,
                private_ip=inst.internal_ip if inst is not None else None,
                ssh_user=SSH_USER,
                market="spot" if tags.get(TAG_MARKET) == "spot" else "on-demand",
                instance_type=tags.get(TAG_INSTANCE_TYPE),
                tags=tags,
            )
        # Not running: the VM's own record says whether it is Spot (SkyPilot returns only a status here).
        try:
            vm = self._client("compute").virtual_machines.get(
                self.resource_group(ref.cluster, ref.region), vm_name
            )
        except Exception as e:
            if azure_error_code(e)[0] in ("ResourceNotFound", "ResourceGroupNotFound"):
                return NodeInfo(ref=ref, state="terminated", ssh_user=SSH_USER, detail="not found")
            raise map_azure_error(e, doing=f"read node {ref.cluster}") from e
        tags = dict(vm.tags or {})
        spot = vm.priority == "Spot" or tags.get(TAG_MARKET) == "spot"
        if status == ClusterStatus.STOPPED:
            state: NodeState = "preempted" if spot else "stopping"
            detail = "PowerState/deallocated: Spot VM evicted" if spot else "PowerState/deallocated"
        else:
            state, detail = "pending", f"provisioningState {vm.provisioning_state}"
        return NodeInfo(
            ref=ref,
            state=state,
            ssh_user=SSH_USER,
            market="spot" if spot else "on-demand",
            instance_type=vm.hardware_profile.vm_size if vm.hardware_profile else None,
            tags=tags,
            detail=detail,
        )

    def terminate(self, ref: NodeRef) -> None:
        sky_provision = self._provision()
        try:
            # Deletes the node's resource group; SkyPilot skips a group that is already gone.
            sky_provision.terminate_instances(
                CLOUD, ref.cluster, self._provider_config(ref.cluster, ref.region)
            )
        except Exception as e:
            raise map_azure_error(e, doing=f"terminate node {ref.cluster}") from e

    def signals(self) -> builtins.list[Signal]:
        regions = self.regions
        if regions is None:
            regions = tuple(sorted({o.region for o in self.offers()}))
        out: builtins.list[Signal] = []
        for region in regions:
            with self._lock:
                hit = self._signals.get(region)
            if hit is not None and time.time() - hit[0] < SIGNALS_TTL_S:
                out.extend(hit[1])
                continue
            got = self._region_signals(region)
            with self._lock:
                self._signals[region] = (time.time(), got)
            out.extend(got)
        return out

    def _region_signals(self, region: str) -> builtins.list[Signal]:
        try:
            compute = self._client("compute")
            skus = list(compute.resource_skus.list(filter=f"location eq '{region}'"))
            usages = {u.name.value.lower(): u for u in compute.usage.list(region)}
        except Exception as e:
            raise map_azure_error(e, doing=f"read VM sizes and quotas in {region}") from e
        now = time.time()
        gpu_of = self._gpu_names()

        def left(name: str) -> int | None:
            u = usages.get(name.lower())
            return None if u is None else max(0, int(u.limit) - int(u.current_value))

        out: list[Signal] = []
        for sku in skus:
            if sku.resource_type != "virtualMachines":
                continue
            caps = {c.name: c.value for c in sku.capabilities or []}
            gpus = int(float(caps.get("GPUs") or 0))
            if gpus <= 0:
                continue
            vcpus = int(float(caps.get("vCPUs") or 0)) or 1
            whole = False
            zones: list[str] = []
            for r in sku.restrictions or []:
                info = r.restriction_info
                if r.type == "Location" and region in (r.values or []):
                    whole = True
                elif r.type == "Zone" and info is not None and region in (info.locations or [region]):
                    zones.extend(info.zones or [])
            family_left, regional_left, spot_left = (
                left(sku.family or ""),
                left("cores"),
                left("lowPriorityCores"),
            )
            known = [x for x in (family_left, regional_left) if x is not None]
            quota_gpus = (min(known) // vcpus) * gpus if known else None
            parts = []
            if whole:
                parts.append(f"restricted in {region} ({_reasons(sku)})")
            elif zones:
                parts.append(f"restricted in zones {','.join(sorted(zones))}")
            if family_left is not None:
                parts.append(f"{sku.family}: {family_left} vCPUs left")
            if spot_left is not None:
                parts.append(f"spot: {(spot_left // vcpus) * gpus} GPUs left (lowPriorityCores)")
            gpu = gpu_of.get(sku.name)
            out.append(
                Signal(
                    cloud=CLOUD,
                    region=region,
                    instance_type=sku.name,
                    gpu=gpu,
                    available=not whole,
                    quota_left_gpus=quota_gpus,
                    observed_at=now,
                    detail="; ".join(parts),
                )
            )
            for z in sorted(set(zones)) if not whole else ():
                out.append(
                    Signal(
                        cloud=CLOUD,
                        region=region,
                        zone=z,
                        instance_type=sku.name,
                        gpu=gpu,
                        available=False,
                        quota_left_gpus=quota_gpus,
                        observed_at=now,
                        detail=f"restricted in zone {z} ({_reasons(sku)})",
                    )
                )
        return out

    def _gpu_names(self) -> dict[str, str]:
        """Instance type -> GPU name from the catalog (empty when there is no catalog: signals still work)."""
        try:
            return {o.instance_type: o.gpu for o in self.offers()}
        except Exception:
            return {}

    def close(self) -> None:
        with self._lock:
            self._signals.clear()


def _reasons(sku: Any) -> str:
    return (
        ",".join(sorted({str(r.reason_code) for r in sku.restrictions or [] if r.reason_code}))
        or "restricted"
    )


def _power(codes: list[str]) -> str | None:
    for code in codes:
        if code and code.startswith("PowerState/"):
            return code.split("/", 1)[1]
    return None


def _state(provisioning: str | None, power: str | None, spot: bool) -> tuple[NodeState, str]:
    """Our state from a VM's provisioning and power states (as ``list`` reads them in one call)."""
    if provisioning == "Deleting":
        return "terminated", "Deleting"
    if power == "running":
        return "running", ""
    if power in ("deallocated", "deallocating", "stopped", "stopping"):
        if spot and power in ("deallocated", "deallocating"):
            return "preempted", f"PowerState/{power}: Spot VM evicted"
        return "stopping", f"PowerState/{power}"
    if provisioning in ("Creating", "Updating", "Migrating", "Failed", None) or power == "starting":
        return "pending", f"provisioningState {provisioning}"
    return "unknown", f"provisioningState {provisioning}, power {power}"


def _disk_tier(instance_type: str) -> str:
    """Premium SSD where the size supports it (an ``s`` in its feature letters, e.g. NC24*ads*), as SkyPilot
    decides; Standard SSD otherwise."""
    m = re.match(r"Standard_[A-Z]+\d+([a-z]*)", instance_type)
    return "Premium_LRS" if m and "s" in m.group(1) else "StandardSSD_LRS"
