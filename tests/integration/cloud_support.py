"""What the clouds' end-to-end tests share: a small catalog, moto and Lambda's fake, a stand-in node over SSH,
a fake instance-metadata service, and a control plane with real cloud providers.

Nothing here mocks cloudmodal: the control plane, its reconciler, the drivers, SkyPilot's provisioner, boto3,
``ssh`` and the worker are the real ones; the clouds are fakes on 127.0.0.1 (moto in a subprocess, Lambda's
spec-checked fake) and a node is a real ``sshd`` on this machine that every node address resolves to through
an ``ssh_config`` (as a user's would for a bastion).
"""

from __future__ import annotations

import getpass
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from catalog_fixtures import AWS_HEADER, LAMBDA_HEADER, aws_info
from support import client_env

from cloudmodal.providers.cloud import CloudProvider
from cloudmodal.providers.local import LocalProvider
from cloudmodal.server.app import ServerHandle, default_settings

REGION = "us-east-1"
AMI = "ami-0c0ffee0c0ffee000"
# Tier 1 (H100:8): AWS in two zones, then Lambda (dearer); tier 2 (A100-80GB:8): AWS.
CATALOG: dict[str, list[str]] = {
    "aws/vms.csv": [
        AWS_HEADER,
        f"p5.48xlarge,H100,8.0,192.0,2048.0,{aws_info('H100', 8, 81920)},55.04,12.5,{REGION},use1-az1,x86_64",
        f"p5.48xlarge,H100,8.0,192.0,2048.0,{aws_info('H100', 8, 81920)},55.10,12.6,{REGION},use1-az2,x86_64",
        f"p4de.24xlarge,A100,8.0,96.0,1152.0,{aws_info('A100', 8, 81920)},27.45,9.3,{REGION},use1-az1,x86_64",
    ],
    "aws/images.csv": [
        "Tag,Region,OS,OSVersion,ImageId,CreationDate,BaseImageId",
        f"skypilot:custom-gpu-ubuntu,{REGION},ubuntu,22.04,{AMI},20250910,",
    ],
    "lambda/vms.csv": [
        LAMBDA_HEADER,
        f"gpu_8x_h100_sxm5,H100,8.0,208.0,1800.0,60.00,{REGION},{aws_info('H100', 8, 81920)},",
    ],
}


def write_catalog(directory: Path) -> Path:
    for rel, lines in CATALOG.items():
        path = directory / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(lines) + "\n")
    return directory


