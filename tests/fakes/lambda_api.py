"""A stateful fake of Lambda Cloud's API v1 on 127.0.0.1 that checks both sides against the OpenAPI spec.

Every request body the client sends and every response the fake answers is validated with ``jsonschema``
against ``openapi-1.8.3.json`` (shared at ``../shared/fixtures/lambda``; a ``referencing`` registry resolves
the spec's ``#/components/...`` references). A mismatch is not raised inside the server thread (the client
would only see a 500): it is appended to :attr:`LambdaFake.violations`, which a test asserts empty.

Deviations that SkyPilot 0.14.1's client is known to make (TESTING.md) are tolerated and counted in
:attr:`LambdaFake.tolerated` instead: JSON bodies sent without a ``Content-Type`` header, and the
``quantity`` field of a launch request (not part of ``InstanceLaunchRequest``). A rate-limit answer (HTTP 429,
documented by Lambda but absent from the OpenAPI responses) is also not a violation.

Test controls: :meth:`LambdaFake.set_capacity` per (instance type, region) — it drives
``regions_with_capacity_available`` and whether a launch succeeds; :meth:`LambdaFake.inject_error` answers the
next N calls of one operation with any error code the spec lists for it (HTTP status taken from the spec);
:meth:`LambdaFake.rate_limit` answers 429s; :meth:`LambdaFake.activate` / ``auto_activate_after`` move an
instance from ``booting`` to ``active``; :meth:`LambdaFake.preempt`; :attr:`LambdaFake.requests` logs every
call (never the ``Authorization`` header).

The server is werkzeug's threaded WSGI server in a daemon thread (``with LambdaFake(spec) as fake:``).
"""

from __future__ import annotations

import base64
import copy
import json
import re
import threading
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SPEC_FILE = "openapi-1.8.3.json"
SPEC_HINT = "../shared/fixtures/lambda"
API_PREFIX = "/api/v1"
DEFAULT_API_KEY = "secret_cloudmodal-test_0123456789abcdef"

# The types the fake offers unless told otherwise: (description, gpu description, cents/h, vcpus, RAM GiB,
# disk GiB, GPUs). Names and sizes follow Lambda's public catalog.
DEFAULT_TYPES: dict[str, tuple[str, str, int, int, int, int, int]] = {
    "gpu_1x_a10": ("1x A10 (24 GB PCIe)", "A10 (24 GB PCIe)", 129, 30, 200, 1400, 1),
    "gpu_1x_a100_sxm4": ("1x A100 (40 GB SXM4)", "A100 (40 GB SXM4)", 199, 30, 200, 512, 1),
    "gpu_1x_h100_pcie": ("1x H100 (80 GB PCIe)", "H100 (80 GB PCIe)", 249, 26, 200, 1000, 1),
    "gpu_8x_h100_sxm5": ("8x H100 (80 GB SXM5)", "H100 (80 GB SXM5)", 2392, 208, 1800, 24780, 8),
}
REGION_DESCRIPTIONS: dict[str, str] = {
    "us-east-1": "Virginia, USA",
    "us-west-1": "California, USA",
    "us-west-2": "Arizona, USA",
    "us-west-3": "Utah, USA",
    "us-south-1": "Texas, USA",
    "us-midwest-1": "Illinois, USA",
    "europe-central-1": "Germany",
    "asia-northeast-1": "Tokyo, Japan",
}
# Launch requests the SkyPilot client sends with a field the spec does not have (tolerated, counted).
TOLERATED_LAUNCH_FIELDS = ("quantity",)


def find_spec() -> Path | None:
    """The shared OpenAPI spec (``../shared/fixtures/lambda/openapi-1.8.3.json`` next to the repo), or None."""
    repo = Path(__file__).resolve().parents[2]
    path = repo.parent / "shared" / "fixtures" / "lambda" / SPEC_FILE
    return path if path.is_file() else None


