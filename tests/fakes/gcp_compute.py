"""A stateful fake of the Compute Engine v1 REST API (plus the OAuth token endpoint, Cloud Resource Manager
and IAM as far as SkyPilot's GCP bootstrap reads them) on 127.0.0.1.

It answers what SkyPilot 0.14.1's GCP provisioner (``sky.provision.gcp``) and cloudmodal's GCP driver call,
in GCP's own shapes: camelCase JSON, int64 fields as strings, full ``https://www.googleapis.com/...`` self
links, ``labelFingerprint`` checked on ``setLabels``, operations that finish on ``get``/``wait``, GCP's error
envelope ``{"error": {"code", "message", "errors": [{"domain", "reason", "message"}]}}``.

URL layout (one server for every service; a service's host becomes a path prefix, which is what the
driver's ``api_endpoint`` option does): ``/compute/compute/v1/...``, ``/cloudresourcemanager/v1/...``,
``/iam/v1/...`` and ``POST /token``.

Bootstrap: the project starts "already set up for SkyPilot" (project ACTIVE, service account
``skypilot-v1@P.iam.gserviceaccount.com`` bound to SkyPilot's four default roles, a ``default`` VPC with a
subnet per region and firewall rules that satisfy ``FIREWALL_RULES_REQUIRED``), so SkyPilot's
``bootstrap_instances`` takes its read-only path (project get, service account get, IAM policy get,
subnet list, effective firewalls).

Test controls:

- :meth:`FakeGcp.fail_operation` -- the next insert operation(s) end with an error code on the *operation*
  (``ZONE_RESOURCE_POOL_EXHAUSTED``, ``QUOTA_EXCEEDED``, ``UNSUPPORTED_OPERATION``...), as GCP reports stockouts.
- :meth:`FakeGcp.fail_request` -- the next matching request(s) answer an HTTP error synchronously
  (403 ``quotaExceeded``, 401 ``authError``, 403 ``forbidden``...).
- :meth:`FakeGcp.fail_token` -- the token endpoint answers ``invalid_grant``.
- :meth:`FakeGcp.preempt` -- an instance goes to ``TERMINATED`` and a ``compute.instances.preempted`` zone
  operation is recorded for it (GCP's own preemption marker).
- :meth:`FakeGcp.set_accelerators`, :meth:`FakeGcp.set_quota` -- what ``acceleratorTypes`` and
  ``regions`` answer.
- :attr:`FakeGcp.requests` -- every API call as ``(method, path, query, body)``; never the
  ``Authorization`` header or the token request's assertion.

Use ``with FakeGcp() as fake:`` (a ``ThreadingHTTPServer`` in a daemon thread); :meth:`FakeGcp.reset` between
tests; :meth:`FakeGcp.write_credentials` writes a service-account JSON whose ``token_uri`` is this server.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import re
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

GOOGLE = "https://www.googleapis.com/compute/v1"
PROJECT = "cm-test-project"
PROJECT_NUMBER = "123456789012"

# Accelerator types offered per zone by default (name, maximumCardsPerInstance).
DEFAULT_ACCELERATORS: dict[str, list[tuple[str, int]]] = {
    "us-central1-a": [("nvidia-tesla-t4", 4), ("nvidia-l4", 8), ("nvidia-tesla-a100", 16)],
    "us-central1-b": [("nvidia-tesla-t4", 4), ("nvidia-tesla-v100", 8)],
    "us-east1-c": [("nvidia-tesla-t4", 4)],
    "europe-west4-a": [("nvidia-tesla-t4", 4), ("nvidia-h100-80gb", 8)],
}
# Regional GPU quotas by default: region -> metric -> (limit, usage).
DEFAULT_QUOTAS: dict[str, dict[str, tuple[float, float]]] = {
    "us-central1": {
        "CPUS": (600.0, 0.0),
        "NVIDIA_T4_GPUS": (8.0, 0.0),
        "PREEMPTIBLE_NVIDIA_T4_GPUS": (16.0, 0.0),
        "NVIDIA_L4_GPUS": (4.0, 1.0),
        "NVIDIA_A100_GPUS": (0.0, 0.0),
        "NVIDIA_V100_GPUS": (2.0, 0.0),
    },
    "us-east1": {"CPUS": (600.0, 0.0), "NVIDIA_T4_GPUS": (4.0, 0.0)},
    "europe-west4": {"CPUS": (600.0, 0.0), "NVIDIA_T4_GPUS": (4.0, 0.0), "NVIDIA_H100_GPUS": (8.0, 0.0)},
}

_LABEL_KEY = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
_LABEL_VALUE = re.compile(r"^[a-z0-9_-]{0,63}$")
# One term of GCP's list filter syntax as SkyPilot and the driver write it: ``(labels.k = v)``,
# ``(status = RUNNING)``, ``name=x``, ``operationType = "compute.instances.preempted"``.
_TERM = re.compile(r"([A-Za-z][\w.\-]*)\s*(=|!=|\beq\b|\bne\b)\s*(\"[^\"]*\"|[^\s()]+)")


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "-00:00"


def _fingerprint(obj: Any) -> str:
    import base64

    digest = hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).digest()[:8]
    return base64.b64encode(digest).decode()


def _field(obj: dict[str, Any], dotted: str) -> Any:
    cur: Any = obj
    for part in dotted.split("."):
        if not isinstance(cur, dict):
            return None
        cur = cur.get(part)
    return cur


def matches_filter(obj: dict[str, Any], expr: str | None) -> bool:
    """GCP list filters as used here: terms on one field are OR-ed, terms on different fields AND-ed."""
    if not expr:
        return True
    by_field: dict[str, list[tuple[str, str]]] = {}
    for field_name, op, raw in _TERM.findall(expr):
        by_field.setdefault(field_name, []).append((op, raw.strip('"')))
    for field_name, terms in by_field.items():
        value = _field(obj, field_name)
        value = "" if value is None else str(value)
        ok = False
        for op, want in terms:
            equal = value == want
            if (op in ("=", "eq") and equal) or (op in ("!=", "ne") and not equal):
                ok = True
        if not ok:
            return False
    return True


class GcpError(Exception):
    """An HTTP error answered in GCP's error envelope."""

    def __init__(self, status: int, reason: str, message: str, domain: str = "global") -> None:
        super().__init__(message)
        self.status, self.reason, self.message, self.domain = status, reason, message, domain

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "code": self.status,
                "message": self.message,
                "errors": [{"message": self.message, "domain": self.domain, "reason": self.reason}],
            }
        }


