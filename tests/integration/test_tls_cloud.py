"""Cloud workers and a control plane over TLS, end to end on the clouds' fakes and the stand-in node.

- *Direct*: a team control plane serving TLS (a generated certificate) on an address the nodes reach
  (``node_server_url``, as ``CLOUDMODAL_NODE_SERVER_URL`` sets it): the node is bootstrapped over SSH with no
  reverse tunnel, and its worker dials ``https://`` that address itself, pinning the certificate with the
  fingerprint the bootstrap handed it (a ``KEY=BASE64`` line on the session's stdin); it runs inputs and
  serves a web endpoint through its web tunnel (``wss://``, pinned too).
- *A wrong pin*: the same, with the control plane handing the worker another fingerprint (what a worker would
  see if something between the node and the control plane presented its own certificate): the worker refuses
  the connection before sending anything, so it never registers, says why in its log on the node, and exits
  at once (it does not retry for its reconnect patience); no input is handed to it.
- *Through the tunnel*: a laptop's control plane over TLS (no ``node_server_url``) still reaches its nodes
  through the reverse SSH tunnel, over TLS with the pin: the control for the direct path's "no tunnel".
- *The web tunnel's dial loop* stops for good, with one line, on a certificate it refuses; it keeps dialling
  after any other failure (the control).

Real control plane, drivers, ssh, sshd and workers; moto (AWS) on 127.0.0.1 (see ``cloud_support``).
"""

from __future__ import annotations

import dataclasses
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import tls_cloud_app
from cloud_support import (
    REGION,
    cloud_provider,
    cloud_sandbox,
    moto_ec2,
    wait_for,
)
from sqlalchemy import select
from support import client_env

from cloudmodal import tls
from cloudmodal.client.session import run_app
from cloudmodal.providers.local import LocalProvider
from cloudmodal.providers.nodes import worker_key
from cloudmodal.server import models
from cloudmodal.server.app import ServerHandle, default_settings
from tests.fakes.sshd import sshd_missing

pytestmark = pytest.mark.skipif(bool(sshd_missing()), reason=sshd_missing() or "")

RECONNECT_S = 600.0  # the workers' patience with an unreachable control plane: far beyond any wait here


# -- fixtures (as test_clouds_e2e's) -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def clouds(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """HOME for SkyPilot, the catalog and the stand-in node, for the module."""
    base = tmp_path_factory.mktemp("tlsclouds")
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


def non_loopback_address() -> str | None:
    """An IPv4 address of this machine that is not loopback: where a team's control plane listens for its
    nodes (None on a machine with none)."""
    for probe in ("10.255.255.255", "192.168.255.255", "8.8.8.8"):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            s.connect((probe, 9))  # UDP: no packet is sent, this only picks the outgoing interface
            addr = str(s.getsockname()[0])
        except OSError:
            continue
        finally:
            s.close()
        if not addr.startswith("127.") and addr != "0.0.0.0":
            return addr
    return None


