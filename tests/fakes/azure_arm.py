"""A stateful fake of the Azure Resource Manager (ARM) endpoints SkyPilot's Azure provisioner calls.

No emulator exists for Azure compute, so this is a small HTTPS server on 127.0.0.1 that the real azure-mgmt
SDK clients talk to (``base_url`` = :attr:`FakeArm.url`, ``connection_verify`` = :attr:`FakeArm.ca_bundle`,
a self-signed certificate made at start). It keeps resource groups, the bootstrap template deployment,
public IPs, NICs and VMs, and answers ARM's real shapes:

- long-running operations: ``PUT`` → ``201`` + ``Azure-AsyncOperation: <absolute URL>`` → ``GET`` that URL →
  ``{"status": "InProgress"}`` (``async_polls`` times) → ``{"status": "Succeeded"}`` (or ``"Failed"`` with an
  ``error``), then the SDK's final ``GET`` of the resource; ``DELETE`` of a resource group → ``202`` +
  ``Location``;
- errors as ``{"error": {"code", "message"}}`` with ARM's statuses (404 ``ResourceGroupNotFound``, 409
  ``SkuNotAvailable`` / ``OperationNotAllowed``, 401 ``InvalidAuthenticationToken``);
- the read-only lists behind live signals: ``Microsoft.Compute/skus`` (with ``restrictions``) and
  ``locations/{l}/usages`` (per-family vCPU quota, usage counted from the VMs that exist).

Behaviour that follows from the model, not from injection: a VM size restricted in a location is refused
with 409 ``SkuNotAvailable``; a VM that would exceed its family's (or the regional, or for Spot the
low-priority) vCPU quota is refused with 409 ``OperationNotAllowed`` and ARM's quota wording.

Fault injection (:meth:`FakeArm.fail_async`, :meth:`FakeArm.reject`) and spot eviction (:meth:`FakeArm.evict`)
are test-side calls on the same object; :attr:`FakeArm.requests` logs every request (Authorization header
dropped). The server runs in a thread of the test process; all state sits behind one lock.

What is *not* modelled: ARM template evaluation (the deployment's outputs are computed from its parameters the
way SkyPilot's template defines them), role assignments, disks, NSG rules, VM start/stop/deallocate calls.
Azure documents no instance-view status code that marks a Spot eviction: an evicted VM (eviction policy
Deallocate, Azure's default, which SkyPilot leaves) shows ``PowerState/deallocated`` with ``priority: Spot``;
the fake keeps its own eviction marker in :meth:`FakeArm.evicted` for tests to assert on.
"""

from __future__ import annotations

import datetime
import ipaddress
import itertools
import json
import re
import shutil
import ssl
import tempfile
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

SUBSCRIPTION = "00000000-0000-4000-8000-00000000c10d"
TENANT = "00000000-0000-4000-8000-0000000000aa"


@dataclass
class Sku:
    """One VM size as ``Microsoft.Compute/skus`` lists it."""

    name: str
    family: str  # the quota family, as usages name it (``standardNCADSA100v4Family``)
    vcpus: int
    gpus: int
    memory_gb: float
    locations: tuple[str, ...] = ("eastus", "westus2")
    zones: tuple[str, ...] = ("1", "2", "3")
    # location -> zones restricted there (empty tuple: the whole location)
    restricted: dict[str, tuple[str, ...]] = field(default_factory=dict)


def default_skus() -> list[Sku]:
    """A few real GPU sizes (names, families and vCPU counts as Azure lists them) and one CPU size."""
    return [
        Sku("Standard_NC4as_T4_v3", "standardNCASv3_T4Family", 4, 1, 28),
        Sku("Standard_NC24ads_A100_v4", "standardNCADSA100v4Family", 24, 1, 220),
        Sku("Standard_NC48ads_A100_v4", "standardNCADSA100v4Family", 48, 2, 440),
        Sku("Standard_NC40ads_H100_v5", "standardNCadsH100v5Family", 40, 1, 320),
        Sku("Standard_D2s_v5", "standardDSv5Family", 2, 0, 8),
    ]


