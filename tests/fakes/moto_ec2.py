"""A fake AWS (EC2, IAM, STS) for tests: moto's server in a subprocess, with errors injected on the wire.

moto's backends are not thread-safe and live in module globals, so the server runs in its own process,
started as ``python tests/fakes/moto_ec2.py`` (or ``python -m tests.fakes.moto_ec2``): it binds 127.0.0.1 on
a free port, prints ``PORT <n>`` and serves until its stdin closes (so it never outlives the test process).

Around moto's own WSGI app sits a small middleware that

- answers EC2's real error shape (``<Response><Errors><Error><Code>…``; IAM/STS: ``<ErrorResponse>…``) with a
  chosen HTTP status for requests matching an injected fault (Action, optionally region and availability
  zone, the zone read from ``Placement.AvailabilityZone`` or from the subnet a request names), so botocore's
  real error parsing and retry logic run;
- logs every API request (service, Action, region, zone, status), so a test can count what reached the wire
  (e.g. that botocore did not retry a 500);
- can hold every API request for a set time before handling it (:meth:`MotoEc2.set_latency`), a stand-in for
  the 0.1-0.3 s an EC2 API call takes on the real wire: the server is threaded, so delayed requests overlap
  as they would against EC2;
- offers control endpoints under ``/_cloudmodal/`` (faults, request log, latency, spot reclaim).

The test side is :class:`MotoEc2` (``MotoEc2.start()`` as a context manager). Spot reclaim touches moto's
private model objects (``Instance.state_reason``): pinned to moto 5.2.x.
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import parse_qs

CONTROL = "/_cloudmodal"
# HTTP status EC2/STS answer for an error code when a test does not choose one (EC2's capacity errors are
# server errors: botocore treats them as retryable unless told otherwise).
DEFAULT_STATUS: dict[str, int] = {
    "InsufficientInstanceCapacity": 500,
    "InsufficientHostCapacity": 500,
    "InsufficientCapacity": 500,
    "InternalError": 500,
    "Unavailable": 503,
    "AuthFailure": 401,
    "UnauthorizedOperation": 403,
    "InvalidClientTokenId": 403,
    "AccessDenied": 403,
}
FAKE_ACCESS_KEY = "AKIAFAKEMOTOTESTKEY0"  # moto accepts any key; this one maps to its default account
FAKE_SECRET_KEY = "fake-secret-for-moto"
DEFAULT_REGION = "us-east-1"
SKYPILOT_IAM_NAME = "skypilot-v1"
SPOT_TERMINATION = "Server.SpotInstanceTermination"


# --- server side (runs in the subprocess) -----------------------------------------------------------------


def _scope(environ: dict[str, Any]) -> tuple[str | None, str | None]:
    """(service, region) from the SigV4 ``Authorization`` header's credential scope."""
    auth = environ.get("HTTP_AUTHORIZATION", "")
    marker = "Credential="
    i = auth.find(marker)
    if i < 0:
        return None, None
    parts = auth[i + len(marker) :].split(",", 1)[0].split("/")
    # AKID/date/region/service/aws4_request
    if len(parts) >= 5:
        return parts[3], parts[2]
    return None, None


def _error_body(service: str | None, code: str, message: str) -> bytes:
    """The cloud's real error document: EC2's own shape, or the query-protocol one of IAM/STS."""
    rid = str(uuid.uuid4())
    if service == "ec2":
        text = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Response><Errors><Error><Code>{code}</Code><Message>{_xml(message)}</Message></Error>"
            f"</Errors><RequestID>{rid}</RequestID></Response>"
        )
    else:
        text = (
            "<ErrorResponse><Error><Type>Sender</Type>"
            f"<Code>{code}</Code><Message>{_xml(message)}</Message></Error>"
            f"<RequestId>{rid}</RequestId></ErrorResponse>"
        )
    return text.encode()