@contextmanager
def tls_cloud_plane(
    tmp_path: Path,
    clouds: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
    *,
    direct: bool,
    handed_pin: str | None = None,
) -> Iterator[tuple[ServerHandle, Any]]:
    """A control plane serving TLS with a generated certificate, its one GPU cloud AWS (moto) whose nodes are
    the stand-in; this process's client pins the certificate. ``direct``: it listens on this machine's
    non-loopback address (127.0.0.1 where there is none: the node is this machine) and the nodes dial it there
    (``node_server_url``); else they reach it through the reverse tunnel. ``handed_pin``: the fingerprint the
    control plane hands its workers instead of its certificate's."""
    from cloudmodal.providers.aws import AwsNodes

    host = (non_loopback_address() or "127.0.0.1") if direct else "127.0.0.1"
    state = tmp_path / "state"
    cert = tls.self_signed(state, host)
    served = cert if handed_pin is None else dataclasses.replace(cert, fingerprint=handed_pin)
    driver = AwsNodes(regions=[REGION], catalog_dir=str(clouds["catalog"]))
    provider = cloud_provider(driver, tmp_path / "aws", clouds["node"], clouds["ssh_config"])
    settings = default_settings(
        state,
        database_url=f"sqlite:///{state / 'cp.db'}",
        lease_s=10.0,
        heartbeat_s=0.5,
        worker_timeout_s=30.0,
        reconcile_interval_s=0.2,
        worker_reconnect_s=RECONNECT_S,
    )
    providers = {"local": LocalProvider(state_dir=tmp_path / "local", gpus=[]), "aws": provider}
    handle = ServerHandle(settings, host=host, providers=providers, tls=served).start_in_thread()
    try:
        if direct:
            # what CLOUDMODAL_NODE_SERVER_URL sets (make_providers), known once the port is bound: before any
            # launch, which is when a node's way to the control plane is decided
            provider.node_server_url = handle.url
        monkeypatch.setenv(tls.FINGERPRINT_ENV, cert.fingerprint)  # this process's client pins the real one
        with client_env(handle.url, handle.token):
            yield handle, provider
    finally:
        handle.stop()


def worker_rows(handle: ServerHandle) -> list[dict[str, Any]]:
    W = models.workers  # noqa: N806
    with handle.cp.db.read() as conn:
        return [dict(r) for r in conn.execute(W.select().where(W.c.provider == "aws")).mappings()]