@dataclass
class LoggedRequest:
    """One request as it reached the fake (never the Authorization header)."""

    method: str
    path: str
    query: dict[str, str]
    body: Any
    status: int = 0


@dataclass
class _Fault:
    method: str
    pattern: re.Pattern[str]
    times: int  # <0: every time
    status: int = 0  # synchronous fault: this status and body
    code: str = ""
    message: str = ""
    asynchronous: bool = False  # the async operation fails instead


@dataclass
class _Operation:
    polls_left: int
    error: dict[str, str] | None
    on_done: Callable[[bool], None] | None
    done: bool = False


def _error(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat()


class FakeArm:
    """The fake ARM endpoint; ``with FakeArm() as arm:`` starts it on a free port and stops it after."""

    def __init__(self, subscription_id: str = SUBSCRIPTION, *, async_polls: int = 1) -> None:
        self.subscription_id = subscription_id
        self.async_polls = async_polls
        self._lock = threading.RLock()
        self._dir = Path(tempfile.mkdtemp(prefix="fake-arm-"))
        self.ca_bundle = str(self._dir / "cert.pem")
        self._key = str(self._dir / "key.pem")
        _write_self_signed(Path(self.ca_bundle), Path(self._key))
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.url = ""
        self.reset()

    # --- lifecycle ------------------------------------------------------------------------------------

    def start(self) -> FakeArm:
        handler = _make_handler(self)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.ca_bundle, self._key)
        self._server.socket = ctx.wrap_socket(self._server.socket, server_side=True)
        self.url = f"https://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-arm", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> FakeArm:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def reset(self) -> None:
        """Forget every resource, fault, eviction, quota change and logged request."""
        with self._lock:
            self.resource_groups: dict[str, dict[str, Any]] = {}
            # (resource group lower, kind, name lower) -> resource JSON
            self.resources: dict[tuple[str, str, str], dict[str, Any]] = {}
            self.power: dict[str, str] = {}  # vm id lower -> PowerState code suffix
            self._evicted: set[str] = set()
            self.operations: dict[str, _Operation] = {}
            self.faults: list[_Fault] = []
            self.requests: list[LoggedRequest] = []
            self.skus: dict[str, Sku] = {s.name.lower(): s for s in default_skus()}
            # (location, family lower) -> vCPU limit; "cores" = total regional vCPUs,
            # "lowprioritycores" = total regional Spot vCPUs
            self.quota: dict[tuple[str, str], int] = {}
            self.default_family_quota = 100
            self.default_regional_quota = 350
            self._ips = itertools.count(10)

    # --- test-side controls -----------------------------------------------------------------------------

    def fail_async(
        self,
        code: str = "AllocationFailed",
        message: str | None = None,
        *,
        path: str = r"/virtualMachines/[^/]+$",
        times: int = 1,
    ) -> None:
        """The next ``times`` PUTs whose path matches ``path`` are accepted (201) but their operation ends
        ``{"status": "Failed", "error": {"code": code}}`` — how Azure reports allocation failures."""
        msg = message or (
            f"Allocation failed. We do not have sufficient capacity for the requested VM size in this "
            f"region. ({code})"
        )
        with self._lock:
            self.faults.append(_Fault("PUT", re.compile(path, re.I), times, 0, code, msg, asynchronous=True))

    def reject(
        self,
        status: int,
        code: str,
        message: str = "",
        *,
        method: str = "PUT",
        path: str = r"/virtualMachines/[^/]+$",
        times: int = 1,
    ) -> None:
        """The next ``times`` requests with ``method`` (``"*"``: any) whose path matches ``path`` are answered
        ``status`` with ARM's error body (``times < 0``: every one)."""
        with self._lock:
            self.faults.append(
                _Fault(method.upper(), re.compile(path, re.I), times, status, code, message or code)
            )

    def restrict_sku(
        self,
        name: str,
        location: str,
        zones: tuple[str, ...] = (),
        reason: str = "NotAvailableForSubscription",
    ) -> None:
        """Restrict a VM size in a location (``zones=()``) or in some of its zones."""
        del reason  # every restriction is reported as NotAvailableForSubscription (ARM's usual code)
        with self._lock:
            self.skus[name.lower()].restricted[location] = tuple(zones)

    def set_quota(self, location: str, family: str, limit: int) -> None:
        """Set a vCPU limit: a family (``standardNCADSA100v4Family``), ``cores`` or ``lowPriorityCores``."""
        with self._lock:
            self.quota[(location, family.lower())] = limit

    def evict(self, vm_name: str) -> None:
        """Evict a Spot VM the way Azure does with its default eviction policy: deallocated, kept."""
        with self._lock:
            for (_, kind, name), vm in self.resources.items():
                if kind == "virtualmachines" and name == vm_name.lower():
                    self.power[vm["id"].lower()] = "deallocated"
                    self._evicted.add(vm["id"].lower())
                    return
        raise KeyError(vm_name)

    def evicted(self, vm_name: str) -> bool:
        with self._lock:
            return any(i.rsplit("/", 1)[-1] == vm_name.lower() for i in self._evicted)

    def vms(self) -> list[dict[str, Any]]:
        """Every VM's stored JSON (what the SDK sent, as ARM keeps it)."""
        with self._lock:
            return [
                json.loads(json.dumps(r)) for (_, k, _), r in self.resources.items() if k == "virtualmachines"
            ]

    def find(self, method: str | None = None, path: str = "") -> list[LoggedRequest]:
        """Logged requests with this method whose path matches the regular expression ``path``."""
        with self._lock:
            return [
                r
                for r in self.requests
                if (method is None or r.method == method) and re.search(path, r.path, re.I)
            ]

    # --- request handling ---------------------------------------------------------------------------------

    def handle(self, method: str, raw_path: str, body: Any) -> tuple[int, dict[str, str], Any]:
        parts = urlsplit(raw_path)
        path = parts.path.rstrip("/")
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        with self._lock:
            entry = LoggedRequest(method, path, query, body)
            self.requests.append(entry)
            status, headers, payload = self._dispatch(method, path, query, body)
            entry.status = status
            return status, headers, payload

    def _take_fault(self, method: str, path: str) -> _Fault | None:
        for f in self.faults:
            if f.times != 0 and f.method in (method, "*") and f.pattern.search(path):
                if f.times > 0:
                    f.times -= 1
                return f
        return None

    def _dispatch(
        self, method: str, path: str, query: dict[str, str], body: Any
    ) -> tuple[int, dict[str, str], Any]:
        fault = self._take_fault(method, path)
        if fault is not None and not fault.asynchronous:
            return fault.status, {}, _error(fault.code, fault.message)
        sub = f"/subscriptions/{self.subscription_id}"
        low = path.lower()
        if not low.startswith(sub.lower()):
            return 404, {}, _error("SubscriptionNotFound", f"The subscription '{path}' could not be found.")
        rest = path[len(sub) :]
        m = re.fullmatch(r"/operations/([0-9a-f-]+)", rest, re.I)
        if m:
            return self._poll(m.group(1), method)
        if re.fullmatch(r"/resourcegroups", rest, re.I) and method == "GET":
            return 200, {}, {"value": list(self.resource_groups.values())}
        m = re.fullmatch(r"/providers/Microsoft\.Compute/skus", rest, re.I)
        if m and method == "GET":
            return 200, {}, {"value": self._skus(query.get("$filter", ""))}
        m = re.fullmatch(r"/providers/Microsoft\.Compute/locations/([^/]+)/usages", rest, re.I)
        if m and method == "GET":
            return 200, {}, {"value": self._usages(m.group(1))}
        m = re.fullmatch(r"/providers/Microsoft\.Compute/virtualMachines", rest, re.I)
        if m and method == "GET":
            vms = [
                self._vm_out(r, query) for (_, k, _), r in self.resources.items() if k == "virtualmachines"
            ]
            return 200, {}, {"value": vms}
        m = re.fullmatch(r"/resourcegroups/([^/]+)(/.*)?", rest, re.I)
        if m:
            return self._in_group(method, m.group(1), m.group(2) or "", query, body, fault)
        return 404, {}, _error("NotFound", f"No fake route for {method} {path}")

    def _in_group(
        self, method: str, rg: str, rest: str, query: dict[str, str], body: Any, fault: _Fault | None
    ) -> tuple[int, dict[str, str], Any]:
        key = rg.lower()
        group = self.resource_groups.get(key)
        if not rest:
            if method == "PUT":
                created = group is None
                group = {
                    "id": f"/subscriptions/{self.subscription_id}/resourceGroups/{rg}",
                    "name": rg,
                    "type": "Microsoft.Resources/resourceGroups",
                    "location": body.get("location"),
                    "tags": body.get("tags") or {},
                    "properties": {"provisioningState": "Succeeded"},
                }
                self.resource_groups[key] = group
                return (201 if created else 200), {}, group
            if group is None:
                return 404, {}, _error("ResourceGroupNotFound", f"Resource group '{rg}' could not be found.")
            if method == "GET":
                return 200, {}, group
            if method == "DELETE":
                # Everything in the group goes at once; the operation answers done on its first poll.
                del self.resource_groups[key]
                for k in [k for k in self.resources if k[0] == key]:
                    vm = self.resources.pop(k)
                    self.power.pop(vm["id"].lower(), None)
                op = self._new_op(None, None, polls=0)
                return 202, {"Location": op, "Retry-After": "0"}, None
            return 405, {}, _error("MethodNotAllowed", method)
        if group is None:
            return 404, {}, _error("ResourceGroupNotFound", f"Resource group '{rg}' could not be found.")
        m = re.fullmatch(r"/providers/Microsoft\.Compute/virtualMachines", rest, re.I)
        if m and method == "GET":
            vms = [
                self._vm_out(r, query)
                for (g, k, _), r in self.resources.items()
                if g == key and k == "virtualmachines"
            ]
            return 200, {}, {"value": vms}
        m = re.fullmatch(r"/providers/Microsoft\.Compute/virtualMachines/([^/]+)/instanceView", rest, re.I)
        if m and method == "GET":
            found = self.resources.get((key, "virtualmachines", m.group(1).lower()))
            if found is None:
                return 404, {}, _error("ResourceNotFound", f"The Resource '{m.group(1)}' was not found.")
            return 200, {}, self._instance_view(found)
        m = re.fullmatch(r"/providers/([^/]+)/([^/]+)/([^/]+)", rest, re.I)
        if not m:
            return 404, {}, _error("NotFound", f"No fake route for {method} {rest}")
        namespace, kind, name = m.group(1), m.group(2).lower(), m.group(3)
        rkey = (key, kind, name.lower())
        if method == "GET":
            res = self.resources.get(rkey)
            if res is None:
                code = "DeploymentNotFound" if kind == "deployments" else "ResourceNotFound"
                return 404, {}, _error(code, f"The Resource '{namespace}/{kind}/{name}' was not found.")
            return 200, {}, self._vm_out(res, query) if kind == "virtualmachines" else res
        if method == "PATCH" and kind == "virtualmachines":
            res = self.resources.get(rkey)
            if res is None:
                return 404, {}, _error("ResourceNotFound", f"The Resource '{name}' was not found.")
            if "tags" in (body or {}):
                res["tags"] = dict(body["tags"])
            return 200, {}, self._vm_out(res, query)
        if method == "DELETE":
            res = self.resources.pop(rkey, None)
            if res is None:
                return 204, {}, None
            self.power.pop(res["id"].lower(), None)
            op = self._new_op(None, None, polls=0)
            return 202, {"Location": op}, None
        if method != "PUT":
            return 405, {}, _error("MethodNotAllowed", method)
        rid = f"/subscriptions/{self.subscription_id}/resourceGroups/{rg}/providers/{namespace}/{m.group(2)}/{name}"
        if kind == "deployments":
            return self._put_deployment(rkey, rid, name, group, body, fault)
        if kind == "publicipaddresses":
            return self._put_simple(
                rkey,
                rid,
                name,
                "Microsoft.Network/publicIPAddresses",
                body,
                fault,
                {"ipAddress": f"198.51.100.{next(self._ips)}"},
            )
        if kind == "networkinterfaces":
            return self._put_nic(rkey, rid, name, body, fault)
        if kind == "virtualmachines":
            return self._put_vm(rkey, rid, name, body, fault)
        return 404, {}, _error("NotFound", f"No fake route for PUT {rest}")

    # --- resources ----------------------------------------------------------------------------------------

    def _new_op(
        self,
        error: dict[str, str] | None,
        on_done: Callable[[bool], None] | None,
        *,
        polls: int | None = None,
    ) -> str:
        op_id = str(uuid.uuid4())
        self.operations[op_id] = _Operation(self.async_polls if polls is None else polls, error, on_done)
        return f"{self.url}/subscriptions/{self.subscription_id}/operations/{op_id}?api-version=2024-07-01"

    def _poll(self, op_id: str, method: str) -> tuple[int, dict[str, str], Any]:
        op = self.operations.get(op_id)
        if op is None or method != "GET":
            return 404, {}, _error("NotFound", "no such operation")
        if op.polls_left > 0:
            op.polls_left -= 1
            return 200, {}, {"status": "InProgress", "startTime": _now()}
        if not op.done:
            op.done = True
            if op.on_done is not None:
                op.on_done(op.error is None)
        if op.error is not None:
            return 200, {}, {"status": "Failed", "endTime": _now(), "error": op.error}
        return 200, {}, {"status": "Succeeded", "endTime": _now()}

    def _accepted(
        self, rkey: tuple[str, str, str], res: dict[str, Any], fault: _Fault | None
    ) -> tuple[int, dict[str, str], Any]:
        """Store ``res`` as Creating and answer 201 + Azure-AsyncOperation; the operation settles it."""
        res.setdefault("properties", {})["provisioningState"] = "Creating"
        self.resources[rkey] = res
        error = (
            {"code": fault.code, "message": fault.message}
            if fault is not None and fault.asynchronous
            else None
        )

        def done(ok: bool) -> None:
            res["properties"]["provisioningState"] = "Succeeded" if ok else "Failed"
            if ok and rkey[1] == "virtualmachines":
                self.power[res["id"].lower()] = "running"

        op = self._new_op(error, done)
        return 201, {"Azure-AsyncOperation": op}, res

    def _put_simple(
        self,
        rkey: tuple[str, str, str],
        rid: str,
        name: str,
        rtype: str,
        body: Any,
        fault: _Fault | None,
        extra: dict[str, Any],
    ) -> tuple[int, dict[str, str], Any]:
        res = {
            "id": rid,
            "name": name,
            "type": rtype,
            "location": body.get("location"),
            "tags": body.get("tags") or {},
            "sku": body.get("sku"),
            "properties": {**(body.get("properties") or {}), **extra},
        }
        return self._accepted(rkey, res, fault)

    def _put_nic(
        self, rkey: tuple[str, str, str], rid: str, name: str, body: Any, fault: _Fault | None
    ) -> tuple[int, dict[str, str], Any]:
        props = json.loads(json.dumps(body.get("properties") or {}))
        for i, cfg in enumerate(props.get("ipConfigurations") or []):
            cfg.setdefault("id", f"{rid}/ipConfigurations/{cfg.get('name') or i}")
            p = cfg.setdefault("properties", {})
            p["privateIPAddress"] = str(ipaddress.ip_address("10.0.0.4") + len(self.resources))
            pip = (p.get("publicIPAddress") or {}).get("id", "")
            if pip:
                parts = pip.split("/")
                if (parts[4].lower(), "publicipaddresses", parts[-1].lower()) not in self.resources:
                    return (
                        400,
                        {},
                        _error(
                            "InvalidResourceReference", f"Resource {pip} referenced by {rid} was not found."
                        ),
                    )
        res = {
            "id": rid,
            "name": name,
            "type": "Microsoft.Network/networkInterfaces",
            "location": body.get("location"),
            "tags": body.get("tags") or {},
            "properties": props,
        }
        return self._accepted(rkey, res, fault)

    def _put_deployment(
        self,
        rkey: tuple[str, str, str],
        rid: str,
        name: str,
        group: dict[str, Any],
        body: Any,
        fault: _Fault | None,
    ) -> tuple[int, dict[str, str], Any]:
        """SkyPilot's bootstrap template: its outputs as the template computes them from the parameters."""
        props = body.get("properties") or {}
        params = {k: (v or {}).get("value") for k, v in (props.get("parameters") or {}).items()}
        if not props.get("template") or not params.get("clusterId") or not params.get("nsgName"):
            return 400, {}, _error("InvalidTemplate", "Deployment template or parameters are missing.")
        base = f"/subscriptions/{self.subscription_id}/resourceGroups/{group['name']}/providers"
        cluster = params["clusterId"]
        outputs = {
            "subnet": {
                "type": "String",
                "value": f"{base}/Microsoft.Network/virtualNetworks/sky-{cluster}-vnet/subnets/sky-{cluster}-subnet",
            },
            "nsg": {
                "type": "String",
                "value": f"{base}/Microsoft.Network/networkSecurityGroups/{params['nsgName']}",
            },
            "msi": {
                "type": "String",
                "value": f"{base}/Microsoft.ManagedIdentity/userAssignedIdentities/sky-{cluster}-msi",
            },
        }
        res: dict[str, Any] = {
            "id": rid,
            "name": name,
            "type": "Microsoft.Resources/deployments",
            "properties": {"mode": props.get("mode"), "parameters": props.get("parameters"), "outputs": None},
        }
        status, headers, out = self._accepted(rkey, res, fault)

        op = self.operations[headers["Azure-AsyncOperation"].split("/operations/")[1].split("?")[0]]
        settle = op.on_done

        def done(ok: bool) -> None:
            if settle is not None:
                settle(ok)
            if ok:
                res["properties"]["outputs"] = outputs

        op.on_done = done
        return status, headers, out

    def _put_vm(
        self, rkey: tuple[str, str, str], rid: str, name: str, body: Any, fault: _Fault | None
    ) -> tuple[int, dict[str, str], Any]:
        props = body.get("properties") or {}
        location = body.get("location") or ""
        size = (props.get("hardwareProfile") or {}).get("vmSize") or ""
        sku = self.skus.get(size.lower())
        if sku is None or location not in sku.locations:
            return (
                409,
                {},
                _error(
                    "SkuNotAvailable",
                    f"The requested VM size {size} is not available in location '{location}'.",
                ),
            )
        zones = body.get("zones") or []
        restricted = sku.restricted.get(location)
        if restricted is not None and (not restricted or any(z in restricted for z in zones)):
            return (
                409,
                {},
                _error(
                    "SkuNotAvailable",
                    f"The requested VM size for resource 'Following SKUs have failed for Capacity Restrictions: "
                    f"{size}' is currently not available in location '{location}'. Please try another size or "
                    "deploy to a different location or different zone. See https://aka.ms/azureskunotavailable "
                    "for details.",
                ),
            )
        for nic in (props.get("networkProfile") or {}).get("networkInterfaces") or []:
            parts = nic["id"].split("/")
            if (parts[4].lower(), "networkinterfaces", parts[-1].lower()) not in self.resources:
                return 400, {}, _error("InvalidResourceReference", f"Resource {nic['id']} was not found.")
        quota = self._quota_error(location, sku, spot=props.get("priority") == "Spot")
        if quota is not None:
            return 409, {}, _error("OperationNotAllowed", quota)
        stored = json.loads(json.dumps(props))
        os_profile = stored.get("osProfile") or {}
        os_profile.pop("adminPassword", None)  # ARM never returns secrets
        os_profile.pop("customData", None)
        res = {
            "id": rid,
            "name": name,
            "type": "Microsoft.Compute/virtualMachines",
            "location": location,
            "tags": body.get("tags") or {},
            "identity": body.get("identity"),
            "zones": zones or None,
            "properties": {**stored, "vmId": str(uuid.uuid4()), "timeCreated": _now()},
        }
        self.power[rid.lower()] = "starting"
        return self._accepted(rkey, res, fault)

    def _vm_out(self, vm: dict[str, Any], query: dict[str, str]) -> dict[str, Any]:
        out = json.loads(json.dumps(vm))
        if query.get("statusOnly", "").lower() == "true" or query.get("$expand") == "instanceView":
            out["properties"]["instanceView"] = self._instance_view(vm)
        return out

    def _instance_view(self, vm: dict[str, Any]) -> dict[str, Any]:
        state = vm["properties"].get("provisioningState", "Creating")
        statuses = [
            {
                "code": f"ProvisioningState/{state.lower()}",
                "level": "Error" if state == "Failed" else "Info",
                "displayStatus": f"Provisioning {state.lower()}",
            }
        ]
        power = self.power.get(vm["id"].lower())
        if power is not None and state != "Failed":
            statuses.append({"code": f"PowerState/{power}", "level": "Info", "displayStatus": f"VM {power}"})
        return {"computerName": vm["name"], "statuses": statuses}

    # --- quota and skus ---------------------------------------------------------------------------------

    def _used(self, location: str, *, family: str | None = None, spot: bool | None = None) -> int:
        total = 0
        for (_, k, _), vm in self.resources.items():
            if k != "virtualmachines" or vm["location"] != location:
                continue
            if self.power.get(vm["id"].lower()) == "deallocated":
                continue  # a deallocated VM holds no cores
            sku = self.skus[vm["properties"]["hardwareProfile"]["vmSize"].lower()]
            is_spot = vm["properties"].get("priority") == "Spot"
            if spot is not None and is_spot != spot:
                continue
            if family is not None and sku.family.lower() != family.lower():
                continue
            total += sku.vcpus
        return total

    def _limit(self, location: str, name: str) -> int:
        default = (
            self.default_family_quota if name.lower().endswith("family") else self.default_regional_quota
        )
        return self.quota.get((location, name.lower()), default)

    def _quota_error(self, location: str, sku: Sku, *, spot: bool) -> str | None:
        checks = (
            [("lowPriorityCores", self._used(location, spot=True))]
            if spot
            else [
                (sku.family, self._used(location, family=sku.family, spot=False)),
                ("cores", self._used(location, spot=False)),
            ]
        )
        for name, used in checks:
            limit = self._limit(location, name)
            if used + sku.vcpus > limit:
                what = {"cores": "Total Regional Cores", "lowPriorityCores": "Low Priority Cores"}.get(
                    name, name
                )
                return (
                    f"Operation could not be completed as it results in exceeding approved {what} quota. "
                    f"Additional details - Deployment Model: Resource Manager, Location: {location}, "
                    f"Current Limit: {limit}, Current Usage: {used}, Additional Required: {sku.vcpus}, "
                    f"(Minimum) New Limit Required: {used + sku.vcpus}. Submit a request for Quota increase at "
                    "https://aka.ms/ProdCoresQuotaIncrease by specifying parameters listed in the 'Details' "
                    "section for deployment to succeed."
                )
        return None

    def _skus(self, flt: str) -> list[dict[str, Any]]:
        m = re.search(r"location eq '([^']+)'", flt)
        want = m.group(1) if m else None
        out = []
        for s in self.skus.values():
            locations = [loc for loc in s.locations if want is None or loc == want]
            if not locations:
                continue
            restrictions = []
            for loc in locations:
                zones = s.restricted.get(loc)
                if zones is None:
                    continue
                if zones:
                    restrictions.append(
                        {
                            "type": "Zone",
                            "values": [loc],
                            "restrictionInfo": {"locations": [loc], "zones": list(zones)},
                            "reasonCode": "NotAvailableForSubscription",
                        }
                    )
                else:
                    restrictions.append(
                        {
                            "type": "Location",
                            "values": [loc],
                            "restrictionInfo": {"locations": [loc]},
                            "reasonCode": "NotAvailableForSubscription",
                        }
                    )
            caps = [
                {"name": "vCPUs", "value": str(s.vcpus)},
                {"name": "MemoryGB", "value": str(s.memory_gb)},
                {"name": "LowPriorityCapable", "value": "True"},
            ]
            if s.gpus:
                caps.append({"name": "GPUs", "value": str(s.gpus)})
            out.append(
                {
                    "resourceType": "virtualMachines",
                    "name": s.name,
                    "tier": "Standard",
                    "size": s.name.removeprefix("Standard_"),
                    "family": s.family,
                    "locations": locations,
                    "locationInfo": [
                        {"location": loc, "zones": list(s.zones), "zoneDetails": []} for loc in locations
                    ],
                    "capabilities": caps,
                    "restrictions": restrictions,
                }
            )
        return out

    def _usages(self, location: str) -> list[dict[str, Any]]:
        def row(name: str, localized: str, used: int) -> dict[str, Any]:
            return {
                "unit": "Count",
                "currentValue": used,
                "limit": self._limit(location, name),
                "name": {"value": name, "localizedValue": localized},
            }

        rows = [
            row("cores", "Total Regional vCPUs", self._used(location, spot=False)),
            row("lowPriorityCores", "Total Regional Low-priority vCPUs", self._used(location, spot=True)),
        ]
        for family in sorted({s.family for s in self.skus.values()}):
            rows.append(row(family, f"{family} vCPUs", self._used(location, family=family, spot=False)))
        return rows