def _xml(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


class FaultApp:
    """WSGI middleware around moto's app: fault injection, a request log, and control endpoints."""

    def __init__(self, inner: Callable[..., Any]) -> None:
        self.inner = inner
        self.lock = threading.Lock()
        self.faults: list[dict[str, Any]] = []
        self.log: list[dict[str, Any]] = []
        self.latency = 0.0  # seconds every API request waits before it is handled (control calls do not)

    # Zone of a request: an explicit placement, else the zone of the (first) subnet it names.
    def _zone(self, params: dict[str, str], region: str | None) -> tuple[str | None, str | None]:
        zone = params.get("Placement.AvailabilityZone")
        if zone:
            return zone, None
        subnet = params.get("SubnetId") or params.get("NetworkInterface.1.SubnetId")
        if not subnet or not region:
            return None, None
        try:
            from moto.core import DEFAULT_ACCOUNT_ID
            from moto.ec2.models import ec2_backends

            s = ec2_backends[DEFAULT_ACCOUNT_ID][region].get_subnet(subnet)
            return str(s.availability_zone), str(s.availability_zone_id)
        except Exception:  # an unknown subnet: moto answers the request itself
            return None, None

    def _match(
        self, service: str | None, action: str | None, region: str | None, zones: tuple[str | None, ...]
    ) -> dict[str, Any] | None:
        with self.lock:
            for f in self.faults:
                if f["action"] != action:
                    continue
                if f.get("service") and f["service"] != service:
                    continue
                if f.get("region") and f["region"] != region:
                    continue
                if f.get("zone") and f["zone"] not in zones:
                    continue
                if f.get("count") is not None:
                    f["count"] -= 1
                    if f["count"] <= 0:
                        self.faults.remove(f)
                return dict(f)
        return None

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path.startswith(CONTROL + "/"):
            return self._control(environ, start_response, path[len(CONTROL) + 1 :])
        body = b""
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            length = 0
        if length:
            body = environ["wsgi.input"].read(length)
            import io

            environ["wsgi.input"] = io.BytesIO(body)  # moto reads it again
        params = {k: v[0] for k, v in parse_qs(body.decode("utf-8", "replace")).items()}
        params.update({k: v[0] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()})
        action = params.get("Action")
        service, region = _scope(environ)
        if action is None:
            return self.inner(environ, start_response)  # moto-api and non-query requests
        with self.lock:
            latency = self.latency
        if latency > 0:
            time.sleep(latency)  # this request's thread only: concurrent requests wait side by side
        zone, zone_id = self._zone(params, region)
        entry: dict[str, Any] = {
            "service": service,
            "action": action,
            "region": region,
            "zone": zone,
            "zone_id": zone_id,
            "at": time.time(),
        }
        fault = self._match(service, action, region, (zone, zone_id))
        if fault is not None:
            status = int(fault["status"])
            entry.update(status=status, fault=fault["code"])
            with self.lock:
                self.log.append(entry)
            data = _error_body(service, fault["code"], fault["message"])
            start_response(
                f"{status} Injected",
                [("Content-Type", "text/xml"), ("Content-Length", str(len(data)))],
            )
            return [data]

        def recording_start(status: str, headers: Any, exc_info: Any = None) -> Any:
            entry["status"] = int(status.split()[0])
            return start_response(status, headers, exc_info)

        entry["fault"] = None
        with self.lock:
            self.log.append(entry)
        return self.inner(environ, recording_start)

    def _control(
        self, environ: dict[str, Any], start_response: Callable[..., Any], what: str
    ) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            length = 0
        payload = json.loads(environ["wsgi.input"].read(length) or b"{}") if length else {}
        status = "200 OK"
        out: dict[str, Any] = {}
        try:
            with self.lock:
                if what == "faults" and method == "POST":
                    self.faults.append(payload)
                elif what == "faults" and method == "DELETE":
                    self.faults.clear()
                elif what == "faults":
                    out = {"faults": list(self.faults)}
                elif what == "requests" and method == "DELETE":
                    self.log.clear()
                elif what == "requests":
                    out = {"requests": list(self.log)}
                elif what == "latency" and method == "POST":
                    self.latency = max(0.0, float(payload["seconds"]))
                elif what == "latency":
                    out = {"seconds": self.latency}
                elif what == "reclaim" and method == "POST":
                    out = {"region": _reclaim(payload["instance_id"], payload.get("region"))}
                else:
                    status, out = "404 Not Found", {"error": f"no control endpoint {method} {what}"}
        except Exception as e:  # reported to the test, which raises it
            status, out = "400 Bad Request", {"error": f"{type(e).__name__}: {e}"}
        data = json.dumps(out).encode()
        start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(data)))])
        return [data]