def tunnels_to(state_dir: Path) -> list[list[str]]:
    """The live ``ssh -R`` processes (reverse tunnels) of the provider whose state is ``state_dir``: its ssh
    command lines name its known_hosts file there."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = [a.decode(errors="replace") for a in (entry / "cmdline").read_bytes().split(b"\0") if a]
        except OSError:
            continue
        if argv and os.path.basename(argv[0]) == "ssh" and "-R" in argv and str(state_dir) in " ".join(argv):
            out.append(argv)
    return out


def node_log(node: Any, worker_id: str) -> str:
    path = node.home / ".cloudmodal" / "logs" / f"worker-{worker_key(worker_id)}.log"
    return path.read_text(errors="replace") if path.exists() else ""


def node_worker_pid(node: Any, worker_id: str) -> int | None:
    path = node.home / ".cloudmodal" / "workers" / f"{worker_key(worker_id)}.pid"
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


# -- the tests -----------------------------------------------------------------------------------------------
def test_a_node_worker_dials_the_tls_control_plane_directly_with_the_pin(
    aws: Any, clouds: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with tls_cloud_plane(tmp_path, clouds, monkeypatch, direct=True) as (handle, provider):
        fp = handle.tls_fingerprint
        assert fp is not None and handle.url.startswith("https://")
        # The port speaks only TLS: whatever the worker did there, it did over TLS.
        with pytest.raises(httpx.HTTPError):
            httpx.get(handle.url.replace("https://", "http://") + "/healthz", timeout=5)
        with run_app(tls_cloud_app.app, show_logs=False):
            probe = tls_cloud_app.Probe()
            got = probe.where.remote(21)
            more = list(probe.where.map(range(5)))
            web_url = probe.web.get_web_url()
            with httpx.Client(verify=tls.httpx_verify(web_url, fp), timeout=120) as c:
                page = c.get(web_url)  # through the node worker's web tunnel (wss://, pinned)
            # while the worker runs: its node reaches the control plane with no tunnel
            tunnels = tunnels_to(tmp_path / "aws")
            rows = worker_rows(handle)
    assert page.status_code == 200, page.text
    # The method's worker and the web endpoint's (a pool of its own), each on a node of its own.
    assert sorted(r["id"] for r in rows) == sorted({got["worker"], page.json()["worker"]}), rows
    assert got["x2"] == 42 and [m["x2"] for m in more] == [0, 2, 4, 6, 8]
    assert {m["worker"] for m in more} == {got["worker"]}  # max_containers=1
    # Each dialled the control plane's own https:// address (not 127.0.0.1:<tunnel port> on the node), with
    # the pin the bootstrap handed it: the fingerprint of the certificate the control plane serves.
    assert got["url"] == handle.url and got["url"].startswith("https://"), got
    assert got["pin"] == fp
    assert web_url.startswith("https://")
    assert page.json()["url"] == handle.url and page.json()["pin"] == fp, page.json()
    # No reverse tunnel: none was asked for at launch, none was started (the tunnel test is the control).
    assert all(r["provider"] == "aws" and "tunnel_port" not in r["handle"]["extra"] for r in rows), rows
    assert tunnels == []


def test_a_node_worker_handed_a_wrong_pin_never_registers_and_says_why(
    aws: Any, clouds: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = clouds["node"]
    real = tls.self_signed(tmp_path / "state", non_loopback_address() or "127.0.0.1").fingerprint
    wrong = ("0" if real[0] != "0" else "1") + real[1:]  # one digit off
    plane = tls_cloud_plane(tmp_path, clouds, monkeypatch, direct=True, handed_pin=wrong)
    with plane as (handle, _provider):
        assert handle.tls_fingerprint == wrong  # handed to workers; the certificate served is `real`
        with run_app(tls_cloud_app.app, show_logs=False):
            call = tls_cloud_app.Probe().where.spawn(1)
            # The first worker was bootstrapped on the node and started there...
            wid = wait_for(
                lambda: next((r["id"] for r in worker_rows(handle) if node_worker_pid(node, r["id"])), None),
                180,
                "a worker started on the node",
            )
            pid = node_worker_pid(node, wid)
            assert pid is not None
            # ...refused the control plane's certificate, naming both fingerprints and the fix, in its log...
            log = wait_for(lambda: "refusing to connect" in node_log(node, wid) and node_log(node, wid), 120)
            # ...and exited: no retry for its reconnect patience (RECONNECT_S) after a wrong certificate.
            wait_for(lambda: not running(pid), 120, "the worker with the wrong pin to exit")
            rows = {r["id"]: r for r in worker_rows(handle)}
            with handle.cp.db.read() as conn:
                inputs = [dict(r) for r in conn.execute(select(models.inputs)).mappings()]
            call.cancel()
    assert "TlsPinError" in log, log
    assert tls.display_fingerprint(real) in log and tls.display_fingerprint(wrong) in log, log
    assert "cloudmodal login https://" in log and f"--fingerprint {real}" in log, log
    # Never registered (a registered worker has its pid), nor did any worker launched after it (each was
    # handed the same pin), so the control plane handed out nothing: the input was never claimed, is on no
    # worker, and no attempt or crash was counted against it.
    assert rows[wid]["pid"] is None and rows[wid]["ready_at"] is None, rows[wid]
    assert all(r["pid"] is None and r["ready_at"] is None for r in rows.values()), rows
    assert len(inputs) == 1, inputs
    (inp,) = inputs
    assert inp["state"] != models.InputState.CLAIMED.value and inp["worker_id"] is None, inp
    assert inp["attempts"] == 0 and inp["crashes"] == 0, inp


def test_a_laptops_tls_control_plane_reaches_its_node_through_the_tunnel(
    aws: Any, clouds: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No node_server_url: the reverse tunnel stays, and the worker speaks TLS through it with the pin (the
    control of the direct test's "no tunnel": the same detection finds this one)."""
    with tls_cloud_plane(tmp_path, clouds, monkeypatch, direct=False) as (handle, _provider):
        fp = handle.tls_fingerprint
        with run_app(tls_cloud_app.app, show_logs=False):
            got = tls_cloud_app.Probe().where.remote(4)
            tunnels = tunnels_to(tmp_path / "aws")
            (row,) = worker_rows(handle)
    port = row["handle"]["extra"]["tunnel_port"]
    assert got["x2"] == 8 and got["url"] == f"https://127.0.0.1:{port}" and got["pin"] == fp, got
    assert len(tunnels) == 1 and any(a.startswith(f"127.0.0.1:{port}:") for a in tunnels[0]), tunnels


