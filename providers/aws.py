"""AWS nodes: EC2 instances through SkyPilot's provisioner (``sky.provision``) and boto3.

``create`` builds SkyPilot's ``ProvisionConfig`` here (SkyPilot's optimizer, catalog and templates are not
used): the instance type and zone come from the offer, the AMI from the catalog's ``aws/images.csv`` (SkyPilot's
GPU Ubuntu 22.04 image of the region), the SSH key goes in through cloud-init user data for ``ubuntu`` as
SkyPilot does it. Then ``bootstrap_instances`` (security group, subnet of the zone) and ``run_instances``,
and the driver returns as soon as EC2 accepted the request.

Retries: SkyPilot's RunInstances client is built with ``max_attempts=0`` (botocore sends each request once,
whatever ``AWS_MAX_ATTEMPTS`` says), but SkyPilot itself calls RunInstances up to 5 times in one subnet before
giving up. That loop is turned down to one call per subnet (``BOTO_CREATE_MAX_RETRIES = 1``, a module
constant of SkyPilot's pinned version): the control plane's failover walk over offers is the retry.

Reads (``list``, ``query``, ``signals``, ``check``) use boto3 directly: one session per driver, used under a
lock only to build clients (sessions are not thread-safe; clients are, and are shared by all threads), with a
short standard-mode retry for transient errors.

Every SDK error is mapped into the :class:`~cloudmodal.providers.base.ProviderError` tree in one table,
``ERRORS`` in :mod:`cloudmodal.providers.aws_errors`, keyed by EC2's error code; ``reason`` is that code.
"""

from __future__ import annotations

import builtins
import copy
import csv
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

from cloudmodal.providers import _sky
from cloudmodal.providers.aws_errors import CREDENTIALS_FIX, aws_error_code, aws_errors, map_aws_error
from cloudmodal.providers.base import (
    CredentialsError,
    LaunchRequest,
    ProviderError,
    Signal,
)
from cloudmodal.providers.nodes import NodeDriver, NodeInfo, NodeRef, NodeState

log = logging.getLogger(__name__)
T = TypeVar("T")

CLOUD = "aws"
SSH_USER = "ubuntu"
# SkyPilot's GPU images (Ubuntu 22.04, NVIDIA driver and CUDA installed), per CPU architecture of the type.
IMAGE_TAGS = {"x86_64": "skypilot:custom-gpu-ubuntu", "arm64": "skypilot:custom-gpu-ubuntu-arm64"}
IMAGES_FILE = "images.csv"
ROOT_DEVICE = "/dev/sda1"  # the root device of Ubuntu AMIs (SkyPilot's images included)
BOOTSTRAP_TTL_S = 600.0  # how long a region and zone's bootstrap (security group, subnets) is reused
DEFAULT_DISK_GB = 256  # SkyPilot's default disk size
# One security group per VPC shared by every node (SSH in, all traffic within the group). SkyPilot creates it
# on first use and, as it is not "managed by SkyPilot", neither blocks on nor deletes it at terminate.
SECURITY_GROUP = "cloudmodal-nodes"
TAG_MARKET = "cloudmodal-market"  # what the driver asked for, in case EC2 does not say (InstanceLifecycle)
TAG_CLUSTER = "ray-cluster-name"  # SkyPilot's cluster tag (sky.provision.constants.TAG_RAY_CLUSTER_NAME)
SPOT_REASONS = ("Server.SpotInstanceTermination", "Server.SpotInstanceShutdown")
SIGNALS_TTL_S = 300.0
REGIONS_TTL_S = 3600.0
LIVE_STATES = ("pending", "running", "shutting-down", "stopping", "stopped")
_STATES: dict[str, NodeState] = {
    "pending": "pending",
    "running": "running",
    "shutting-down": "stopping",
    "stopping": "stopping",
    "stopped": "stopping",
    "terminated": "terminated",
}
_NOT_FOUND = ("InvalidInstanceID.NotFound", "InvalidInstanceID.Malformed")


def _boto3() -> ModuleType:
    try:
        import boto3
    except ImportError as e:
        raise CredentialsError(
            "boto3 is not installed, and cloudmodal talks to AWS through it: run "
            "`pip install 'cloudmodal[aws]'`.",
            reason="sdk-missing",
        ) from e
    return boto3


# --- SkyPilot, tuned once per process ---------------------------------------------------------------------

