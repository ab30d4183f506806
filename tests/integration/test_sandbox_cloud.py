"""Sandboxes on cloud nodes, end to end on the clouds' fakes: ``Sandbox.create(gpu=...)`` places the sandbox as a
function's GPU workers are, the control plane launches a node through the real AWS driver (moto), bootstraps it
over real SSH (the stand-in node: this machine's sshd) with the sandbox host attached to the SSH session, the
host dials back through the reverse tunnel and runs the command under bubblewrap on the node; stdio goes
through the control plane; when the sandbox ends its node is deleted.

Also ``Image.add_local_python_source`` on a cloud node: the package's files are shipped with the bootstrap.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cloud_support import (
    REGION,
    cloud_plane,
    cloud_provider,
    cloud_sandbox,
    events,
    moto_ec2,
    moto_instances,
    tags_of,
    wait_for,
)

import cloudmodal
from cloudmodal.client.session import run_app
from cloudmodal.providers.nodes import TAG_WORKER
from cloudmodal.sandbox import Sandbox
from tests.fakes.sshd import sshd_missing

pytestmark = [
    pytest.mark.skipif(bool(sshd_missing()), reason=sshd_missing() or ""),
    pytest.mark.skipif(shutil.which("bwrap") is None, reason="needs bubblewrap (apt-get install bubblewrap)"),
]


@pytest.fixture(scope="module")
def clouds(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """HOME for SkyPilot, the catalog and the stand-in node, for the module (as test_clouds_e2e's)."""
    base = tmp_path_factory.mktemp("sbclouds")
    with cloud_sandbox(base) as env:
        yield env


@pytest.fixture(scope="module")
def moto(clouds: dict[str, Any]) -> Iterator[Any]:
    with moto_ec2() as fake:
        yield fake


@pytest.fixture
def aws(moto: Any) -> Any:
    moto.clean()
    return moto


def aws_provider(clouds: dict[str, Any], tmp_path: Path) -> Any:
    from cloudmodal.providers.aws import AwsNodes

    driver = AwsNodes(regions=[REGION], catalog_dir=str(clouds["catalog"]))
    return cloud_provider(driver, tmp_path / "aws", clouds["node"], clouds["ssh_config"])


def host_processes(home: Path) -> list[int]:
    """The sandbox hosts running on the stand-in node (their interpreter lives under the node's home)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if (
            argv[0].decode(errors="replace").startswith(str(home))
            and b"cloudmodal.worker.sandbox_host" in argv
        ):
            found.append(int(entry.name))
    return found


def test_a_sandbox_with_a_gpu_runs_on_a_cloud_node_and_its_node_goes_with_it(
    aws: Any, clouds: dict[str, Any], tmp_path: Path
) -> None:
    node = clouds["node"]
    outside = tmp_path / "outside.txt"  # a file of the node's machine, outside the sandbox's image
    outside.write_text("not for sandboxes\n")
    with cloud_plane(tmp_path, {"aws": aws_provider(clouds, tmp_path)}) as handle:
        app = cloudmodal.App.lookup("sandbox-cloud", create_if_missing=True)
        sb = Sandbox.create(app=app, gpu="H100:8", timeout=300, workdir="/box")
        sid = sb.object_id
        # exec with stdin and stdout: the host on the node reads stdin and streams stdout back
        p = sb.exec("python3", "-c", "import sys; print(sys.stdin.read()[::-1]); sys.exit(3)")
        p.stdin.write(b"olleh")
        p.stdin.write_eof()
        p.stdin.drain()
        assert p.stdout.read().strip() == "hello"
        assert p.wait() == 3
        # the node exists, tagged with the sandbox, and the host on it holds its token only in memory
        (inst,) = moto_instances(aws)
        assert tags_of(inst)[TAG_WORKER] == sid
        (host_pid,) = wait_for(lambda: host_processes(node.home), 30, "the sandbox host on the node")
        host_env = Path(f"/proc/{host_pid}/environ").read_bytes()
        assert b"CLOUDMODAL_TOKEN" not in host_env
        # isolation on the node: a file outside the image is not there (the same read outside works)
        assert outside.read_text() == "not for sandboxes\n"  # negative control: readable on the machine
        r = sb.exec("cat", str(outside))
        assert r.wait() != 0 and "No such file" in r.stderr.read()
        r = sb.exec("cat", str(node.home / ".cloudmodal" / "logs" / f"worker-{sid.replace('-', '')}.log"))
        assert r.wait() != 0
        env = sb.exec("env")
        assert env.wait() == 0
        out = env.stdout.read()
        assert "CLOUDMODAL" not in out and "HOME=/box" in out, out
        # the sandbox ends: its node is deleted and no host is left on it
        sb.terminate()
        sb.wait(raise_on_termination=False)
        assert sb.returncode == 137
        wait_for(lambda: not moto_instances(aws), 60, "the sandbox's node to be deleted")
        wait_for(lambda: not host_processes(node.home), 30, "the sandbox host on the node to exit")
        launched = events(handle, app.app_id, "sandbox.node_launched")
    assert launched and sid in launched[0]["message"] and "p5.48xlarge" in launched[0]["message"]


def test_a_sandbox_without_a_gpu_stays_on_this_machine(
    aws: Any, clouds: dict[str, Any], tmp_path: Path
) -> None:
    """The negative control of placement: a CPU sandbox runs locally; no node is launched."""
    with cloud_plane(tmp_path, {"aws": aws_provider(clouds, tmp_path)}):
        app = cloudmodal.App.lookup("sandbox-local", create_if_missing=True)
        sb = Sandbox.create("echo", "here", app=app, timeout=60)
        assert sb.stdout.read() == "here\n"
        sb.wait()
        assert sb.returncode == 0
        assert not [i for i in moto_instances(aws, live=False) if tags_of(i).get(TAG_WORKER) == sb.object_id]


def test_a_sandbox_whose_command_exits_ends_and_deletes_its_node(
    aws: Any, clouds: dict[str, Any], tmp_path: Path
) -> None:
    with cloud_plane(tmp_path, {"aws": aws_provider(clouds, tmp_path)}):
        app = cloudmodal.App.lookup("sandbox-exit", create_if_missing=True)
        sb = Sandbox.create("sh", "-c", "read x; echo got $x; exit 7", app=app, gpu="H100:8", timeout=120)
        sb.stdin.write(b"it\n")
        sb.stdin.drain()
        assert sb.stdout.read() == "got it\n"
        sb.wait(raise_on_termination=False)
        assert sb.returncode == 7
        wait_for(lambda: not moto_instances(aws), 60, "the sandbox's node to be deleted")


# -- add_local_python_source on a cloud node ----------------------------------------------------------------


@pytest.fixture
def local_pkg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A package ``cmsrc_pkg.sub`` in a directory of its own on the client's Python path (not the app's)."""
    root = tmp_path / "pkgs"
    (root / "cmsrc_pkg" / "sub").mkdir(parents=True)
    (root / "cmsrc_pkg" / "__init__.py").write_text("")
    (root / "cmsrc_pkg" / "sub" / "__init__.py").write_text("from .values import VALUE\n")
    (root / "cmsrc_pkg" / "sub" / "values.py").write_text("VALUE = 'shipped'\n")
    monkeypatch.syspath_prepend(str(root))
    return root


def test_add_local_python_source_ships_the_package_to_the_node(
    aws: Any, clouds: dict[str, Any], tmp_path: Path, local_pkg: Path
) -> None:
    import cloud_src_app

    assert str(local_pkg) not in os.environ.get("PYTHONPATH", "")
    with cloud_plane(tmp_path, {"aws": aws_provider(clouds, tmp_path)}):
        with run_app(cloud_src_app.app, show_logs=False):
            got = cloud_src_app.with_source.remote()
            # negative control: the same import without add_local_python_source fails on the node
            missing = cloud_src_app.without_source.remote()
    assert got["value"] == "shipped"
    assert got["file"].startswith(str(clouds["node"].home / ".cloudmodal" / "src")), got
    assert missing.startswith("ModuleNotFoundError"), missing
    assert sys.modules.get("cmsrc_pkg") is None  # nothing imported the package here (found, not run)