@dataclass
class _RequestFault:
    action: str  # "bulkInsert", "instances.list", "*"...
    error: GcpError
    times: int


def _not_found(path: str) -> GcpError:
    return GcpError(404, "notFound", f"The resource '{path}' was not found")


class FakeGcp:
    """The fake's state and its HTTP server. Thread-safe: one lock around all state."""

    def __init__(self, project: str = PROJECT) -> None:
        self.project = project
        self._lock = threading.RLock()
        self._ids = itertools.count(1_000_000_000_000_000_001)
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.reset()

    # -- lifecycle -----------------------------------------------------------------------------------------

    def __enter__(self) -> FakeGcp:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        fake = self

        class Handler(_Handler):
            owner = fake

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-gcp", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    @property
    def url(self) -> str:
        """The root every service is under (what the driver's ``api_endpoint`` takes)."""
        assert self._server is not None, "start() the fake first"
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    @property
    def token_uri(self) -> str:
        return f"{self.url}/token"

    def reset(self) -> None:
        """Forget every instance, operation, fault and logged request; restore the default set-up."""
        with self._lock:
            self.instances: dict[tuple[str, str], dict[str, Any]] = {}  # (zone, name) -> instance
            self.operations: dict[str, dict[str, Any]] = {}  # name -> operation
            self._pending: dict[str, Any] = {}  # operation name -> what completing it does
            self.requests: list[tuple[str, str, dict[str, list[str]], Any]] = []
            self.tokens_issued = 0
            self._request_faults: list[_RequestFault] = []
            self._operation_faults: list[tuple[str, str, int]] = []  # (code, message, times)
            self._token_faults = 0
            self.accelerators = {z: list(v) for z, v in DEFAULT_ACCELERATORS.items()}
            self.quotas = {r: dict(q) for r, q in DEFAULT_QUOTAS.items()}
            sa_email = f"skypilot-v1@{self.project}.iam.gserviceaccount.com"
            self.service_accounts = {
                sa_email: {
                    "name": f"projects/{self.project}/serviceAccounts/{sa_email}",
                    "projectId": self.project,
                    "uniqueId": "112233445566778899001",
                    "email": sa_email,
                    "displayName": "SkyPilot Service Account (v1)",
                    "oauth2ClientId": "112233445566778899001",
                }
            }
            member = f"serviceAccount:{sa_email}"
            self.iam_policy: dict[str, Any] = {
                "version": 1,
                "etag": "BwYAAAAAAAA=",
                "bindings": [
                    {"role": role, "members": [member]}
                    for role in (
                        "roles/storage.admin",
                        "roles/compute.admin",
                        "roles/iam.serviceAccountUser",
                        "roles/iam.roleViewer",
                    )
                ],
            }
            self.firewalls: dict[str, dict[str, Any]] = {
                "default-allow-internal": self._firewall(
                    "default-allow-internal",
                    "default",
                    "10.128.0.0/9",
                    [
                        {"IPProtocol": "tcp", "ports": ["0-65535"]},
                        {"IPProtocol": "udp", "ports": ["0-65535"]},
                    ],
                ),
                "default-allow-ssh": self._firewall(
                    "default-allow-ssh", "default", "0.0.0.0/0", [{"IPProtocol": "tcp", "ports": ["22"]}]
                ),
            }
            self.networks: dict[str, dict[str, Any]] = {"default": self._network("default")}

    # -- test controls -------------------------------------------------------------------------------------

    def fail_operation(self, code: str, message: str | None = None, *, times: int = 1) -> None:
        """The next ``times`` instance-creating operations finish DONE with ``error.errors[0].code == code``."""
        msg = message or {
            "ZONE_RESOURCE_POOL_EXHAUSTED": "The zone does not have enough resources available to fulfill "
            "the request.  Try a different zone, or try again later.",
            "QUOTA_EXCEEDED": "Quota 'NVIDIA_T4_GPUS' exceeded.  Limit: 0.0 in region us-central1.",
            "UNSUPPORTED_OPERATION": "The accelerator type is not available in this zone.",
        }.get(code, code)
        with self._lock:
            self._operation_faults.append((code, msg, times))

    def fail_request(
        self, action: str, status: int, reason: str, message: str | None = None, *, times: int = 1
    ) -> None:
        """The next ``times`` requests of ``action`` (``"bulkInsert"``, ``"instances.list"``, ``"*"``...)
        answer HTTP ``status`` with ``errors[0].reason == reason``."""
        domain = "usageLimits" if reason in ("quotaExceeded", "rateLimitExceeded") else "global"
        msg = message or {
            "quotaExceeded": "Quota 'GPUS_ALL_REGIONS' exceeded.  Limit: 0.0 globally.",
            "authError": "Request had invalid authentication credentials. Expected OAuth 2 access token, "
            "login cookie or other valid authentication credential.",
            "forbidden": "Required 'compute.instances.create' permission for "
            f"'projects/{self.project}/zones/us-central1-a/instances/x'",
        }.get(reason, reason)
        with self._lock:
            self._request_faults.append(_RequestFault(action, GcpError(status, reason, msg, domain), times))

    def fail_token(self, times: int = 1) -> None:
        """The next ``times`` token requests answer 400 ``invalid_grant``."""
        with self._lock:
            self._token_faults += times

    def preempt(self, name: str) -> None:
        """GCP reclaims a spot instance: status ``TERMINATED`` and a ``compute.instances.preempted`` operation."""
        with self._lock:
            key = next((k for k in self.instances if k[1] == name), None)
            if key is None:
                raise KeyError(name)
            inst = self.instances[key]
            inst["status"] = "TERMINATED"
            inst["lastStopTimestamp"] = _now()
            for nic in inst.get("networkInterfaces", []):
                for ac in nic.get("accessConfigs", []):
                    ac.pop("natIP", None)
            op = self._operation(key[0], "compute.instances.preempted", inst["selfLink"], done=True)
            op["statusMessage"] = "Instance was preempted."
            op["user"] = "system"

    def set_accelerators(self, zone: str, types: list[tuple[str, int]]) -> None:
        with self._lock:
            self.accelerators[zone] = list(types)

    def set_quota(self, region: str, metric: str, limit: float, usage: float = 0.0) -> None:
        with self._lock:
            self.quotas.setdefault(region, {})[metric] = (limit, usage)

    def instance(self, name: str) -> dict[str, Any] | None:
        with self._lock:
            for (_zone, n), inst in self.instances.items():
                if n == name:
                    return copy.deepcopy(inst)
        return None

    def calls(
        self, fragment: str, method: str | None = None
    ) -> list[tuple[str, str, dict[str, list[str]], Any]]:
        """Logged requests whose path contains ``fragment`` (and of ``method``, if given)."""
        with self._lock:
            return [r for r in self.requests if fragment in r[1] and (method is None or r[0] == method)]

    def write_credentials(self, path: Path) -> Path:
        """A service-account key file (fresh RSA key) whose tokens come from this server.

        The key is 1024-bit: google.auth re-reads and validates the key for every client SkyPilot builds
        (about 70 ms each at 2048 bits), and the fake never checks the signature anyway."""
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa

        key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).decode()
        info = {
            "type": "service_account",
            "project_id": self.project,
            "private_key_id": "0123456789abcdef",
            "private_key": pem,
            "client_email": f"cloudmodal-test@{self.project}.iam.gserviceaccount.com",
            "client_id": "100000000000000000001",
            "auth_uri": f"{self.url}/auth",
            "token_uri": self.token_uri,
        }
        path.write_text(json.dumps(info))
        path.chmod(0o600)
        return path

    # -- resource shapes -----------------------------------------------------------------------------------

    def _next_id(self) -> str:
        return str(next(self._ids))

    def _firewall(
        self, name: str, network: str, source: str, allowed: list[dict[str, Any]]
    ) -> dict[str, Any]:
        return {
            "kind": "compute#firewall",
            "id": self._next_id(),
            "creationTimestamp": _now(),
            "name": name,
            "network": f"{GOOGLE}/projects/{self.project}/global/networks/{network}",
            "priority": 65534,
            "sourceRanges": [source],
            "allowed": allowed,
            "direction": "INGRESS",
            "disabled": False,
            "selfLink": f"{GOOGLE}/projects/{self.project}/global/firewalls/{name}",
        }

    def _network(self, name: str) -> dict[str, Any]:
        return {
            "kind": "compute#network",
            "id": self._next_id(),
            "creationTimestamp": _now(),
            "name": name,
            "selfLink": f"{GOOGLE}/projects/{self.project}/global/networks/{name}",
            "autoCreateSubnetworks": True,
            "routingConfig": {"routingMode": "REGIONAL"},
            "networkFirewallPolicyEnforcementOrder": "AFTER_CLASSIC_FIREWALL",
        }

    def _subnet(self, region: str) -> dict[str, Any]:
        return {
            "kind": "compute#subnetwork",
            "id": str(abs(hash(region)) % 10**18),
            "name": "default",
            "network": f"{GOOGLE}/projects/{self.project}/global/networks/default",
            "ipCidrRange": "10.128.0.0/20",
            "gatewayAddress": "10.128.0.1",
            "region": f"{GOOGLE}/projects/{self.project}/regions/{region}",
            "selfLink": f"{GOOGLE}/projects/{self.project}/regions/{region}/subnetworks/default",
            "stackType": "IPV4_ONLY",
        }

    def _operation(
        self, zone: str | None, op_type: str, target: str, *, done: bool = False
    ) -> dict[str, Any]:
        name = f"operation-{int(time.time() * 1000)}-{self._next_id()[-12:]}"
        scope = f"zones/{zone}" if zone else "global"
        op: dict[str, Any] = {
            "kind": "compute#operation",
            "id": self._next_id(),
            "name": name,
            "operationType": op_type,
            "targetLink": target,
            "targetId": self._next_id(),
            "status": "DONE" if done else "RUNNING",
            "user": f"cloudmodal-test@{self.project}.iam.gserviceaccount.com",
            "progress": 100 if done else 0,
            "insertTime": _now(),
            "startTime": _now(),
            "selfLink": f"{GOOGLE}/projects/{self.project}/{scope}/operations/{name}",
        }
        if zone:
            op["zone"] = f"{GOOGLE}/projects/{self.project}/zones/{zone}"
        if done:
            op["endTime"] = _now()
        self.operations[name] = op
        return op

    def _new_instance(self, zone: str, name: str, props: dict[str, Any]) -> dict[str, Any]:
        n = len(self.instances) + 2
        labels = dict(props.get("labels") or {})
        machine = str(props.get("machineType", ""))
        accels = []
        for acc in props.get("guestAccelerators") or []:
            acc_name = str(acc.get("acceleratorType", "")).rsplit("/", 1)[-1]
            accels.append(
                {
                    "acceleratorType": f"{GOOGLE}/projects/{self.project}/zones/{zone}/acceleratorTypes/{acc_name}",
                    "acceleratorCount": int(acc.get("acceleratorCount", 1)),
                }
            )
        nics = []
        for i, nic in enumerate(props.get("networkInterfaces") or [{}]):
            out = {
                "kind": "compute#networkInterface",
                "name": f"nic{i}",
                "network": f"{GOOGLE}/projects/{self.project}/global/networks/default",
                "subnetwork": nic.get("subnetwork", ""),
                "networkIP": f"10.128.0.{n}",
                "fingerprint": "AAAAAAAAAAA=",
                "stackType": "IPV4_ONLY",
            }
            if "accessConfigs" in nic:
                out["accessConfigs"] = [
                    {
                        "kind": "compute#accessConfig",
                        "type": "ONE_TO_ONE_NAT",
                        "name": "External NAT",
                        "natIP": f"34.1.{n // 250}.{n % 250}",
                        "networkTier": "PREMIUM",
                    }
                ]
            nics.append(out)
        disks = []
        for i, d in enumerate(props.get("disks") or []):
            init = d.get("initializeParams") or {}
            disks.append(
                {
                    "kind": "compute#attachedDisk",
                    "type": d.get("type", "PERSISTENT"),
                    "mode": "READ_WRITE",
                    "source": f"{GOOGLE}/projects/{self.project}/zones/{zone}/disks/{name}",
                    "deviceName": "persistent-disk-0" if i == 0 else f"disk-{i}",
                    "index": i,
                    "boot": bool(d.get("boot")),
                    "autoDelete": bool(d.get("autoDelete")),
                    "diskSizeGb": str(init.get("diskSizeGb", "10")),
                    "interface": "SCSI",
                }
            )
        metadata = copy.deepcopy(props.get("metadata") or {})
        metadata["kind"] = "compute#metadata"
        metadata["fingerprint"] = _fingerprint(metadata.get("items", []))
        return {
            "kind": "compute#instance",
            "id": self._next_id(),
            "creationTimestamp": _now(),
            "name": name,
            "machineType": f"{GOOGLE}/projects/{self.project}/zones/{zone}/machineTypes/{machine.rsplit('/', 1)[-1]}",
            "status": "PROVISIONING",
            "zone": f"{GOOGLE}/projects/{self.project}/zones/{zone}",
            "networkInterfaces": nics,
            "disks": disks,
            "metadata": metadata,
            "serviceAccounts": copy.deepcopy(props.get("serviceAccounts") or []),
            "selfLink": f"{GOOGLE}/projects/{self.project}/zones/{zone}/instances/{name}",
            "scheduling": copy.deepcopy(props.get("scheduling") or {})
            or {"onHostMaintenance": "MIGRATE", "automaticRestart": True, "preemptible": False},
            "guestAccelerators": accels,
            "labels": labels,
            "labelFingerprint": _fingerprint(labels),
            "tags": {"fingerprint": "42WmSpB8rSM="},
            "cpuPlatform": "Unknown CPU Platform",
            "startRestricted": False,
            "deletionProtection": False,
            "fingerprint": _fingerprint(name),
        }

    # -- request handling ----------------------------------------------------------------------------------

    def handle(self, method: str, path: str, query: dict[str, list[str]], body: Any) -> tuple[int, Any]:
        """Route one request (already authenticated) and return ``(status, json body)``."""
        with self._lock:
            self.requests.append((method, path, query, body))
            try:
                action = self._action(method, path)
                for fault in self._request_faults:
                    if fault.times > 0 and fault.action in (action, "*"):
                        fault.times -= 1
                        return fault.error.status, fault.error.body()
                return 200, self._route(method, path, query, body)
            except GcpError as e:
                return e.status, e.body()

    @staticmethod
    def _action(method: str, path: str) -> str:
        """A short name for a request, used to aim faults: ``bulkInsert``, ``instances.list``..."""
        parts = [p for p in path.split("/") if p]
        last = parts[-1] if parts else ""
        if last in ("bulkInsert", "setLabels", "stop", "start", "wait", "setTags", "getEffectiveFirewalls"):
            return last
        if "instances" in parts:
            i = parts.index("instances")
            if i == len(parts) - 1:
                return {"GET": "instances.list", "POST": "instances.insert"}.get(method, method)
            return {"GET": "instances.get", "DELETE": "instances.delete"}.get(method, method)
        if "operations" in parts:
            return "operations.get"
        if "acceleratorTypes" in parts:
            return "acceleratorTypes.list"
        if "regions" in parts:
            return "regions.get" if parts[-2] == "regions" else "regions.other"
        return f"{method} {'/'.join(parts[:3])}"

    def _route(self, method: str, path: str, query: dict[str, list[str]], body: Any) -> Any:
        flt = query["filter"][0] if query.get("filter") else None
        crm = re.fullmatch(r"/cloudresourcemanager/v1/projects/([^/:]+)(:getIamPolicy|:setIamPolicy)?", path)
        if crm:
            self._check_project(crm.group(1))
            if crm.group(2) is None and method == "GET":
                return {
                    "projectNumber": PROJECT_NUMBER,
                    "projectId": self.project,
                    "lifecycleState": "ACTIVE",
                    "name": self.project,
                    "createTime": "2024-01-01T00:00:00.000Z",
                }
            if crm.group(2) == ":getIamPolicy":
                return copy.deepcopy(self.iam_policy)
            if crm.group(2) == ":setIamPolicy":
                self.iam_policy = copy.deepcopy(body["policy"])
                return copy.deepcopy(self.iam_policy)
        sa = re.fullmatch(r"/iam/v1/projects/([^/]+)/serviceAccounts(?:/([^/]+))?", path)
        if sa:
            self._check_project(sa.group(1))
            if sa.group(2) and method == "GET":
                account = self.service_accounts.get(unquote(sa.group(2)))
                if account is None:
                    raise GcpError(404, "notFound", f"Unknown service account {sa.group(2)}")
                return copy.deepcopy(account)
            if sa.group(2) is None and method == "POST":
                email = f"{body['accountId']}@{self.project}.iam.gserviceaccount.com"
                self.service_accounts[email] = {
                    "name": f"projects/{self.project}/serviceAccounts/{email}",
                    "projectId": self.project,
                    "email": email,
                    **(body.get("serviceAccount") or {}),
                }
                return copy.deepcopy(self.service_accounts[email])
        m = re.fullmatch(r"/compute/compute/v1/projects/([^/]+)(/.*)?", path)
        if not m:
            raise GcpError(404, "notFound", f"The requested URL {path} was not found on this server.")
        self._check_project(m.group(1))
        rest = m.group(2) or ""
        if rest == "" and method == "GET":
            return {
                "kind": "compute#project",
                "id": PROJECT_NUMBER,
                "name": self.project,
                "commonInstanceMetadata": {"kind": "compute#metadata", "fingerprint": "AAAAAAAAAAA="},
                "defaultServiceAccount": f"{PROJECT_NUMBER}-compute@developer.gserviceaccount.com",
                "selfLink": f"{GOOGLE}/projects/{self.project}",
            }
        return self._compute(method, rest, flt, query, body)

    def _check_project(self, project: str) -> None:
        if project != self.project:
            raise GcpError(
                403, "forbidden", f"Permission denied on resource project {project}.", domain="global"
            )

    def _compute(
        self, method: str, rest: str, flt: str | None, query: dict[str, list[str]], body: Any
    ) -> Any:
        p = self.project
        # --- regions and subnets -------------------------------------------------------------------------
        if rest == "/regions" and method == "GET":
            return {
                "kind": "compute#regionList",
                "items": [self._region(r) for r in sorted(self.quotas)],
                "selfLink": f"{GOOGLE}/projects/{p}/regions",
            }
        rm = re.fullmatch(r"/regions/([^/]+)(/subnetworks)?", rest)
        if rm and method == "GET":
            region = rm.group(1)
            if rm.group(2):
                return {"kind": "compute#subnetworkList", "items": [self._subnet(region)]}
            if region not in self.quotas:
                raise _not_found(f"projects/{p}/regions/{region}")
            return self._region(region)
        # --- global network, firewalls, operations -------------------------------------------------------
        if rest == "/global/networks":
            if method == "GET":
                return {"items": [n for n in self.networks.values() if matches_filter(n, flt)]}
            self.networks[body["name"]] = self._network(body["name"])
            return self._operation(None, "insert", self.networks[body["name"]]["selfLink"], done=True)
        nm = re.fullmatch(r"/global/networks/([^/]+)/getEffectiveFirewalls", rest)
        if nm:
            net = nm.group(1)
            return {"firewalls": [f for f in self.firewalls.values() if f["network"].endswith(f"/{net}")]}
        if rest == "/global/firewalls":
            if method == "GET":
                return {"items": [f for f in self.firewalls.values() if matches_filter(f, flt)]}
            rule = copy.deepcopy(body)
            rule["selfLink"] = f"{GOOGLE}/projects/{p}/global/firewalls/{rule['name']}"
            rule["network"] = (
                f"{GOOGLE}/{rule['network']}" if not rule["network"].startswith("http") else rule["network"]
            )
            self.firewalls[rule["name"]] = rule
            return self._operation(None, "insert", rule["selfLink"], done=True)
        fm = re.fullmatch(r"/global/firewalls/([^/]+)", rest)
        if fm:
            if fm.group(1) not in self.firewalls:
                raise _not_found(f"projects/{p}/global/firewalls/{fm.group(1)}")
            if method == "DELETE":
                rule = self.firewalls.pop(fm.group(1))
                return self._operation(None, "delete", rule["selfLink"], done=True)
            return copy.deepcopy(self.firewalls[fm.group(1)])
        gm = re.fullmatch(r"/global/operations/([^/]+)(/wait)?", rest)
        if gm:
            op = self.operations.get(gm.group(1))
            if op is None:
                raise _not_found(f"projects/{p}/global/operations/{gm.group(1)}")
            return copy.deepcopy(op)
        # --- aggregated lists ----------------------------------------------------------------------------
        if rest == "/aggregated/instances" and method == "GET":
            items: dict[str, Any] = {}
            for (zone, _name), inst in sorted(self.instances.items()):
                if matches_filter(inst, flt):
                    items.setdefault(f"zones/{zone}", {"instances": []})["instances"].append(
                        copy.deepcopy(inst)
                    )
            return {
                "kind": "compute#instanceAggregatedList",
                "items": items,
                "id": f"projects/{p}/aggregated/instances",
            }
        if rest == "/aggregated/acceleratorTypes" and method == "GET":
            return {
                "kind": "compute#acceleratorTypeAggregatedList",
                "items": {
                    f"zones/{z}": {"acceleratorTypes": self._accelerators(z)}
                    for z in sorted(self.accelerators)
                },
            }
        # --- zonal resources -----------------------------------------------------------------------------
        zm = re.fullmatch(r"/zones/([^/]+)(/.*)", rest)
        if not zm:
            raise GcpError(
                404, "notFound", f"The requested URL /compute/v1/projects/{p}{rest} was not found."
            )
        zone, sub = zm.group(1), zm.group(2)
        if sub == "/acceleratorTypes" and method == "GET":
            return {"kind": "compute#acceleratorTypeList", "items": self._accelerators(zone)}
        if sub == "/operations" and method == "GET":
            ops = [
                copy.deepcopy(o)
                for o in self.operations.values()
                if o.get("zone", "").endswith(f"/zones/{zone}") and matches_filter(o, flt)
            ]
            return {"kind": "compute#operationList", "items": ops}
        om = re.fullmatch(r"/operations/([^/]+)(/wait)?", sub)
        if om:
            name = om.group(1)
            if name not in self.operations:
                raise _not_found(f"projects/{p}/zones/{zone}/operations/{name}")
            self._complete(name)  # a real wait blocks until done; this one finishes the work at once
            return copy.deepcopy(self.operations[name])
        if sub == "/instances" and method == "GET":
            items_list = [
                copy.deepcopy(i)
                for (z, _n), i in sorted(self.instances.items())
                if z == zone and matches_filter(i, flt)
            ]
            out: dict[str, Any] = {
                "kind": "compute#instanceList",
                "id": f"projects/{p}/zones/{zone}/instances",
                "selfLink": f"{GOOGLE}/projects/{p}/zones/{zone}/instances",
            }
            if items_list:
                out["items"] = items_list
            return out
        if sub == "/instances/bulkInsert" and method == "POST":
            return self._bulk_insert(zone, body)
        if sub == "/instances" and method == "POST":
            return self._bulk_insert(
                zone, {"count": 1, "instanceProperties": body, "perInstanceProperties": {body["name"]: {}}}
            )
        im = re.fullmatch(r"/instances/([^/]+)(/[A-Za-z]+)?", sub)
        if im:
            name, verb = im.group(1), im.group(2)
            found = self.instances.get((zone, name))
            if found is None:
                raise _not_found(f"projects/{p}/zones/{zone}/instances/{name}")
            inst = found
            if verb is None and method == "GET":
                return copy.deepcopy(inst)
            if verb is None and method == "DELETE":
                op = self._operation(zone, "delete", inst["selfLink"])
                self._pending[op["name"]] = ("delete", zone, name)
                inst["status"] = "STOPPING"
                return copy.deepcopy(op)
            if verb == "/setLabels":
                if body.get("labelFingerprint") != inst["labelFingerprint"]:
                    raise GcpError(
                        412,
                        "conditionNotMet",
                        "Labels fingerprint either invalid or resource labels have changed",
                    )
                self._check_labels(body.get("labels") or {})
                inst["labels"] = dict(body.get("labels") or {})
                inst["labelFingerprint"] = _fingerprint(inst["labels"])
                return self._operation(zone, "setLabels", inst["selfLink"], done=True)
            if verb == "/setTags":
                inst["tags"] = {"items": list(body.get("items") or []), "fingerprint": _fingerprint(body)}
                return self._operation(zone, "setTags", inst["selfLink"], done=True)
            if verb == "/stop":
                inst["status"] = "TERMINATED"
                return self._operation(zone, "stop", inst["selfLink"], done=True)
            if verb == "/start":
                inst["status"] = "RUNNING"
                return self._operation(zone, "start", inst["selfLink"], done=True)
        raise GcpError(404, "notFound", f"The requested URL /compute/v1/projects/{p}{rest} was not found.")

    def _region(self, region: str) -> dict[str, Any]:
        return {
            "kind": "compute#region",
            "id": str(abs(hash(region)) % 10**15),
            "name": region,
            "status": "UP",
            "zones": [
                f"{GOOGLE}/projects/{self.project}/zones/{z}"
                for z in sorted(self.accelerators)
                if z.rsplit("-", 1)[0] == region
            ],
            "quotas": [
                {"metric": metric, "limit": limit, "usage": usage}
                for metric, (limit, usage) in sorted(self.quotas.get(region, {}).items())
            ],
            "selfLink": f"{GOOGLE}/projects/{self.project}/regions/{region}",
        }

    def _accelerators(self, zone: str) -> list[dict[str, Any]]:
        return [
            {
                "kind": "compute#acceleratorType",
                "id": str(10000 + i),
                "creationTimestamp": "1969-12-31T16:00:00.000-08:00",
                "name": name,
                "description": name.replace("-", " ").upper(),
                "zone": f"{GOOGLE}/projects/{self.project}/zones/{zone}",
                "maximumCardsPerInstance": cards,
                "selfLink": f"{GOOGLE}/projects/{self.project}/zones/{zone}/acceleratorTypes/{name}",
            }
            for i, (name, cards) in enumerate(self.accelerators.get(zone, []))
        ]

    @staticmethod
    def _check_labels(labels: dict[str, Any]) -> None:
        for k, v in labels.items():
            if not _LABEL_KEY.match(str(k)) or not _LABEL_VALUE.match(str(v)):
                raise GcpError(
                    400,
                    "invalid",
                    f"Invalid value for field 'resource.labels': '{k}'. Label keys and values can only "
                    "contain lowercase letters, numeric characters, underscores and dashes.",
                )

    def _bulk_insert(self, zone: str, body: dict[str, Any]) -> dict[str, Any]:
        props = body.get("instanceProperties") or {}
        names = list((body.get("perInstanceProperties") or {}).keys())
        if not names or int(body.get("count", 0)) != len(names):
            raise GcpError(400, "invalid", "Invalid value for field 'resource.count'.")
        if not props.get("machineType"):
            raise GcpError(
                400, "invalid", "Invalid value for field 'resource.instanceProperties.machineType'."
            )
        boot = [d for d in props.get("disks") or [] if d.get("boot")]
        if not boot or not (boot[0].get("initializeParams") or {}).get("sourceImage"):
            raise GcpError(400, "invalid", "Boot disk must have a source specified")
        self._check_labels(props.get("labels") or {})
        for name in names:
            if (zone, name) in self.instances:
                raise GcpError(
                    409,
                    "alreadyExists",
                    f"The resource 'projects/{self.project}/zones/{zone}/instances/{name}' already exists",
                )
        op = self._operation(
            zone, "bulkInsert", f"{GOOGLE}/projects/{self.project}/zones/{zone}/instances/{names[0]}"
        )
        # The operation's fate is decided now (faults are consumed in request order), applied on get/wait.
        error: tuple[str, str] | None = None
        for i, (code, msg, times) in enumerate(self._operation_faults):
            if times > 0:
                self._operation_faults[i] = (code, msg, times - 1)
                error = (code, msg)
                break
        offered = {n for n, _ in self.accelerators.get(zone, [])}
        for acc in props.get("guestAccelerators") or []:
            acc_name = str(acc.get("acceleratorType", "")).rsplit("/", 1)[-1]
            if error is None and acc_name not in offered:
                error = (
                    "UNSUPPORTED_OPERATION",
                    f"The resource 'projects/{self.project}/zones/{zone}/acceleratorTypes/{acc_name}' is not "
                    "available in this zone.",
                )
        if error is None:
            for name in names:
                self.instances[(zone, name)] = self._new_instance(zone, name, props)
        self._pending[op["name"]] = ("insert", zone, names, error)
        return copy.deepcopy(op)

    def _complete(self, op_name: str) -> None:
        op = self.operations[op_name]
        job = self._pending.pop(op_name, None)
        if op["status"] == "DONE" or job is None:
            op["status"], op["progress"] = "DONE", 100
            return
        if job[0] == "insert":
            _, zone, names, error = job
            if error is not None:
                code, msg = error
                op["error"] = {"errors": [{"code": code, "message": msg}]}
                op["httpErrorStatusCode"] = 503 if "EXHAUSTED" in code else 403 if "QUOTA" in code else 400
                op["httpErrorMessage"] = {503: "SERVICE UNAVAILABLE", 403: "FORBIDDEN"}.get(
                    op["httpErrorStatusCode"], "BAD REQUEST"
                )
            else:
                for name in names:
                    inst = self.instances.get((zone, name))
                    if inst is not None:
                        inst["status"] = "RUNNING"
                        inst["lastStartTimestamp"] = _now()
        elif job[0] == "delete":
            _, zone, name = job
            self.instances.pop((zone, name), None)
        op["status"], op["progress"], op["endTime"] = "DONE", 100, _now()

    def token(self) -> tuple[int, Any]:
        with self._lock:
            self.requests.append(("POST", "/token", {}, None))
            if self._token_faults > 0:
                self._token_faults -= 1
                return 400, {"error": "invalid_grant", "error_description": "Invalid JWT Signature."}
            self.tokens_issued += 1
            return 200, {
                "access_token": f"ya29.fake-{self.tokens_issued}",
                "expires_in": 3599,
                "token_type": "Bearer",
            }


class _Handler(BaseHTTPRequestHandler):
    owner: FakeGcp
    protocol_version = "HTTP/1.1"  # keep-alive, as httplib2 expects

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - signature of the base class
        pass  # the fake keeps its own request log; nothing on stderr

    def _reply(self, status: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=UTF-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _serve(self) -> None:
        url = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if url.path == "/token":
            status, body = self.owner.token()  # the JWT assertion in ``raw`` is neither checked nor kept
            self._reply(status, body)
            return
        auth = self.headers.get("Authorization", "")
        if not auth.startswith("Bearer ya29.fake-"):
            err = GcpError(401, "required", "Request is missing required authentication credential.")
            self._reply(401, err.body())
            return
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode(errors="replace")
        status, out = self.owner.handle(self.command, url.path, parse_qs(url.query), body)
        self._reply(status, out)

    do_GET = do_POST = do_DELETE = do_PATCH = do_PUT = _serve  # noqa: N815 - http.server's naming