_tune_lock = threading.Lock()
_tuned = False


def _provision() -> ModuleType:
    """``sky.provision`` with SkyPilot's same-subnet RunInstances loop cut to one attempt per subnet."""
    global _tuned
    prov = _sky.provision()
    with _tune_lock:
        if not _tuned:
            import sky.provision.aws.instance as sky_aws_instance

            # Pinned SkyPilot: _create_instances tries max(n * (5 // n), n) times over n subnets; 1 makes it
            # exactly one RunInstances per candidate subnet (one per zone here).
            if hasattr(sky_aws_instance, "BOTO_CREATE_MAX_RETRIES"):
                sky_aws_instance.BOTO_CREATE_MAX_RETRIES = 1
            import sky.adaptors.aws as sky_aws

            sky_aws.resource = _sky.SharedResources(sky_aws.resource)
            _tuned = True
    return prov


# --- the driver -------------------------------------------------------------------------------------------


class AwsNodes(NodeDriver):
    """EC2 nodes for cloudmodal workers (see the module docstring)."""

    cloud = CLOUD

    def __init__(
        self,
        regions: list[str] | None = None,
        catalog_dir: str | None = None,
        *,
        disk_gb: int = DEFAULT_DISK_GB,
        instance_profile: str | None = None,
        security_group: str = SECURITY_GROUP,
        vpc_name: str | None = None,
    ) -> None:
        """``regions``: where ``list``/``signals`` look (default: the catalog's AWS regions the account has
        enabled). ``instance_profile``: an IAM instance profile name for the nodes; None gives them no AWS
        identity at all (workers need none, and SkyPilot's default role may do anything in EC2 and S3)."""
        self._regions = list(regions) if regions else None
        self._catalog_dir = catalog_dir
        self._disk_gb = disk_gb
        self._instance_profile = instance_profile
        self._security_group = security_group
        self._vpc_name = vpc_name
        self._lock = threading.Lock()
        self._boto_session: Any = None
        self._clients: dict[tuple[str, str], Any] = {}
        # SkyPilot's bootstrap checks, then creates, the shared security group and its rules: two launches
        # in one region at once could both create them (AWS refuses the second). One bootstrap per region
        # at a time; RunInstances itself runs in parallel.
        self._bootstrap_locks: dict[str, threading.Lock] = {}
        # (region, None) -> (when, node_config and provider_config fields SkyPilot's bootstrap filled in, the
        # zone of each subnet it found)
        self._bootstrap_cache: dict[
            tuple[str, Any], tuple[float, dict[str, Any], dict[str, Any], dict[str, str]]
        ] = {}
        self._signals_lock = threading.Lock()
        self._zone_ids: dict[str, dict[str, str]] = {}  # region -> zone name -> zone id
        self._images: dict[tuple[str, str], str] | None = None  # (tag, region) -> AMI
        self._arch: dict[str, str] | None = None  # instance type -> architecture
        self._enabled: tuple[float, list[str]] | None = None
        self._signals: tuple[float, list[Signal]] | None = None

    # -- catalog ---------------------------------------------------------------------------------------------

    def _catalog_path(self) -> Path:
        if self._catalog_dir is not None:
            return Path(self._catalog_dir).expanduser()
        from cloudmodal.pricing.catalog import catalog_dir

        return catalog_dir()

    def offers(self) -> list[Any]:
        from cloudmodal.pricing.catalog import load_offer_table

        table = load_offer_table(self._catalog_path())
        wanted = set(self._regions) if self._regions else None
        return [o for o in table if o.cloud == CLOUD and (wanted is None or o.region in wanted)]

    def _read_catalog_files(self) -> None:
        """AMIs per (tag, region) from ``aws/images.csv``; architectures per type from ``aws/vms.csv``."""
        d = self._catalog_path() / CLOUD
        images: dict[tuple[str, str], str] = {}
        try:
            with open(d / IMAGES_FILE, newline="", encoding="utf-8") as f:
                for row in csv.DictReader(f):
                    if row.get("Tag") and row.get("Region") and row.get("ImageId"):
                        images[(row["Tag"], row["Region"])] = row["ImageId"]
        except FileNotFoundError:
            pass
        arch: dict[str, str] = {}
        try:
            with open(d / "vms.csv", newline="", encoding="utf-8") as f:
                for row in csv.DictReader(f):
                    if row.get("InstanceType") and row.get("Arch"):
                        arch[row["InstanceType"]] = row["Arch"]
        except FileNotFoundError:
            pass
        self._images, self._arch = images, arch

    def image_id(self, region: str, instance_type: str) -> str:
        """SkyPilot's GPU Ubuntu 22.04 AMI of ``region`` for the type's architecture."""
        with self._lock:
            if self._images is None:
                self._read_catalog_files()
        assert self._images is not None and self._arch is not None
        arch = "arm64" if self._arch.get(instance_type, "x86_64") in ("arm64", "aarch64") else "x86_64"
        tag = IMAGE_TAGS[arch]
        ami = self._images.get((tag, region))
        if ami is None:
            raise ProviderError(
                f"No AWS image for {instance_type} in {region}: {self._catalog_path() / CLOUD / IMAGES_FILE} "
                f"has no {tag!r} row for {region} ({arch}). Fix: run `cloudmodal pricing refresh` to fetch "
                "the catalog with its images, or choose another region.",
                reason="no-image",
            )
        return ami

    # -- boto3 -----------------------------------------------------------------------------------------------

    def _session(self) -> Any:
        """The driver's boto3 session. Sessions are not thread-safe, clients are: clients are made from it
        under the lock and then shared by every thread."""
        with self._lock:
            if self._boto_session is None:
                self._boto_session = _boto3().session.Session()
            return self._boto_session

    def _client(self, service: str, region: str) -> Any:
        """A client per (service, region), built once (building an EC2 client loads a large model)."""
        session = self._session()
        with self._lock:
            client = self._clients.get((service, region))
            if client is None:
                from botocore.config import Config

                client = session.client(
                    service,
                    region_name=region,
                    config=Config(
                        retries={"mode": "standard", "total_max_attempts": 3},
                        connect_timeout=10,
                        read_timeout=60,
                    ),
                )
                self._clients[(service, region)] = client
            return client

    def _require_credentials(self) -> None:
        """Fail at once when there are none (SkyPilot would retry with back-off for half a minute)."""
        try:
            session = self._session()
            with self._lock:
                creds = session.get_credentials()
        except CredentialsError:
            raise
        except Exception as e:
            raise map_aws_error(e, doing="reading AWS credentials") from e
        if creds is None:
            raise CredentialsError(f"No AWS credentials found. {CREDENTIALS_FIX}", reason="NoCredentials")

    def close(self) -> None:
        with self._lock:
            clients, self._clients = list(self._clients.values()), {}
            self._boto_session = None
        for c in clients:
            try:
                c.close()
            except Exception:  # already closed, or an old botocore without close()
                pass

    # -- check -----------------------------------------------------------------------------------------------

    def check(self) -> tuple[bool, str]:
        try:
            self._require_credentials()
            region = (self._regions or [""])[0] or self._session().region_name or "us-east-1"
            with aws_errors(doing="asking STS who we are"):
                who = self._client("sts", region).get_caller_identity()
        except ProviderError as e:
            return False, e.message
        return True, f"account {who.get('Account')} as {who.get('Arn')}"

    # -- zones and regions -------------------------------------------------------------------------------

    def _zones(self, region: str) -> dict[str, str]:
        """Zone name -> zone id in ``region`` (account-specific mapping, fixed: cached for good)."""
        got = self._zone_ids.get(region)
        if got is None:
            resp = self._client("ec2", region).describe_availability_zones(AllAvailabilityZones=True)
            got = {z["ZoneName"]: z["ZoneId"] for z in resp.get("AvailabilityZones", []) if z.get("ZoneId")}
            self._zone_ids[region] = got
        return got

    def zone_name(self, region: str, zone: str) -> str:
        """The account's name for a catalog zone (the catalog lists zone ids such as ``use1-az1``)."""
        if zone.startswith(region):
            return zone  # already a name
        for name, zid in self._zones(region).items():
            if zid == zone:
                return name
        raise ProviderError(
            f"Zone {zone} of the catalog is not one of this AWS account's zones in {region}. Fix: opt in to it "
            "(local zones) in the EC2 console, or use another offer.",
            reason="UnknownZone",
        )

    def zone_id(self, region: str, zone_name: str | None) -> str | None:
        if not zone_name:
            return None
        return self._zones(region).get(zone_name, zone_name)

    def regions(self) -> list[str]:
        """The regions ``list`` and ``signals`` cover: the given ones, else the catalog's AWS regions that
        this account has enabled (opt-in regions answer AuthFailure until enabled)."""
        if self._regions:
            return list(self._regions)
        now = time.monotonic()
        cached = self._enabled
        if cached is not None and now - cached[0] < REGIONS_TTL_S:
            return cached[1]
        try:
            catalog = sorted({o.region for o in self.offers()})
        except Exception as e:  # no catalog: say which regions to name instead
            raise ProviderError(
                f"{e} (or give the AWS driver its regions explicitly).", reason="no-catalog"
            ) from e
        self._require_credentials()
        with aws_errors(doing="listing enabled regions"):
            resp = self._client("ec2", catalog[0] if catalog else "us-east-1").describe_regions()
        enabled = {r["RegionName"] for r in resp.get("Regions", [])}
        got = [r for r in catalog if r in enabled]
        self._enabled = (now, got)
        return got

    def _each_region(self, fn: Callable[[str], list[T]], doing: str) -> list[T]:
        """``fn(region)`` for every region, a few at a time; the first error, mapped, wins."""
        regions = self.regions()
        self._require_credentials()
        out: list[T] = []
        with aws_errors(doing=doing):
            if len(regions) <= 1:
                for r in regions:
                    out.extend(fn(r))
            else:
                with ThreadPoolExecutor(max_workers=min(8, len(regions))) as pool:
                    for part in pool.map(fn, regions):
                        out.extend(part)
        return out

    # -- create ----------------------------------------------------------------------------------------------

    def provision_config(
        self, req: LaunchRequest, *, name: str, tags: dict[str, str], ssh_public_key: str
    ) -> Any:
        """SkyPilot's ``ProvisionConfig`` for one node of ``req`` (no I/O but the zone-id lookup)."""
        offer = req.offer
        if offer is None:
            raise ProviderError(
                "An AWS launch needs an offer (instance type, region, zone).", reason="no-offer"
            )
        key = ssh_public_key.strip()
        if not key or "\n" in key or " " not in key:
            raise ProviderError(
                "The SSH public key for the node must be one line in OpenSSH format ('ssh-ed25519 AAAA...').",
                reason="bad-ssh-key",
            )
        region = offer.region
        zone = self.zone_name(region, offer.zone) if offer.zone else None
        all_tags = {**tags, TAG_MARKET: req.market}
        node_config: dict[str, Any] = {
            "InstanceType": offer.instance_type,
            "ImageId": self.image_id(region, offer.instance_type),
            "BlockDeviceMappings": [
                {
                    "DeviceName": ROOT_DEVICE,
                    "Ebs": {
                        "VolumeSize": self._disk_gb,
                        "VolumeType": "gp3",
                        "DeleteOnTermination": True,
                        "Encrypted": False,
                    },
                }
            ],
            # An empty profile keeps SkyPilot from attaching (and creating) its own skypilot-v1 role.
            "IamInstanceProfile": {"Name": self._instance_profile} if self._instance_profile else {},
            "UserData": cloud_init(SSH_USER, key),
            "MetadataOptions": {"HttpTokens": "required"},  # IMDSv2 only, as SkyPilot
            "TagSpecifications": [
                {
                    "ResourceType": "instance",
                    "Tags": [{"Key": k, "Value": v} for k, v in {**all_tags, "Name": name}.items()],
                }
            ],
        }
        if req.market == "spot":
            node_config["InstanceMarketOptions"] = {
                "MarketType": "spot",
                "SpotOptions": {"SpotInstanceType": "one-time", "InstanceInterruptionBehavior": "terminate"},
            }
        from sky.provision import common

        return common.ProvisionConfig(
            provider_config=self._provider_config(region, zone),
            authentication_config={},
            docker_config={},
            node_config=node_config,
            count=1,
            tags=all_tags,
            resume_stopped_nodes=False,
            ports_to_open_on_launch=None,
        )

    def _provider_config(self, region: str, zone: str | None = None) -> dict[str, Any]:
        config: dict[str, Any] = {
            "region": region,
            "availability_zone": zone,
            "security_group": {"GroupName": self._security_group, "ManagedBySkyPilot": False},
            "use_internal_ips": False,
            "max_efa_interfaces": 0,
            "enforce_tags": [],
        }
        if self._vpc_name:
            config["vpc_name"] = self._vpc_name
        return config

    def create(self, req: LaunchRequest, *, name: str, tags: dict[str, str], ssh_public_key: str) -> NodeRef:
        prov = _provision()
        self._require_credentials()
        offer = req.offer
        with aws_errors(offer=offer, doing=f"creating node {name}"):
            config = self.provision_config(req, name=name, tags=tags, ssh_public_key=ssh_public_key)
            region = offer.region
            with self._lock:
                region_lock = self._bootstrap_locks.setdefault(region, threading.Lock())
            key = (region, config.provider_config.get("availability_zone"))
            for fresh in (False, True):
                with region_lock:
                    ready, cached = self._bootstrapped_config(prov, region, name, key, config, fresh=fresh)
                try:
                    record = prov.run_instances(CLOUD, region, name, name, ready)
                    break
                except Exception as e:
                    # A subnet or security group deleted since the bootstrap: bootstrap again, once. (Other
                    # errors, capacity above all, say nothing about the network: the bootstrap stays.)
                    if not (aws_error_code(e)[0] or "").endswith(".NotFound"):
                        raise
                    with self._lock:
                        self._bootstrap_cache.pop((region, None), None)
                    if not cached:
                        raise
        instance_id = record.head_instance_id or (record.created_instance_ids or [None])[0]
        if instance_id:
            self._restore_name(region, instance_id, name)
        zone = offer.zone or self.zone_id(region, record.zone)
        return NodeRef(cloud=CLOUD, region=region, zone=zone, cluster=name, instance_id=instance_id)

    def _bootstrapped_config(
        self, prov: Any, region: str, name: str, key: tuple[str, Any], config: Any, *, fresh: bool = False
    ) -> tuple[Any, bool]:
        """``config`` completed by SkyPilot's bootstrap (the security group, the instance profile, the subnets
        of its zone). The bootstrap runs once per region (for all its zones) every :data:`BOOTSTRAP_TTL_S` and
        is reused between: it answers the same for every launch there and costs ten requests, which, under the
        region's lock, made concurrent launches wait for each other and every try of a failover walk repeat it
        (bench/launch.py). Called under the region's lock. Returns the config and whether it came from the
        cache; ``fresh``: bootstrap whatever the cache holds."""
        zone = config.provider_config.get("availability_zone")
        with self._lock:
            cached = None if fresh else self._bootstrap_cache.get((region, None))
        reused = cached is not None and time.monotonic() - cached[0] < BOOTSTRAP_TTL_S
        if not reused:
            # SkyPilot's API server clears its request-scoped caches before each request. Of those, only the
            # VPC's route tables (which decide whether a subnet is public) can go stale between bootstraps;
            # clearing them all would also drop SkyPilot's per-thread boto3 sessions, and rebuilding them
            # (reloading EC2's service model) made a launch 3-4x slower (bench/launch.py).
            from sky.provision.aws import config as sky_aws_config

            sky_aws_config._get_route_tables.cache_clear()
            whole = copy.deepcopy(config)
            whole.provider_config["availability_zone"] = None  # every zone's public subnets
            done = prov.bootstrap_instances(CLOUD, region, name, whole)
            node_fields = {k: v for k, v in done.node_config.items() if whole.node_config.get(k) != v}
            provider_fields = {
                k: v for k, v in done.provider_config.items() if whole.provider_config.get(k) != v
            }
            subnets = list(node_fields.get("SubnetIds") or [])
            zones: dict[str, str] = {}
            if subnets:
                resp = self._client("ec2", region).describe_subnets(SubnetIds=subnets)
                zones = {sn["SubnetId"]: sn["AvailabilityZone"] for sn in resp.get("Subnets", [])}
            cached = (time.monotonic(), node_fields, provider_fields, zones)
            with self._lock:
                self._bootstrap_cache[(region, None)] = cached
        assert cached is not None
        _, node_fields, provider_fields, zones = cached
        ready = copy.deepcopy(config)
        ready.node_config.update(copy.deepcopy(node_fields))
        ready.provider_config.update({k: v for k, v in provider_fields.items() if k != "availability_zone"})
        if zone is not None:
            in_zone = [sn for sn in ready.node_config.get("SubnetIds") or [] if zones.get(sn) == zone]
            if not in_zone:
                raise ProviderError(
                    f"AWS: no public subnet of the VPC in {zone} ({region}), so no node can start there. Fix: "
                    "add a subnet in that zone with a route to an internet gateway, or let cloudmodal use the "
                    "region's other zones.",
                    reason="NoSubnetInZone",
                )
            ready.node_config["SubnetIds"] = in_zone
        return ready, reused

    def forget_network(self) -> None:
        """Bootstrap again on the next launch in each region and zone (the account's VPCs, subnets or security
        groups changed; a launch that finds one gone does this by itself)."""
        with self._lock:
            self._bootstrap_cache.clear()

    def _restore_name(self, region: str, instance_id: str, name: str) -> None:
        """SkyPilot renames its head node ``sky-<cluster>-head``; the console should show our name."""
        try:
            self._client("ec2", region).create_tags(
                Resources=[instance_id], Tags=[{"Key": "Name", "Value": name}]
            )
        except Exception as e:  # cosmetic: the node is found by its other tags
            log.warning("could not set the Name tag of %s: %s", instance_id, map_aws_error(e).message)

    # -- list / query ----------------------------------------------------------------------------------------

    def _info(self, region: str, inst: dict[str, Any], ref: NodeRef | None = None) -> NodeInfo:
        tags = {t["Key"]: t["Value"] for t in inst.get("Tags") or [] if "Key" in t}
        ec2_state = (inst.get("State") or {}).get("Name", "")
        reason = (inst.get("StateReason") or {}).get("Code") or ""
        state: NodeState = _STATES.get(ec2_state, "unknown")
        if reason in SPOT_REASONS and state in ("stopping", "terminated"):
            state = "preempted"
        if inst.get("InstanceLifecycle") == "spot":
            market = "spot"
        else:
            market = "spot" if tags.get(TAG_MARKET) == "spot" else "on-demand"
        zone = self.zone_id(region, (inst.get("Placement") or {}).get("AvailabilityZone"))
        if ref is None or ref.instance_id != inst.get("InstanceId"):
            ref = NodeRef(
                cloud=CLOUD,
                region=region,
                zone=ref.zone if ref is not None and ref.zone else zone,
                cluster=tags.get(TAG_CLUSTER) or (ref.cluster if ref else tags.get("Name", "")),
                instance_id=inst.get("InstanceId"),
            )
        return NodeInfo(
            ref=ref,
            state=state,
            public_ip=inst.get("PublicIpAddress"),
            private_ip=inst.get("PrivateIpAddress"),
            ssh_user=SSH_USER,
            market=market,
            instance_type=inst.get("InstanceType"),
            tags=tags,
            detail=reason,
        )

    def _describe(self, region: str, **kwargs: Any) -> list[dict[str, Any]]:
        pages = self._client("ec2", region).get_paginator("describe_instances").paginate(**kwargs)
        return [i for page in pages for res in page.get("Reservations", []) for i in res.get("Instances", [])]

    def list(self, tags: dict[str, str]) -> list[NodeInfo]:
        filters = [{"Name": f"tag:{k}", "Values": [v]} for k, v in tags.items()]
        filters.append({"Name": "instance-state-name", "Values": list(LIVE_STATES)})

        def one(region: str) -> builtins.list[NodeInfo]:
            return [self._info(region, i) for i in self._describe(region, Filters=filters)]

        return self._each_region(one, "listing nodes")

    def query(self, ref: NodeRef) -> NodeInfo:
        self._require_credentials()
        with aws_errors(doing=f"looking up node {ref.cluster}"):
            found: builtins.list[dict[str, Any]] = []
            if ref.instance_id:
                try:
                    found = self._describe(ref.region, InstanceIds=[ref.instance_id])
                except Exception as e:
                    if aws_error_code(e)[0] not in _NOT_FOUND:
                        raise
            else:
                found = self._describe(
                    ref.region, Filters=[{"Name": f"tag:{TAG_CLUSTER}", "Values": [ref.cluster]}]
                )
        if not found:
            return NodeInfo(ref=ref, state="terminated", detail="not found")
        # A cluster name may have a terminated predecessor: the live one (else the newest) speaks for it.
        found.sort(
            key=lambda i: ((i.get("State") or {}).get("Name") != "terminated", str(i.get("LaunchTime")))
        )
        return self._info(ref.region, found[-1], ref)

    # -- terminate -------------------------------------------------------------------------------------------

    def terminate(self, ref: NodeRef) -> None:
        prov = _provision()
        self._require_credentials()
        with aws_errors(doing=f"terminating node {ref.cluster}"):
            # By the cluster tag SkyPilot wrote with RunInstances; nothing left to find is fine (idempotent).
            prov.terminate_instances(CLOUD, ref.cluster, self._provider_config(ref.region))

    # -- signals ---------------------------------------------------------------------------------------------

    def signals(self) -> builtins.list[Signal]:
        with self._signals_lock:  # one refresh at a time; the others wait for its result
            cached = self._signals
            if cached is not None and time.monotonic() - cached[0] < SIGNALS_TTL_S:
                return cached[1]
            by_region: dict[str, builtins.list[Any]] = {}
            for o in self.offers():
                by_region.setdefault(o.region, []).append(o)
            got = self._each_region(
                lambda r: self._region_signals(r, by_region.get(r, [])), "reading signals"
            )
            self._signals = (time.monotonic(), got)
            return got

    def _region_signals(self, region: str, offers: builtins.list[Any]) -> builtins.list[Signal]:
        """Per (zone, type) of this region's offers: offered in the zone or not, and the spot price now."""
        types = sorted({o.instance_type for o in offers})
        if not types:
            return []
        ec2 = self._client("ec2", region)
        now = time.time()
        zones = self._zones(region)
        offered: set[tuple[str, str]] = set()
        spot: dict[tuple[str, str], float] = {}
        for i in range(0, len(types), 100):  # EC2 takes up to 200 filter values
            chunk = types[i : i + 100]
            for page in ec2.get_paginator("describe_instance_type_offerings").paginate(
                LocationType="availability-zone", Filters=[{"Name": "instance-type", "Values": chunk}]
            ):
                for row in page.get("InstanceTypeOfferings", []):
                    offered.add((zones.get(row["Location"], row["Location"]), row["InstanceType"]))
            for page in ec2.get_paginator("describe_spot_price_history").paginate(
                InstanceTypes=chunk, ProductDescriptions=["Linux/UNIX"], StartTime=now
            ):
                for row in page.get("SpotPriceHistory", []):
                    k = (zones.get(row["AvailabilityZone"], row["AvailabilityZone"]), row["InstanceType"])
                    spot.setdefault(k, float(row["SpotPrice"]))  # newest first
        gpu = {o.instance_type: o.gpu for o in offers}
        keys = {(o.zone, o.instance_type) for o in offers if o.zone} | offered | set(spot)
        names = {zid: name for name, zid in zones.items()}
        return [
            Signal(
                cloud=CLOUD,
                region=region,
                zone=zone,
                instance_type=itype,
                gpu=gpu.get(itype),
                available=(zone, itype) in offered,
                price_spot=spot.get((zone, itype)),
                observed_at=now,
                detail=f"zone {names.get(zone, zone)}",
            )
            for zone, itype in sorted(keys)
            if itype in gpu
        ]


def cloud_init(user: str, public_key: str) -> str:
    """Cloud-init user data authorizing ``public_key`` for ``user`` (sudo, bash) and turning off the apt
    timers that would hold apt's lock while the node is being set up, as SkyPilot's AWS template does."""
    return f"""#cloud-config
users:
  - name: {user}
    shell: /bin/bash
    sudo: ALL=(ALL) NOPASSWD:ALL
    ssh_authorized_keys:
      - |-
        {public_key}
write_files:
  - path: /etc/apt/apt.conf.d/20auto-upgrades
    content: |
      APT::Periodic::Update-Package-Lists "0";
      APT::Periodic::Download-Upgradeable-Packages "0";
      APT::Periodic::AutocleanInterval "0";
      APT::Periodic::Unattended-Upgrade "0";
  - path: /etc/apt/apt.conf.d/10cloudinit-disable
    content: |
      APT::Periodic::Enable "0";
bootcmd:
  - systemctl stop apt-daily.timer apt-daily-upgrade.timer unattended-upgrades.service
  - systemctl disable apt-daily.timer apt-daily-upgrade.timer unattended-upgrades.service
  - systemctl mask apt-daily.service apt-daily-upgrade.service unattended-upgrades.service
  - systemctl daemon-reload
"""