def _pointer(*parts: str) -> str:
    """A JSON pointer (RFC 6901) to ``parts`` in the spec."""
    return "".join("/" + p.replace("~", "~0").replace("/", "~1") for p in parts)


@dataclass(frozen=True)
class Operation:
    method: str  # lower-case, as in the spec
    template: str  # the spec's path, e.g. "/api/v1/instances/{id}"
    regex: re.Pattern[str]
    spec: dict[str, Any]

    @property
    def op_id(self) -> str:
        return str(self.spec.get("operationId", f"{self.method} {self.template}"))


class SpecValidator:
    """Request/response validation against the OpenAPI 3.1 document (JSON Schema 2020-12 inside)."""

    URI = "urn:cloudmodal-test:lambda-openapi-1.8.3"

    def __init__(self, spec: dict[str, Any]) -> None:
        from jsonschema import Draft202012Validator
        from referencing import Registry, Resource
        from referencing.jsonschema import DRAFT202012

        self.spec = spec
        # The whole document is one resource, so ``#/components/schemas/X`` refs resolve inside it.
        self._registry: Any = Registry().with_resource(
            self.URI, Resource.from_contents(spec, default_specification=DRAFT202012)
        )
        self._validator_cls: Any = Draft202012Validator
        self._validators: dict[str, Any] = {}
        self.operations: list[Operation] = []
        for template, item in spec["paths"].items():
            pattern = "^" + re.sub(r"\\\{[^}]+\\\}", "([^/]+)", re.escape(template)) + "$"
            for method, op in item.items():
                if isinstance(op, dict) and method in ("get", "post", "put", "patch", "delete"):
                    self.operations.append(Operation(method, template, re.compile(pattern), op))

    def match(self, method: str, path: str) -> tuple[Operation, list[str]] | None:
        for op in self.operations:
            if op.method == method.lower():
                m = op.regex.match(path)
                if m is not None:
                    return op, list(m.groups())
        return None

    def _errors(self, pointer: str, instance: Any) -> list[str]:
        v = self._validators.get(pointer)
        if v is None:
            v = self._validator_cls({"$ref": f"{self.URI}#{pointer}"}, registry=self._registry)
            self._validators[pointer] = v
        return [
            f"{'/'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}"
            for e in sorted(v.iter_errors(instance), key=lambda e: list(e.absolute_path))
        ]

    def request_errors(self, op: Operation, body: Any) -> list[str]:
        if "requestBody" not in op.spec:
            return [] if body is None else ["the operation takes no request body"]
        if body is None:
            return ["a request body is required"] if op.spec["requestBody"].get("required") else []
        ptr = _pointer(
            "paths", op.template, op.method, "requestBody", "content", "application/json", "schema"
        )
        errors = self._errors(ptr, body)
        # Stricter than the spec (which leaves additionalProperties open): a field the schema does not name
        # is most likely a client typo, so it counts too (SkyPilot's ``quantity`` is stripped beforehand).
        schema = op.spec["requestBody"]["content"]["application/json"]["schema"]
        if "$ref" in schema:
            schema = self.spec["components"]["schemas"][str(schema["$ref"]).rsplit("/", 1)[-1]]
        known = schema.get("properties")
        if isinstance(body, dict) and known is not None and "additionalProperties" not in schema:
            errors += [f"<root>: unknown field {k!r}" for k in sorted(set(body) - set(known))]
        return errors

    def response_errors(self, op: Operation, status: int, body: Any) -> list[str]:
        if str(status) not in op.spec.get("responses", {}):
            return [f"HTTP {status} is not a documented response"]
        ptr = _pointer(
            "paths", op.template, op.method, "responses", str(status), "content", "application/json"
        )
        return self._errors(ptr + "/schema", body)

    def error_statuses(self, op: Operation, code: str) -> list[int]:
        """The HTTP statuses at which ``op`` may answer the error ``code`` (from the spec's ``const`` codes)."""
        out = []
        for status, resp in op.spec.get("responses", {}).items():
            schema = resp.get("content", {}).get("application/json", {}).get("schema", {})
            err = schema.get("properties", {}).get("error")
            if err is not None and code in self._codes(err):
                out.append(int(status))
        return sorted(out)

    def error_schema(self, code: str) -> dict[str, Any] | None:
        """The first component schema of error ``code`` (for its default message and suggestion)."""
        for schema in self.spec["components"]["schemas"].values():
            if schema.get("properties", {}).get("code", {}).get("const") == code:
                return dict(schema)
        return None

    def _codes(self, node: Any) -> set[str]:
        if not isinstance(node, dict):
            return set()
        if "$ref" in node:
            name = str(node["$ref"]).rsplit("/", 1)[-1]
            node = self.spec["components"]["schemas"][name]
        codes: set[str] = set()
        const = node.get("properties", {}).get("code", {}).get("const")
        if const:
            codes.add(str(const))
        for sub in node.get("anyOf", []) + node.get("oneOf", []):
            codes |= self._codes(sub)
        return codes


