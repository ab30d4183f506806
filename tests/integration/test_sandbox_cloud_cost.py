"""A sandbox on a cloud node (the clouds' fakes, as test_sandbox_cloud's: moto, the stand-in node over real SSH,
bubblewrap on the node) gets its image set up by the node's bootstrap, and its node's time is in the cost ledger:
``cloudmodal cost --by function`` shows it as ``APP/sandbox`` at the $/h fixed at launch × the node's time (with
the cloud's billing minimum), and a sandbox on the control plane's machine costs nothing (the control)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cloud_support import moto_instances, wait_for
from test_sandbox_cloud import aws, aws_provider, clouds, moto  # noqa: F401 - the fixtures, re-used

import cloudmodal
from cloudmodal.client.session import current_session
from cloudmodal.pricing.billing import billed_seconds
from cloudmodal.sandbox import Sandbox
from cloudmodal.server.app import ServerHandle
from tests.fakes.sshd import sshd_missing

pytestmark = [
    pytest.mark.skipif(bool(sshd_missing()), reason=sshd_missing() or ""),
    pytest.mark.skipif(shutil.which("bwrap") is None, reason="needs bubblewrap (apt-get install bubblewrap)"),
]


def cli_cost(handle: ServerHandle, *args: str) -> dict[str, Any]:
    env = dict(os.environ, CLOUDMODAL_SERVER_URL=handle.url, CLOUDMODAL_TOKEN=handle.token)
    p = subprocess.run(
        [sys.executable, "-m", "cloudmodal.cli.main", "cost", *args, "--format", "json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    result: dict[str, Any] = json.loads(p.stdout)
    return result


def test_a_cloud_sandbox_has_its_image_and_is_in_the_cost_report(
    aws: Any,  # noqa: F811
    clouds: dict[str, Any],  # noqa: F811
    tmp_path: Path,
) -> None:
    from cloud_support import cloud_plane

    with cloud_plane(tmp_path, {"aws": aws_provider(clouds, tmp_path)}) as handle:
        app = cloudmodal.App.lookup("sandbox-cost", create_if_missing=True)
        local = Sandbox.create(
            "true", app=cloudmodal.App.lookup("sandbox-cost-local", create_if_missing=True)
        )
        local.wait()
        image = cloudmodal.Image.debian_slim().env({"IMAGE_VAR": "on-the-node"})
        sb = Sandbox.create("sh", "-c", 'echo "$IMAGE_VAR"', app=app, gpu="H100:8", image=image, timeout=300)
        # the image's env reaches the sandbox on the node (its bootstrap set the image up)
        assert sb.stdout.read() == "on-the-node\n"
        sb.wait()
        assert sb.returncode == 0
        wait_for(lambda: not moto_instances(aws), 60, "the sandbox's node to be deleted")
        t = current_session().transport
        billing = wait_for(
            lambda: (
                t.get(f"/v1/sandboxes/{sb.object_id}")["spec"].get("billing", {}).get("stopped_at")
                and t.get(f"/v1/sandboxes/{sb.object_id}")["spec"]["billing"]
            ),
            30,
            "the node's deletion in the sandbox's billing",
        )
        assert handle.cp.ledger is not None
        handle.cp.ledger.accrue()
        report = cli_cost(handle, "--by", "function")
        # accruing again adds nothing: the node's billing is closed (once)
        handle.cp.ledger.accrue()
        again = cli_cost(handle, "--by", "function")
    ran = billing["stopped_at"] - billing["launched_at"]
    expected = billing["price_per_hour"] * billed_seconds("aws", ran) / 3600.0
    groups = {g["key"]: g for g in report["groups"]}
    assert billing["price_per_hour"] > 0 and ran > 0
    assert abs(groups["sandbox-cost/sandbox"]["cost"] - expected) < 1e-6, (groups, expected)
    # the control: the sandbox on the control plane's machine is in no group
    assert not [k for k in groups if k.startswith("sandbox-cost-local")], groups
    assert {g["key"]: g["cost"] for g in again["groups"]} == {g["key"]: g["cost"] for g in report["groups"]}
