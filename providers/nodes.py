"""The cloud seam under :class:`~cloudmodal.providers.cloud.CloudProvider`: one :class:`NodeDriver` per cloud.

A driver does only what differs between clouds: create, query, list and delete *nodes* (VMs) through
SkyPilot's provisioner (``sky.provision.*``), read the cloud's live signals, and map the cloud's errors into
the :class:`~cloudmodal.providers.base.ProviderError` tree at its edge. Everything the clouds share (one worker
per node, bootstrapping the node over SSH, tunnelling to the control plane, caching state between reconcile
ticks, finding leaked nodes) lives once in ``CloudProvider``.

Rules for drivers:

- ``create`` returns as soon as the cloud has accepted the request (the node may still be booting); the
  control plane polls with ``list``/``query``. It never waits for SSH.
- Every node carries the tags of :func:`node_tags` (cloud labels or, where a cloud has none, the node's name
  from :func:`node_name`) so that ``list`` finds every node one control plane made, even after a crash.
- Errors: capacity -> :class:`~cloudmodal.providers.base.NoCapacityError`, quota ->
  :class:`~cloudmodal.providers.base.QuotaExceededError`, credentials -> ``CredentialsError``; ``reason`` is
  the cloud's own code (``"InsufficientInstanceCapacity"``, ``"ZONE_RESOURCE_POOL_EXHAUSTED"``...). SDK
  retries of capacity errors are turned off: the control plane's failover walk is the retry.
- A driver is safe to call from several threads.
"""

from __future__ import annotations

import abc
import builtins
import hashlib
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from cloudmodal.providers.base import LaunchRequest, Signal

NodeState = Literal["pending", "running", "stopping", "terminated", "preempted", "unknown"]

# Tag keys on every node (lower-case, dash-separated: valid as AWS tags, GCP labels and Azure tags).
TAG_CONTROL_PLANE = "cloudmodal-control-plane"
TAG_APP = "cloudmodal-app"
TAG_FUNCTION = "cloudmodal-function"
TAG_WORKER = "cloudmodal-worker"

NAME_PREFIX = "cm"


def node_tags(control_plane_id: str, req: LaunchRequest) -> dict[str, str]:
    """The tags every node of ``req`` carries: which control plane, app, function and worker it is for."""
    return {
        TAG_CONTROL_PLANE: control_plane_id,
        TAG_APP: req.app_id,
        TAG_FUNCTION: req.function_id,
        TAG_WORKER: req.worker_id,
    }


def node_name(control_plane_id: str, worker_id: str, attempt: int = 0) -> str:
    """A node's (cluster's) name: ``cm-<8 hex of the control plane id>-<worker id>``, lower-case, with
    ``-t<attempt>`` for a launch walk's later tries (tries of one walk may run at once and must not share a
    name: SkyPilot would take a sibling's node for its own).

    Valid as a SkyPilot cluster name, a GCP instance name and a Lambda instance name, and enough on its own
    to find a node's control plane and worker where a cloud keeps no tags (Lambda).
    """
    cp = hashlib.sha256(control_plane_id.encode()).hexdigest()[:8]
    return f"{NAME_PREFIX}-{cp}-{worker_key(worker_id)}" + (f"-t{attempt}" if attempt else "")


_NAME = re.compile(rf"^{NAME_PREFIX}-([0-9a-f]{{8}})-([a-z0-9]+)(?:-.*)?$")


def parse_node_name(name: str, control_plane_id: str) -> str | None:
    """The :func:`worker_key` a node name encodes when the node belongs to ``control_plane_id``, else None
    (names are lower-case: match the key against ``worker_key(row id)``)."""
    m = _NAME.match(name or "")
    if m is None or m.group(1) != hashlib.sha256(control_plane_id.encode()).hexdigest()[:8]:
        return None
    return m.group(2)


def worker_key(worker_id: str) -> str:
    """How a worker id appears in node names (lower-case, no separators)."""
    return re.sub(r"[^a-z0-9]", "", worker_id.lower())


@dataclass(frozen=True)
class NodeRef:
    """Enough to find one node again (stored with the worker row, so plain JSON-able data)."""

    cloud: str
    region: str
    zone: str | None
    cluster: str  # SkyPilot's cluster name (== node_name(...))
    instance_id: str | None = None  # the cloud's id once known

    def to_wire(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> NodeRef:
        return cls(
            cloud=str(d["cloud"]),
            region=str(d["region"]),
            zone=d.get("zone"),
            cluster=str(d["cluster"]),
            instance_id=d.get("instance_id"),
        )


@dataclass(frozen=True)
class NodeInfo:
    """What the cloud says of one node now."""

    ref: NodeRef
    state: NodeState
    public_ip: str | None = None
    private_ip: str | None = None
    ssh_user: str = "ubuntu"
    ssh_port: int = 22
    market: str = "on-demand"
    instance_type: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    detail: str = ""  # e.g. the cloud's state reason ("Server.SpotInstanceTermination")


class NodeDriver(abc.ABC):
    """One cloud's node operations through SkyPilot's provisioner (see the module docstring)."""

    cloud: str = "cloud"

    @abc.abstractmethod
    def offers(self) -> list[Any]:
        """This cloud's priced offers (``cloudmodal.pricing.offers.Offer``), from the catalog."""

    @abc.abstractmethod
    def check(self) -> tuple[bool, str]:
        """Whether this cloud is usable here: ``(True, "who you are")`` or ``(False, "what is missing and the
        exact fix")``. Must not launch anything; may make one read-only call."""

    @abc.abstractmethod
    def create(
        self,
        req: LaunchRequest,
        *,
        name: str,
        tags: dict[str, str],
        ssh_public_key: str,
    ) -> NodeRef:
        """Ask the cloud for one node for ``req`` (``req.offer`` says where and what, ``req.market`` spot or
        on-demand) with the given name and tags, authorizing ``ssh_public_key`` for its SSH user. Returns once
        accepted; raises a ``ProviderError`` subclass with the cloud's code as ``reason`` on refusal."""

    @abc.abstractmethod
    def list(self, tags: dict[str, str]) -> list[NodeInfo]:
        """Every node (not yet terminated) carrying all of ``tags``, across the regions this driver uses."""

    @abc.abstractmethod
    def query(self, ref: NodeRef) -> NodeInfo:
        """One node's state; a node the cloud no longer knows is ``terminated``, never an error."""

    @abc.abstractmethod
    def terminate(self, ref: NodeRef) -> None:
        """Delete the node and what was created for it alone. Idempotent."""

    def signals(self) -> builtins.list[Signal]:
        """Live observations (availability, spot prices, quota) with ``observed_at``; none by default."""
        return []

    def close(self) -> None:  # noqa: B027 - optional hook with a sensible default
        """Release clients and threads. Idempotent."""


def same_node(a: NodeRef, b: NodeRef) -> bool:
    """Whether two refs name one node: by the cloud's instance id where both have one, else by name."""
    if a.instance_id and b.instance_id:
        return a.instance_id == b.instance_id
    return a.cluster == b.cluster