@dataclass
class LoggedRequest:
    method: str
    path: str
    op_id: str | None
    body: Any
    content_type: str | None
    status: int = 0


@dataclass
class _Instance:
    data: dict[str, Any]
    reads: int = 0  # how many instance reads (list/get) have shown it
    term_reads: int = 0  # reads since it started terminating
    holds_capacity: bool = True


@dataclass
class _Fault:
    code: str | None  # None: rate limit (HTTP 429)
    status: int
    remaining: int
    message: str | None = None
    on_spec: bool = True


@dataclass
class _State:
    capacity: dict[tuple[str, str], int] = field(default_factory=dict)
    instances: dict[str, _Instance] = field(default_factory=dict)
    ssh_keys: list[dict[str, str]] = field(default_factory=list)
    firewall_rules: list[dict[str, Any]] = field(default_factory=list)
    faults: dict[str, list[_Fault]] = field(default_factory=dict)  # operationId -> queue


class _HttpError(Exception):
    def __init__(self, status: int, body: dict[str, Any], *, on_spec: bool = True) -> None:
        super().__init__(status)
        self.status = status
        self.body = body
        self.on_spec = on_spec  # False: a deliberately off-spec answer, not validated


class LambdaFake:
    """The fake API. ``url`` is what SkyPilot's ``lambda_utils.API_ENDPOINT`` should be set to."""

    def __init__(
        self,
        spec_path: str | Path,
        *,
        api_key: str = DEFAULT_API_KEY,
        instance_types: dict[str, tuple[str, str, int, int, int, int, int]] | None = None,
    ) -> None:
        with open(spec_path, encoding="utf-8") as f:
            self.validator = SpecValidator(json.load(f))
        self.api_key = api_key
        self.types = dict(instance_types or DEFAULT_TYPES)
        # booting -> active after this many reads of the instance (None: only on activate()).
        self.auto_activate_after: int | None = None
        self.requests: list[LoggedRequest] = []
        self.violations: list[str] = []
        self.tolerated: list[str] = []
        self._state = _State()
        self._lock = threading.RLock()
        self._server: Any = None
        self._thread: threading.Thread | None = None

    # --- lifecycle --------------------------------------------------------------------------------------

    def start(self) -> LambdaFake:
        from werkzeug.serving import WSGIRequestHandler, make_server

        class _Quiet(WSGIRequestHandler):
            def log_request(self, *args: Any, **kwargs: Any) -> None:  # no per-request stderr lines
                pass

        self._server = make_server("127.0.0.1", 0, self._wsgi, threaded=True, request_handler=_Quiet)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="lambda-fake", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> LambdaFake:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """The API base, ``http://127.0.0.1:PORT/api/v1``."""
        assert self._server is not None, "start() the fake first"
        return f"http://127.0.0.1:{self._server.server_port}{API_PREFIX}"

    def reset(self) -> None:
        """Forget instances, keys, capacity, faults and logs (between tests)."""
        with self._lock:
            self._state = _State()
            self.auto_activate_after = None
            self.requests.clear()
            self.violations.clear()
            self.tolerated.clear()

    # --- test controls ----------------------------------------------------------------------------------

    def set_capacity(self, instance_type: str, region: str, count: int) -> None:
        """How many more instances of ``instance_type`` ``region`` can take (0: none)."""
        if instance_type not in self.types:
            raise ValueError(f"the fake offers no instance type {instance_type!r}")
        if region not in REGION_DESCRIPTIONS:
            raise ValueError(f"the fake knows no region {region!r}")
        with self._lock:
            self._state.capacity[(instance_type, region)] = count

    def capacity(self, instance_type: str, region: str) -> int:
        with self._lock:
            return self._state.capacity.get((instance_type, region), 0)

    def inject_error(
        self,
        code: str,
        *,
        times: int = 1,
        operation: str = "launchInstance",
        message: str | None = None,
        status: int | None = None,
    ) -> int:
        """Answer the next ``times`` calls of ``operation`` (an operationId) with error ``code``.

        The status comes from the spec (the response whose error schema has that ``const`` code); a code the
        spec does not list for the operation needs an explicit ``status`` and is then sent unvalidated (a
        deliberate off-spec answer, e.g. ``global/unauthorized``). Returns the status used."""
        op = self._operation(operation)
        statuses = self.validator.error_statuses(op, code)
        on_spec = bool(statuses) and (status is None or status in statuses)
        if status is None:
            if not statuses:
                raise ValueError(
                    f"the spec lists no error {code!r} for {operation}: pass status= to force it"
                )
            status = statuses[0]
        with self._lock:
            self._state.faults.setdefault(op.op_id, []).append(
                _Fault(code, status, times, message, on_spec=on_spec)
            )
        return status

    def rate_limit(self, *, times: int = 1, operation: str = "launchInstance") -> None:
        """Answer the next ``times`` calls of ``operation`` with HTTP 429 (Lambda: 1 launch per 12 s)."""
        op = self._operation(operation)
        with self._lock:
            self._state.faults.setdefault(op.op_id, []).append(_Fault(None, 429, times))

    def activate(self, instance_id: str) -> None:
        """booting -> active now (gives the instance its IPs)."""
        with self._lock:
            self._set_status(self._state.instances[instance_id], "active")

    def preempt(self, instance_id: str) -> None:
        """Lambda reclaimed the instance: status ``preempted``; its capacity returns to the pool."""
        with self._lock:
            self._set_status(self._state.instances[instance_id], "preempted")

    def set_status(self, instance_id: str, status: str) -> None:
        """Any status of the spec's ``InstanceStatus`` (``unhealthy``...)."""
        with self._lock:
            self._set_status(self._state.instances[instance_id], status)

    def instances(self) -> list[dict[str, Any]]:
        """Every instance the fake still knows (a deep copy), including terminating ones."""
        with self._lock:
            return [copy.deepcopy(i.data) for i in self._state.instances.values()]

    def ssh_keys(self) -> list[dict[str, str]]:
        with self._lock:
            return [dict(k) for k in self._state.ssh_keys]

    def calls(self, op_id: str) -> list[LoggedRequest]:
        """Logged requests of one operation (``listInstanceTypes``, ``launchInstance``...)."""
        with self._lock:
            return [r for r in self.requests if r.op_id == op_id]

    # --- internals: state -------------------------------------------------------------------------------

    def _operation(self, op_id: str) -> Operation:
        for op in self.validator.operations:
            if op.op_id == op_id:
                return op
        raise ValueError(f"no operation {op_id!r} in the spec")

    def _region(self, name: str) -> dict[str, str]:
        return {"name": name, "description": REGION_DESCRIPTIONS.get(name, name)}

    def _type(self, name: str) -> dict[str, Any]:
        desc, gpu_desc, cents, vcpus, mem, disk, gpus = self.types[name]
        return {
            "name": name,
            "description": desc,
            "gpu_description": gpu_desc,
            "price_cents_per_hour": cents,
            "specs": {"vcpus": vcpus, "memory_gib": mem, "storage_gib": disk, "gpus": gpus},
        }

    def _release(self, inst: _Instance) -> None:
        if inst.holds_capacity:
            inst.holds_capacity = False
            key = (inst.data["instance_type"]["name"], inst.data["region"]["name"])
            self._state.capacity[key] = self._state.capacity.get(key, 0) + 1

    def _set_status(self, inst: _Instance, status: str) -> None:
        inst.data["status"] = status
        running = status == "active"
        if running and "ip" not in inst.data:
            n = len(self._state.instances)
            inst.data["ip"] = f"198.51.100.{n % 250 + 2}"
            inst.data["private_ip"] = f"10.0.2.{n % 250 + 2}"
            inst.data["hostname"] = inst.data["ip"]
        for action in ("migrate", "rebuild", "restart", "cold_reboot"):
            inst.data["actions"][action] = (
                {"available": True}
                if running
                else {"available": False, "reason_code": "vm-has-not-launched"}
                if status == "booting"
                else {"available": False, "reason_code": "vm-is-terminating"}
                if status in ("terminating", "terminated")
                else {"available": False}
            )
        inst.data["actions"]["terminate"] = (
            {"available": False, "reason_code": "vm-is-terminating"}
            if status in ("terminating", "terminated")
            else {"available": True}
        )
        if status in ("terminating", "terminated", "preempted"):
            self._release(inst)

    def _read(self, inst: _Instance) -> None:
        """One read of an instance: the status progressions that are driven by polling happen here."""
        inst.reads += 1
        status = inst.data["status"]
        if status == "booting" and self.auto_activate_after is not None:
            if inst.reads > self.auto_activate_after:
                self._set_status(inst, "active")
        elif status == "terminating":
            inst.term_reads += 1

    def _visible(self) -> list[_Instance]:
        """Instances a list shows: a terminating instance is shown once more, then it is gone."""
        for iid, inst in list(self._state.instances.items()):
            if inst.data["status"] == "terminating" and inst.term_reads >= 1:
                del self._state.instances[iid]
        return list(self._state.instances.values())

    # --- internals: HTTP --------------------------------------------------------------------------------

    def _authorized(self, header: str | None) -> bool:
        if not header:
            return False
        scheme, _, value = header.partition(" ")
        if scheme == "Bearer":
            return value == self.api_key
        if scheme == "Basic":
            if value == self.api_key:
                return True
            try:
                return base64.b64decode(value).decode() in (self.api_key + ":", self.api_key)
            except (ValueError, UnicodeDecodeError):
                return False
        return False

    def _error(self, op: Operation | None, code: str, status: int, message: str | None = None) -> _HttpError:
        schema = self.validator.error_schema(code) or {}
        props = schema.get("properties", {})
        err: dict[str, Any] = {
            "code": code,
            "message": message or props.get("message", {}).get("default") or code,
        }
        suggestion = props.get("suggestion", {}).get("default")
        if suggestion or "suggestion" in schema.get("required", []):
            err["suggestion"] = suggestion or "See the Lambda Cloud API documentation."
        return _HttpError(status, {"error": err})

    def _wsgi(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        from werkzeug.wrappers import Request, Response

        req = Request(environ)
        status, body = self._handle(req)
        resp = Response(json.dumps(body), status=status, mimetype="application/json")
        return resp(environ, start_response)

    def _handle(self, req: Any) -> tuple[int, dict[str, Any]]:
        found = self.validator.match(req.method, req.path)
        raw = req.get_data()
        ctype = req.headers.get("Content-Type")
        with self._lock:
            entry = LoggedRequest(req.method, req.path, found[0].op_id if found else None, None, ctype)
            self.requests.append(entry)
            if found is None:
                self.violations.append(f"{req.method} {req.path}: no such operation in the spec")
                entry.status = 404
                return 404, {"error": {"code": "global/object-does-not-exist", "message": "Not found."}}
            op, params = found
            on_spec = True
            try:
                status, body = self._dispatch(req, op, params, raw, ctype, entry)
            except _HttpError as e:
                status, body, on_spec = e.status, e.body, e.on_spec
            entry.status = status
            if status == 429:
                self.tolerated.append(f"{op.op_id}: HTTP 429 (rate limit, outside the OpenAPI responses)")
            elif not on_spec:
                self.tolerated.append(f"{op.op_id}: injected off-spec answer {status}")
            else:
                for err in self.validator.response_errors(op, status, body):
                    self.violations.append(f"response {op.op_id} {status}: {err}")
            return status, body

    def _dispatch(
        self,
        req: Any,
        op: Operation,
        params: list[str],
        raw: bytes,
        ctype: str | None,
        entry: LoggedRequest,
    ) -> tuple[int, dict[str, Any]]:
        if not self._authorized(req.headers.get("Authorization")):
            raise self._error(op, "global/invalid-api-key", 401)
        # The request body: JSON, with or without the header SkyPilot leaves out.
        body: Any = None
        if raw:
            if ctype is None:
                self.tolerated.append(f"{op.op_id}: JSON body without Content-Type")
            elif not ctype.split(";")[0].strip() == "application/json":
                self.violations.append(f"request {op.op_id}: Content-Type {ctype!r} is not application/json")
            try:
                body = json.loads(raw)
            except ValueError:
                self.violations.append(f"request {op.op_id}: body is not JSON")
                raise self._error(op, "global/invalid-parameters", 400) from None
        entry.body = copy.deepcopy(body)
        checked = body
        if op.op_id == "launchInstance" and isinstance(body, dict):
            checked = dict(body)
            for name in TOLERATED_LAUNCH_FIELDS:
                if name in checked:
                    value = checked.pop(name)
                    self.tolerated.append(f"launchInstance: extra field {name}={value!r}")
                    if name == "quantity" and value != 1:
                        self.violations.append(f"request launchInstance: quantity={value!r} (only 1 works)")
        errors = self.validator.request_errors(op, checked)
        if errors:
            self.violations.extend(f"request {op.op_id}: {e}" for e in errors)
            if "requestBody" in op.spec and 400 in self._statuses(op):
                raise self._error(op, "global/invalid-parameters", 400, "; ".join(errors))
        # Injected faults for this operation.
        queue = self._state.faults.get(op.op_id) or []
        while queue and queue[0].remaining <= 0:
            queue.pop(0)
        if queue:
            fault = queue[0]
            fault.remaining -= 1
            if fault.code is None:
                return 429, {"error": {"code": "global/too-many-requests", "message": "Rate limit exceeded."}}
            err = self._error(op, fault.code, fault.status, fault.message)
            err.on_spec = fault.on_spec
            raise err
        handler = getattr(self, "_op_" + op.op_id, None)
        if handler is None:
            self.violations.append(f"{op.op_id}: the fake does not implement this operation")
            raise self._error(op, "global/invalid-parameters", 400, "not implemented by the fake")
        result: tuple[int, dict[str, Any]] = handler(checked, *params)
        return result

    @staticmethod
    def _statuses(op: Operation) -> set[int]:
        return {int(s) for s in op.spec.get("responses", {})}

    # --- operations (called under the lock) ---------------------------------------------------------------

    def _op_listInstanceTypes(self, body: Any) -> tuple[int, dict[str, Any]]:  # noqa: N802 - spec's name
        data = {}
        for name in sorted(self.types):
            regions = sorted(r for (t, r), n in self._state.capacity.items() if t == name and n > 0)
            data[name] = {
                "instance_type": self._type(name),
                "regions_with_capacity_available": [self._region(r) for r in regions],
            }
        return 200, {"data": data}

    def _op_listInstances(self, body: Any) -> tuple[int, dict[str, Any]]:  # noqa: N802
        shown = self._visible()
        for inst in shown:
            self._read(inst)
        return 200, {"data": [copy.deepcopy(i.data) for i in shown]}

    def _op_getInstance(self, body: Any, iid: str) -> tuple[int, dict[str, Any]]:  # noqa: N802
        self._visible()
        inst = self._state.instances.get(iid)
        if inst is None:
            raise self._error(None, "global/object-does-not-exist", 404, "Specified instance does not exist.")
        self._read(inst)
        return 200, {"data": copy.deepcopy(inst.data)}

    def _op_launchInstance(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:  # noqa: N802
        itype, region = body["instance_type_name"], body["region_name"]
        if itype not in self.types:
            raise self._error(None, "global/object-does-not-exist", 404, f"Instance type {itype} not found.")
        keys = body.get("ssh_key_names") or []
        if len(keys) != 1:
            raise self._error(
                None, "global/invalid-parameters", 400, "Exactly one SSH key must be specified."
            )
        if keys[0] not in {k["name"] for k in self._state.ssh_keys}:
            raise self._error(None, "global/object-does-not-exist", 404, f"SSH key {keys[0]} not found.")
        if self._state.capacity.get((itype, region), 0) <= 0:
            raise self._error(None, "instance-operations/launch/insufficient-capacity", 400)
        self._state.capacity[(itype, region)] -= 1
        iid = uuid.uuid4().hex
        data: dict[str, Any] = {
            "id": iid,
            "status": "booting",
            "ssh_key_names": list(keys),
            "file_system_names": list(body.get("file_system_names") or []),
            "region": self._region(region),
            "instance_type": self._type(itype),
            "actions": {},
        }
        if body.get("name") is not None:
            data["name"] = body["name"]
        inst = _Instance(data)
        self._state.instances[iid] = inst
        self._set_status(inst, "booting")
        return 200, {"data": {"instance_ids": [iid]}}

    def _op_terminateInstance(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:  # noqa: N802
        self._visible()
        ids = list(body["instance_ids"])
        missing = [i for i in ids if i not in self._state.instances]
        if missing:
            raise self._error(None, "global/object-does-not-exist", 404, "Specified instance does not exist.")
        out = []
        for iid in ids:
            inst = self._state.instances[iid]
            self._set_status(inst, "terminating")
            out.append(copy.deepcopy(inst.data))
        return 200, {"data": {"terminated_instances": out}}

    def _op_listSSHKeys(self, body: Any) -> tuple[int, dict[str, Any]]:  # noqa: N802
        return 200, {"data": [dict(k) for k in self._state.ssh_keys]}

    def _op_addSSHKey(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:  # noqa: N802
        if any(k["name"] == body["name"] for k in self._state.ssh_keys):
            raise self._error(None, "global/invalid-parameters", 400, "SSH key name already in use.")
        key = {"id": uuid.uuid4().hex, "name": body["name"]}
        generated = "public_key" not in body
        key["public_key"] = body.get("public_key") or f"ssh-ed25519 AAAAC3Nz{uuid.uuid4().hex} generated"
        self._state.ssh_keys.append(key)
        data: dict[str, Any] = dict(key)
        if generated:
            data["private_key"] = (
                "-----BEGIN OPENSSH PRIVATE KEY-----\nfake\n-----END OPENSSH PRIVATE KEY-----\n"
            )
        return 200, {"data": data}

    def _op_firewallRulesList(self, body: Any) -> tuple[int, dict[str, Any]]:  # noqa: N802
        return 200, {"data": copy.deepcopy(self._state.firewall_rules)}

    def _op_firewallRulesSet(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:  # noqa: N802
        self._state.firewall_rules = copy.deepcopy(body["data"])
        return 200, {"data": copy.deepcopy(self._state.firewall_rules)}