def wait_for(pred: Callable[[], Any], timeout: float = 60.0, what: str = "condition") -> Any:
    """Poll ``pred`` until it is true; fail naming ``what`` after ``timeout`` (a hang, never a timing claim)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def node_ssh_config(directory: Path, port: int) -> Path:
    """Every node address resolves to the stand-in sshd on 127.0.0.1:``port``."""
    path = directory / "ssh_config"
    path.write_text(f"Host *\n    HostName 127.0.0.1\n    Port {port}\n")
    return path


def moto_instances(fake: Any, region: str = REGION, *, live: bool = True) -> list[dict[str, Any]]:
    resp = fake.client("ec2", region).describe_instances()
    out = [i for r in resp["Reservations"] for i in r["Instances"]]
    if live:
        out = [i for i in out if i["State"]["Name"] not in ("terminated", "shutting-down")]
    return out


def tags_of(instance: dict[str, Any]) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in instance.get("Tags", [])}


class FakeImds:
    """AWS's instance metadata service (IMDSv2) for spot notices: ``notice(at)`` arms an interruption notice
    for the sessions whose token was issued before it (the node that is being reclaimed), not for nodes that
    start after it (its replacement, bootstrapped on the same stand-in machine)."""

    def __init__(self) -> None:
        self.notice_at: float | None = None
        self.armed_at: float | None = None
        self._tokens: dict[str, float] = {}
        self._lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a: Any) -> None:
                pass

            def do_PUT(self) -> None:  # noqa: N802
                if self.path != "/latest/api/token":
                    return self._send(404, b"")
                token = os.urandom(8).hex()
                with fake._lock:
                    fake._tokens[token] = time.time()
                self._send(200, token.encode())

            def do_GET(self) -> None:  # noqa: N802
                token = self.headers.get("X-aws-ec2-metadata-token", "")
                with fake._lock:
                    issued = fake._tokens.get(token)
                    armed, at = fake.armed_at, fake.notice_at
                if issued is None:
                    return self._send(401, b"")
                if self.path != "/latest/meta-data/spot/instance-action":
                    return self._send(404, b"")
                if armed is None or at is None or issued > armed:
                    return self._send(404, b"")
                when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))
                self._send(200, json.dumps({"action": "terminate", "time": when}).encode())

            def _send(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def notice(self, at: float) -> None:
        with self._lock:
            self.armed_at, self.notice_at = time.time(), at

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def cloud_provider(
    driver: Any,
    state_dir: Path,
    node: Any,
    ssh_config: Path,
    *,
    node_env: dict[str, str] | None = None,
) -> CloudProvider:
    """A cloud provider whose nodes are the stand-in ``node``: this machine's Python (it has cloudmodal's
    dependencies, so nothing is downloaded) and this user's login. The stand-in authorizes the control
    plane's key, as a real node does from what the driver gave the cloud (AWS user data, Lambda's SSH keys)."""
    provider = CloudProvider(
        driver,
        state_dir=state_dir,
        ssh_config=str(ssh_config),
        node_python=sys.executable,
        ssh_user=getpass.getuser(),
        node_env=node_env,
        bootstrap_options={"system_site_packages": True, "install_dependencies": False},
        list_interval_s=0.5,
    )
    public_key = provider.ssh_key()[1]
    authorized = node.key_path.parent / "authorized_keys"
    if public_key not in authorized.read_text():
        with authorized.open("a") as f:
            f.write(public_key + "\n")
    return provider


@contextmanager
def cloud_plane(tmp_path: Path, clouds: dict[str, Any]) -> Iterator[ServerHandle]:
    """A control plane with no local GPUs and ``clouds`` (name -> CloudProvider), its client pointed at it."""
    providers: dict[str, Any] = {"local": LocalProvider(state_dir=tmp_path / "local", gpus=[])}
    providers.update(clouds)
    settings = default_settings(
        tmp_path,
        database_url=f"sqlite:///{tmp_path / 'cp.db'}",
        lease_s=10.0,
        heartbeat_s=0.5,
        worker_timeout_s=30.0,
        reconcile_interval_s=0.2,
    )
    handle = ServerHandle(settings, providers=providers).start_in_thread()
    try:
        with client_env(handle.url, handle.token):
            yield handle
    finally:
        handle.stop()


def events(handle: ServerHandle, app_id: str, *kinds: str) -> list[dict[str, Any]]:
    return [e for e in handle.cp.activity.events(app_id, limit=10_000) if not kinds or e["kind"] in kinds]


@contextmanager
def cloud_sandbox(base: Path) -> Iterator[dict[str, Any]]:
    """For a test module: HOME for SkyPilot (it writes ~/.sky), the catalog and the stand-in node under ``base``."""
    import pytest

    from tests.fakes.sshd import stand_in_node

    with pytest.MonkeyPatch.context() as mp, stand_in_node(base / "node") as node:
        mp.setenv("HOME", str(base / "home"))
        catalog = write_catalog(base / "catalog")
        mp.setenv("CLOUDMODAL_CATALOG_DIR", str(catalog))
        yield {"catalog": catalog, "ssh_config": node_ssh_config(base, node.port), "base": base, "node": node}


@contextmanager
def moto_ec2() -> Iterator[Any]:
    """moto's EC2 server for ``REGION``, with this process's AWS environment pointing at it (and nothing of the
    developer's profile)."""
    import pytest

    from tests.fakes.moto_ec2 import MotoEc2

    with MotoEc2.start(regions=[REGION]) as fake, pytest.MonkeyPatch.context() as mp:
        for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE"):
            mp.delenv(key, raising=False)
        for key, value in fake.env().items():
            mp.setenv(key, value)
        yield fake