def _reclaim(instance_id: str, region: str | None) -> str:
    """Terminate an instance as EC2 does when it takes a spot instance back (private moto internals)."""
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.ec2.models import ec2_backends
    from moto.ec2.models.instances import StateReason

    backends = ec2_backends[DEFAULT_ACCOUNT_ID]
    regions = [region] if region else list(backends.keys())
    for r in regions:
        try:
            inst = backends[r].get_instance(instance_id)
        except Exception:
            continue
        inst.terminate()
        inst.state_reason = StateReason(f"{SPOT_TERMINATION}: Spot instance termination", SPOT_TERMINATION)
        inst._reason = "Spot instance termination"
        return r
    raise KeyError(f"instance {instance_id} not found in {regions}")


def serve(host: str = "127.0.0.1", port: int = 0) -> None:
    """Run the server; print ``PORT <n>``; stop when stdin closes."""
    from moto.moto_server.werkzeug_app import (
        DomainDispatcherApplication,
        MotoRequestHandler,
        create_backend_app,
    )
    from werkzeug.serving import make_server

    app = FaultApp(DomainDispatcherApplication(create_backend_app))
    server = make_server(host, port, app, threaded=True, request_handler=MotoRequestHandler)
    print(f"PORT {server.server_port}", flush=True)

    def watch_parent() -> None:
        sys.stdin.read()  # EOF: the test process is gone or done
        os._exit(0)

    threading.Thread(target=watch_parent, daemon=True).start()
    server.serve_forever()


# --- test side --------------------------------------------------------------------------------------------