# -- the web tunnel's dial loop ------------------------------------------------------------------------------
@pytest.fixture
def tls_plane(tmp_path: Path) -> Iterator[ServerHandle]:
    state = tmp_path / "state"
    settings = default_settings(state, database_url=f"sqlite:///{state / 'cp.db'}")
    provider = LocalProvider(state_dir=state / "workers", gpus=[], standby=False)
    handle = ServerHandle(
        settings, providers={"local": provider}, tls=tls.self_signed(state, "127.0.0.1")
    ).start_in_thread()
    try:
        yield handle
    finally:
        handle.stop()


def _web_server(handle: ServerHandle) -> Any:
    from cloudmodal.worker.web import WebServer

    return WebServer(handle.url, "not-a-worker-token", "ta-nosuchworker", {})


def test_the_web_tunnel_stops_dialling_a_refused_certificate(
    tls_plane: ServerHandle, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    fp = tls_plane.tls_fingerprint
    assert fp is not None
    wrong = ("0" if fp[0] != "0" else "1") + fp[1:]
    monkeypatch.setenv(tls.FINGERPRINT_ENV, wrong)
    ws = _web_server(tls_plane)
    ws.start()  # returns once the loop gave up (it waits for no tunnel that cannot come)
    assert ws.dialler is not None
    ws.dialler.result(timeout=60)  # the dial loop returned: nothing dials again
    err = capfd.readouterr().err
    assert isinstance(ws.refused, tls.TlsPinError), ws.refused
    lines = [ln for ln in err.splitlines() if "web tunnel" in ln]
    assert len(lines) == 1 and "refused, not dialling again" in lines[0], err
    assert tls.display_fingerprint(fp) in lines[0] and tls.display_fingerprint(wrong) in lines[0]


def test_the_web_tunnel_keeps_dialling_after_other_failures(
    tls_plane: ServerHandle, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """The control: with the right pin, a refusal that is not the certificate's (this token opens no worker's
    tunnel) is dialled again, as a control plane that restarts is."""
    assert tls_plane.tls_fingerprint is not None
    monkeypatch.setenv(tls.FINGERPRINT_ENV, tls_plane.tls_fingerprint)
    ws = _web_server(tls_plane)
    seen: list[str] = []
    try:
        ws.start()

        def redialled() -> bool:
            seen.extend(ln for ln in capfd.readouterr().err.splitlines() if "web tunnel" in ln)
            return sum("dialling again" in ln for ln in seen) >= 2

        wait_for(redialled, 60, "the web tunnel to dial again")
        assert ws.refused is None and ws.dialler is not None and not ws.dialler.done()
    finally:
        ws.drain(timeout=0)
    assert not any("not dialling again" in ln for ln in seen), seen


def test_a_plain_http_node_url_for_a_tls_control_plane_is_named_at_start(
    clouds: dict[str, Any], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Nodes told http:// for a control plane that serves only TLS could not connect: said when the provider
    is bound, with the fix; an https:// one (the control) says nothing."""
    from cloudmodal.providers.aws import AwsNodes
    from cloudmodal.providers.cloud import CloudProvider

    said: dict[str, str] = {}
    for scheme in ("http", "https"):
        driver = AwsNodes(regions=[REGION], catalog_dir=str(clouds["catalog"]))
        provider = CloudProvider(
            driver, state_dir=tmp_path / scheme, node_server_url=f"{scheme}://198.51.100.7:8765"
        )
        caplog.clear()
        with caplog.at_level("WARNING", logger="cloudmodal.providers.cloud"):
            provider.bind("cp-test", "https://198.51.100.7:8765")
        said[scheme] = caplog.text
    assert "CLOUDMODAL_NODE_SERVER_URL is http://198.51.100.7:8765" in said["http"], said
    assert "Set it to the https:// address" in said["http"]
    assert said["https"] == ""