def _make_handler(arm: FakeArm) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # headers and body go out as separate writes

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's name
            pass  # the request log on FakeArm is the record

        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            try:
                body = json.loads(raw) if raw else {}
            except ValueError:
                body = {}
            status, headers, payload = arm.handle(self.command, self.path, body)
            data = b"" if payload is None else json.dumps(payload).encode()
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("x-ms-request-id", str(uuid.uuid4()))
            if payload is not None:
                self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_PUT = do_PATCH = do_DELETE = do_POST = do_HEAD = _serve  # noqa: N815

    return Handler


def _write_self_signed(cert_path: Path, key_path: Path) -> None:
    """A throw-away certificate for 127.0.0.1/localhost (the SDK verifies it with ``connection_verify``)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fake-arm.local")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )


def write_cli_login(directory: Path, subscription_id: str = SUBSCRIPTION) -> dict[str, str]:
    """Test fixture for an ``az login``: a fake ``az`` (prints a token for ``account get-access-token``) in
    ``directory/bin`` and an ``azureProfile.json`` in ``directory/azure``. Returns the env vars to set
    (``PATH`` prefix and ``AZURE_CONFIG_DIR``)."""
    bin_dir = directory / "bin"
    cfg = directory / "azure"
    bin_dir.mkdir(parents=True, exist_ok=True)
    cfg.mkdir(parents=True, exist_ok=True)
    az = bin_dir / "az"
    az.write_text(
        "#!/bin/sh\n"
        'if [ "$1 $2" = "account get-access-token" ]; then\n'
        '  echo \'{"accessToken": "fake-token", "expires_on": 4102444800, "tokenType": "Bearer", '
        f'"subscription": "{subscription_id}", "tenant": "{TENANT}"}}\'\n'
        "  exit 0\nfi\n"
        'echo "fake az: unsupported command: $*" >&2\nexit 2\n'
    )
    az.chmod(0o755)
    profile = {
        "installationId": str(uuid.uuid4()),
        "subscriptions": [
            {
                "id": subscription_id,
                "name": "cloudmodal-test",
                "state": "Enabled",
                "user": {"name": "tester@example.com", "type": "user"},
                "isDefault": True,
                "tenantId": TENANT,
                "homeTenantId": TENANT,
                "environmentName": "AzureCloud",
            }
        ],
    }
    # az writes this file with a UTF-8 byte order mark; readers must cope with it.
    (cfg / "azureProfile.json").write_text(json.dumps(profile), encoding="utf-8-sig")
    return {"bin": str(bin_dir), "AZURE_CONFIG_DIR": str(cfg)}