class MotoEc2:
    """Handle on a running fake (``with MotoEc2.start() as aws: ...``)."""

    def __init__(self, proc: subprocess.Popen[str], port: int) -> None:
        self.proc = proc
        self.port = port
        self.endpoint = f"http://127.0.0.1:{port}"
        self.prepared_regions: tuple[str, ...] = ()
        self._clients: dict[tuple[str, str], Any] = {}

    @classmethod
    def start(cls, *, regions: Iterable[str] = (DEFAULT_REGION,), timeout: float = 30.0) -> MotoEc2:
        """Start the server subprocess and prepare ``regions`` for SkyPilot's provisioner."""
        env = dict(os.environ)
        env.update(
            MOTO_EC2_LOAD_DEFAULT_AMIS="false",
            MOTO_EC2_ENABLE_INSTANCE_TYPE_VALIDATION="true",
            PYTHONUNBUFFERED="1",
        )
        proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=env,
        )
        port = _read_port(proc, timeout)
        fake = cls(proc, port)
        try:
            fake.prepare(regions)
        except BaseException:
            fake.stop()
            raise
        return fake

    def env(self, region: str = DEFAULT_REGION) -> dict[str, str]:
        """Environment for boto3 and SkyPilot in the test process to talk to this fake only."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": FAKE_ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": FAKE_SECRET_KEY,
            "AWS_DEFAULT_REGION": region,
            "AWS_REGION": region,
            # never read a developer's ~/.aws, never probe the instance metadata service
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            "AWS_EC2_METADATA_DISABLED": "true",
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
            "MOTO_EC2_LOAD_DEFAULT_AMIS": "false",
            "MOTO_EC2_ENABLE_INSTANCE_TYPE_VALIDATION": "true",
            "SKYPILOT_DISABLE_USAGE_COLLECTION": "1",
        }

    def client(self, service: str, region: str = DEFAULT_REGION) -> Any:
        """A boto3 client for this fake (independent of the process environment; cached: building one
        loads the service's model, which costs a few hundred ms for EC2)."""
        got = self._clients.get((service, region))
        if got is None:
            got = self._clients[(service, region)] = self._new_client(service, region)
        return got

    def _new_client(self, service: str, region: str) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.session.Session(
            aws_access_key_id=FAKE_ACCESS_KEY,
            aws_secret_access_key=FAKE_SECRET_KEY,
            region_name=region,
        ).client(
            service,
            endpoint_url=self.endpoint,
            config=Config(retries={"total_max_attempts": 1}),
        )

    # -- state --------------------------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget everything (moto's state, faults, request log, latency), then prepare the same regions
        again."""
        self._call("POST", "/moto-api/reset")
        self.clear_faults()
        self.set_latency(0.0)
        self.prepare(self.prepared_regions)
        self.clear_requests()

    def clean(self) -> None:
        """Cheap isolation between tests: terminate every live instance, clear faults, latency and the
        request log. (Networks, security groups and IAM stay; use :meth:`reset` for a fresh account.)"""
        self.clear_faults()
        self.set_latency(0.0)
        for region in self.prepared_regions:
            ec2 = self.client("ec2", region)
            live = [
                i["InstanceId"]
                for r in ec2.describe_instances(
                    Filters=[
                        {
                            "Name": "instance-state-name",
                            "Values": ["pending", "running", "stopping", "stopped"],
                        }
                    ]
                )["Reservations"]
                for i in r["Instances"]
            ]
            if live:
                ec2.terminate_instances(InstanceIds=live)
        self.clear_requests()

    def prepare(self, regions: Iterable[str]) -> None:
        """What SkyPilot's provisioner needs in a fresh account: a public default VPC in each region (an
        internet gateway and a ``0.0.0.0/0`` route in the main route table) and the ``skypilot-v1`` role and
        instance profile (SkyPilot's own IAM set-up fails on moto and sleeps 15 s twice)."""
        from botocore.exceptions import ClientError

        regions = tuple(regions)
        for region in regions:
            ec2 = self.client("ec2", region)
            vpc = ec2.describe_vpcs(Filters=[{"Name": "isDefault", "Values": ["true"]}])["Vpcs"][0]["VpcId"]
            tables = ec2.describe_route_tables(
                Filters=[
                    {"Name": "vpc-id", "Values": [vpc]},
                    {"Name": "association.main", "Values": ["true"]},
                ]
            )["RouteTables"]
            if any(r.get("GatewayId", "").startswith("igw-") for t in tables for r in t.get("Routes", [])):
                continue
            igw = ec2.create_internet_gateway()["InternetGateway"]["InternetGatewayId"]
            ec2.attach_internet_gateway(InternetGatewayId=igw, VpcId=vpc)
            ec2.create_route(
                RouteTableId=tables[0]["RouteTableId"], DestinationCidrBlock="0.0.0.0/0", GatewayId=igw
            )
        iam = self.client("iam")
        trust = {
            "Version": "2012-10-17",
            "Statement": [
                {"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}
            ],
        }
        for call, kwargs in (
            (iam.create_role, {"RoleName": SKYPILOT_IAM_NAME, "AssumeRolePolicyDocument": json.dumps(trust)}),
            (iam.create_instance_profile, {"InstanceProfileName": SKYPILOT_IAM_NAME}),
            (
                iam.add_role_to_instance_profile,
                {"InstanceProfileName": SKYPILOT_IAM_NAME, "RoleName": SKYPILOT_IAM_NAME},
            ),
        ):
            try:
                call(**kwargs)
            except ClientError as e:
                if e.response["Error"]["Code"] not in ("EntityAlreadyExists", "LimitExceeded"):
                    raise
        self.prepared_regions = tuple(dict.fromkeys(self.prepared_regions + regions))

    # -- faults ---------------------------------------------------------------------------------------------

    def inject(
        self,
        action: str,
        code: str,
        *,
        status: int | None = None,
        count: int | None = None,
        zone: str | None = None,
        region: str | None = None,
        service: str | None = None,
        message: str | None = None,
    ) -> None:
        """Answer the next ``count`` (None: every) matching ``action`` requests with error ``code``.

        ``zone`` (a zone name such as ``us-east-1a`` or a zone id such as ``use1-az6``) limits the fault to
        requests placed in that zone; ``region`` and ``service`` (``ec2``, ``sts``, ``iam``) narrow it further.
        """
        self._call(
            "POST",
            f"{CONTROL}/faults",
            {
                "action": action,
                "code": code,
                "status": status if status is not None else DEFAULT_STATUS.get(code, 400),
                "count": count,
                "zone": zone,
                "region": region,
                "service": service,
                "message": message or f"Injected {code} (cloudmodal test fault).",
            },
        )

    def clear_faults(self) -> None:
        self._call("DELETE", f"{CONTROL}/faults")

    def set_latency(self, seconds: float) -> None:
        """Hold every API request ``seconds`` before handling it (0: none). Each request waits in its own
        server thread, so concurrent requests overlap; the request log's ``at`` is when the request is
        handled, after the wait. Control calls (faults, log, latency) are not delayed, nor are moto's own
        ``/moto-api`` calls. :meth:`reset` and :meth:`clean` set it back to 0."""
        self._call("POST", f"{CONTROL}/latency", {"seconds": seconds})

    def latency(self) -> float:
        """The per-request latency now in force, in seconds."""
        return float(self._call("GET", f"{CONTROL}/latency")["seconds"])

    def reclaim_spot(self, instance_id: str, region: str | None = None) -> str:
        """Terminate ``instance_id`` with state reason ``Server.SpotInstanceTermination``; its region."""
        return str(
            self._call("POST", f"{CONTROL}/reclaim", {"instance_id": instance_id, "region": region})["region"]
        )

    def requests(self, action: str | None = None) -> list[dict[str, Any]]:
        """Every API request the fake saw since the last reset (only ``action``'s when given)."""
        got = self._call("GET", f"{CONTROL}/requests")["requests"]
        return [r for r in got if action is None or r["action"] == action]

    def clear_requests(self) -> None:
        self._call("DELETE", f"{CONTROL}/requests")

    # -- lifetime -------------------------------------------------------------------------------------------

    def stop(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()  # the server exits on EOF
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def __enter__(self) -> MotoEc2:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _call(self, method: str, path: str, payload: dict[str, Any] | None = None) -> dict[str, Any]:
        # http.client, not urllib: no proxy settings can reroute a loopback call
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            body = json.dumps(payload).encode() if payload is not None else None
            headers = {"Content-Type": "application/json"} if body is not None else {}
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        if resp.status >= 300:
            raise RuntimeError(f"fake AWS {method} {path}: {resp.status} {data[:500]!r}")
        try:
            out = json.loads(data) if data else {}
        except ValueError:
            return {}
        return out if isinstance(out, dict) else {}


def _read_port(proc: subprocess.Popen[str], timeout: float) -> int:
    """The port the server printed, within ``timeout`` seconds."""
    assert proc.stdout is not None
    got: list[str] = []
    reader = threading.Thread(target=lambda: got.append(proc.stdout.readline() if proc.stdout else ""))
    reader.daemon = True
    reader.start()
    reader.join(timeout)
    line = got[0] if got else ""
    if not line.startswith("PORT "):
        proc.kill()
        proc.wait()
        raise RuntimeError(f"the moto fake did not start within {timeout}s (got {line!r})")
    return int(line.split()[1])


if __name__ == "__main__":
    serve()
