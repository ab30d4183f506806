"""providers.node_bootstrap over real SSH to a stand-in node (tests/fakes/sshd.py: a real sshd on 127.0.0.1).

The "control plane" is a small HTTP server that records what reaches it; the worker is the real
``python -m cloudmodal.worker`` (from the cloudmodal shipped to the node) or a tiny stand-in that calls home
like it. The node's ``$HOME`` is a temporary directory, its processes are this machine's: the tests read
``/proc`` to check that the token is on no command line.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import importlib.util
import os
import shutil
import signal
import socket
import sys
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

import httpx
import msgpack
import pytest

import cloudmodal
from cloudmodal.providers.node_bootstrap import BootstrapState, NodeBootstrap
from cloudmodal.providers.node_package import build_tarball, package_roots, package_tarball
from cloudmodal.providers.node_ssh import SshTarget
from tests.ports import reserved_port


def _load_fake(name: str) -> Any:
    path = Path(__file__).resolve().parents[1] / "fakes" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"cloudmodal_test_fakes_{name}", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


fake_sshd = _load_fake("sshd")


TOKEN = "cm-wtok-7f3a9c1e5b2d4a6f8e0c"  # the scoped worker token the tests look for everywhere

# A worker stand-in: calls home like the real worker (same route shape and headers), every 0.2 s.
# The token comes as the real worker takes it: one JSON line on stdin (CLOUDMODAL_CREDENTIALS=stdin).
CALL_HOME = (
    "import json, os, sys, time, httpx\n"
    "url, wid = os.environ['CLOUDMODAL_SERVER_URL'], os.environ['CLOUDMODAL_WORKER_ID']\n"
    "assert os.environ['CLOUDMODAL_CREDENTIALS'] == 'stdin' and 'CLOUDMODAL_TOKEN' not in os.environ\n"
    "tok = json.loads(sys.stdin.readline())['CLOUDMODAL_TOKEN']\n"
    "h = {'authorization': 'Bearer ' + tok, 'user-agent': 'cloudmodal-client'}\n"
    "while True:\n"
    "    try:\n"
    "        httpx.post(f'{url}/v1/workers/{wid}/heartbeat', headers=h, content=b'', timeout=2)\n"
    "    except httpx.HTTPError:\n"
    "        pass\n"
    "    time.sleep(0.2)\n"
)
SLEEPER = ("-c", "import time; time.sleep(600)")


# --- the "control plane" ----------------------------------------------------------------------------------


@dataclass
class ControlPlane:
    """Records requests; holds a worker's ``/register`` until ``release`` is set (so the worker stays up)."""

    port: int = 0
    requests: list[dict[str, Any]] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def reset(self) -> None:
        with self.lock:
            self.requests.clear()
        self.release.set()  # free a worker still held by the previous test
        self.release = threading.Event()

    def seen(self, suffix: str) -> list[dict[str, Any]]:
        with self.lock:
            return [r for r in self.requests if r["path"].endswith(suffix)]


def _cp_handler(cp: ControlPlane) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length") or 0))
            release = cp.release
            with cp.lock:
                cp.requests.append(
                    {
                        "path": self.path,
                        "headers": {k.lower(): v for k, v in self.headers.items()},
                        "body": body,
                    }
                )
            if self.path.endswith("/register"):
                release.wait(30)
                code, out = 410, b'{"detail": "test over"}'
            else:
                code, out = 200, b"{}"
            self.send_response(code)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        do_GET = do_POST

    return Handler


@pytest.fixture(scope="module")
def control_plane() -> Iterator[ControlPlane]:
    cp = ControlPlane()
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _cp_handler(cp))
    srv.daemon_threads = True
    cp.port = srv.server_port
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield cp
    cp.release.set()
    srv.shutdown()
    srv.server_close()


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    missing = fake_sshd.sshd_missing()
    if missing is not None:
        pytest.skip(f"no stand-in node: {missing}")
    with fake_sshd.stand_in_node(tmp_path_factory.mktemp("node")) as n:
        yield n


# --- helpers ----------------------------------------------------------------------------------------------


def free_port() -> int:
    """A port nothing binds until the test does (or, for a port that must refuse, at all): tests.ports."""
    return reserved_port()


def wait_for(cond: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        assert time.monotonic() < deadline, f"{what} not met within {timeout} s"
        time.sleep(0.05)


def run_to_end(b: NodeBootstrap, timeout: float = 60.0) -> tuple[BootstrapState, list[str]]:
    """Poll until started or failed; returns the last state and the phases seen, in order."""
    phases: list[str] = []

    def done() -> BootstrapState | None:
        s = b.poll()
        if not phases or phases[-1] != s.phase:
            phases.append(s.phase)
        return s if s.phase in ("started", "failed") else None

    return wait_for(done, timeout, "bootstrap end"), phases


def cmdlines() -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                out[int(entry.name)] = (entry / "cmdline").read_bytes()
    return out


def tunnel_answers(port: int) -> bool:
    """Whether a request to the node's end of the tunnel reaches the control plane (the node is this
    machine, so its 127.0.0.1:port is ours)."""
    try:
        return httpx.get(f"http://127.0.0.1:{port}/probe", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture
def make_bootstrap(
    node: Any, control_plane: ControlPlane, tmp_path: Path
) -> Iterator[Callable[..., NodeBootstrap]]:
    """NodeBootstraps to the stand-in node, using this interpreter's packages (nothing downloaded); every
    local ssh process is stopped and every worker started on the node killed at the end."""
    control_plane.reset()
    made: list[NodeBootstrap] = []

    def make(worker_id: str, image: cloudmodal.Image, **kw: Any) -> NodeBootstrap:
        kw.setdefault("server_url", control_plane.url)
        kw.setdefault("env", {"CLOUDMODAL_TOKEN": TOKEN})
        kw.setdefault("python", sys.executable)
        kw.setdefault("system_site_packages", True)
        kw.setdefault("install_dependencies", False)
        kw.setdefault("startup_check_s", 0.3)
        kw.setdefault("connect_timeout_s", 10.0)
        kw.setdefault("retry_s", 0.3)
        kw.setdefault("state_dir", tmp_path / "bootstrap")
        b = NodeBootstrap(node.target(), worker_id=worker_id, image=image.to_wire(), **kw)
        made.append(b)
        return b

    yield make
    for b in made:
        b.stop()
        assert b.local_pids() == []
    control_plane.release.set()
    for pidfile in (node.home / ".cloudmodal" / "workers").glob("*.pid"):
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pidfile.read_text()), signal.SIGKILL)
        pidfile.unlink()


def image(tag: str, *commands: str) -> cloudmodal.Image:
    """A pip-less image whose run_commands step appends to a marker file on the node (one line per run)."""
    return cloudmodal.Image.debian_slim().run_commands(f"echo {tag} >> $HOME/marker-{tag}", *commands)


# --- tests ------------------------------------------------------------------------------------------------


def test_real_worker_calls_home_through_the_reverse_tunnel_with_its_token(
    make_bootstrap: Callable[..., NodeBootstrap], node: Any, control_plane: ControlPlane, tmp_path: Path
) -> None:
    tunnel_port = free_port()
    pem = "-----BEGIN KEY-----\nAb+/=\n\n-----END KEY-----\n\n"  # newlines inside and at the end, kept
    env = {"CLOUDMODAL_TOKEN": TOKEN, "PEM_KEY": pem, "SPACED": " a = b "}
    b = make_bootstrap("wk-real-1", image("real"), tunnel_port=tunnel_port, env=env)
    assert b.node_server_url == f"http://127.0.0.1:{tunnel_port}"
    b.start()
    state, phases = run_to_end(b)
    assert state.phase == "started", state.detail
    assert phases[0] == "tunnel" and "setup" in phases
    assert state.tunnel_up is True and state.image_cached is False and state.worker_pid

    # The real worker's first request: POST /v1/workers/<id>/register, msgpack, with the token as a
    # bearer token — it came through the tunnel (the Host is the node-side port, not the control plane's).
    reg = wait_for(lambda: control_plane.seen("/v1/workers/wk-real-1/register"), what="register")[0]
    assert reg["headers"]["authorization"] == f"Bearer {TOKEN}"
    assert reg["headers"]["host"] == f"127.0.0.1:{tunnel_port}" != f"127.0.0.1:{control_plane.port}"
    assert reg["headers"]["content-type"] == "application/msgpack"
    assert msgpack.unpackb(reg["body"])["pid"] == state.worker_pid

    # It runs the cloudmodal shipped to the node, from the image's venv, detached from the SSH session.
    environ = Path(f"/proc/{state.worker_pid}/environ").read_bytes().split(b"\0")
    _, sha = package_tarball()
    pkg = node.home / ".cloudmodal" / "pkg" / sha
    assert f"PYTHONPATH={pkg}".encode() in environ
    assert f"PEM_KEY={pem}".encode() in environ and b"SPACED= a = b " in environ
    # the token is not in its environment (user code could read /proc/self/environ), only on its stdin
    assert not any(TOKEN.encode() in e or e.startswith(b"CLOUDMODAL_TOKEN=") for e in environ)
    assert b"CLOUDMODAL_CREDENTIALS=stdin" in environ
    assert (pkg / "cloudmodal" / "providers" / "nodes.py").is_file()
    assert os.getsid(state.worker_pid) == state.worker_pid
    assert (node.home / "marker-real").read_text() == "real\n"

    # While the worker runs, the token is on no command line on this machine (the node's and the control
    # plane's processes alike), in no log on the node, and not in what the bootstrap reports.
    hits = [pid for pid, cmd in cmdlines().items() if TOKEN.encode() in cmd]
    assert hits == []
    assert state.log_path and TOKEN not in Path(state.log_path).read_text()
    assert (
        TOKEN
        not in (node.home / ".cloudmodal" / "images").joinpath(image("real").hash, "setup.log").read_text()
    )
    assert TOKEN not in node.log()
    assert TOKEN not in state.detail
    local_files = [p for p in (tmp_path / "bootstrap").rglob("*") if p.is_file()]
    assert local_files and not any(TOKEN in p.read_text(errors="replace") for p in local_files)
    # host keys went to the cloudmodal-owned known_hosts (0600), which now holds the node's key
    assert (node.known_hosts.stat().st_mode & 0o777) == 0o600
    assert f"[127.0.0.1]:{node.port}" in node.known_hosts.read_text()

    control_plane.release.set()  # the worker is refused, reports it stopped, and exits
    wait_for(lambda: control_plane.seen("/v1/workers/wk-real-1/stopped"), what="stopped")
    assert all(r["headers"]["authorization"] == f"Bearer {TOKEN}" for r in control_plane.requests)


def test_second_worker_with_the_same_image_skips_setup(
    make_bootstrap: Callable[..., NodeBootstrap], node: Any
) -> None:
    img = image("cache")
    first = make_bootstrap("wk-cache-1", img, argv=SLEEPER)
    first.start()
    s1, phases = run_to_end(first)
    assert s1.phase == "started", s1.detail
    assert phases[0] == "setup" and s1.tunnel_up is None  # no tunnel asked for
    assert s1.image_cached is False

    second = make_bootstrap("wk-cache-2", img, argv=SLEEPER)
    second.start()
    s2, _ = run_to_end(second)
    assert s2.phase == "started", s2.detail
    assert s2.image_cached is True
    assert s2.worker_pid != s1.worker_pid
    # without a tunnel the worker is told the control plane's own URL
    env = Path(f"/proc/{s2.worker_pid}/environ").read_bytes().split(b"\0")
    assert f"CLOUDMODAL_SERVER_URL={first.server_url}".encode() in env
    assert b"CLOUDMODAL_WORKER_ID=wk-cache-2" in env
    assert (node.home / "marker-cache").read_text() == "cache\n"  # the run_commands step ran once


def test_failing_run_commands_reports_failed_with_the_output_tail(
    make_bootstrap: Callable[..., NodeBootstrap], node: Any
) -> None:
    b = make_bootstrap("wk-fail-1", image("fail", "echo compiling the thing", "false"), argv=SLEEPER)
    b.start()
    state, _ = run_to_end(b)
    assert state.phase == "failed"
    assert "The image's setup failed on the node" in state.detail
    assert "compiling the thing" in state.detail  # the failing step's own output
    assert TOKEN not in state.detail
    assert b.local_pids() == []
    # nothing was started, and the image is not marked done (the next bootstrap tries again)
    assert not (node.home / ".cloudmodal" / "workers" / "wkfail1.pid").exists()
    assert not (
        node.home
        / ".cloudmodal"
        / "images"
        / image("fail", "echo compiling the thing", "false").hash
        / "done"
    ).exists()


def test_worker_that_dies_at_once_reports_its_log_with_the_token_scrubbed(
    make_bootstrap: Callable[..., NodeBootstrap],
) -> None:
    leak = (
        "-c",
        "import json, sys; print('token is', json.loads(sys.stdin.readline())['CLOUDMODAL_TOKEN']); sys.exit(3)",
    )
    b = make_bootstrap("wk-dies-1", image("dies"), argv=leak)
    b.start()
    state, _ = run_to_end(b)
    assert state.phase == "failed"
    assert "The worker exited as soon as it started" in state.detail
    assert "token is ***" in state.detail and TOKEN not in state.detail


def test_stop_then_reattach_reopens_the_same_tunnel(
    make_bootstrap: Callable[..., NodeBootstrap], node: Any, control_plane: ControlPlane
) -> None:
    tunnel_port = free_port()
    b = make_bootstrap("wk-tun-1", image("tun"), tunnel_port=tunnel_port, argv=("-c", CALL_HOME))
    b.start()
    state, _ = run_to_end(b)
    assert state.phase == "started", state.detail
    heartbeats = "/v1/workers/wk-tun-1/heartbeat"
    wait_for(lambda: control_plane.seen(heartbeats), what="heartbeats through the tunnel")
    assert tunnel_answers(tunnel_port)

    # The control plane "restarts": its ssh processes are gone, the node's end of the tunnel closes, and
    # no ssh process of this bootstrap is left on this machine. The worker on the node keeps running.
    pids = b.local_pids()
    assert len(pids) == 1  # the tunnel (the setup session has ended)
    b.stop()
    assert b.local_pids() == []
    config = str(node.ssh_config).encode()
    wait_for(
        lambda: not any(pid in pids or config in cmd for pid, cmd in cmdlines().items()), what="ssh gone"
    )
    wait_for(lambda: not tunnel_answers(tunnel_port), what="tunnel closed")
    os.kill(state.worker_pid, 0)  # still alive

    # A new control plane re-opens only the tunnel, on the same node-side port: no setup, no new worker.
    again = make_bootstrap("wk-tun-1", image("tun"), tunnel_port=tunnel_port, argv=("-c", CALL_HOME))
    again.reattach()
    s2, phases = run_to_end(again)
    assert s2.phase == "started", s2.detail
    assert phases == ["tunnel", "started"] and s2.tunnel_up is True
    assert tunnel_answers(tunnel_port)
    with control_plane.lock:
        control_plane.requests.clear()
    req = wait_for(lambda: control_plane.seen(heartbeats), what="the same worker calling home again")[0]
    assert req["headers"]["authorization"] == f"Bearer {TOKEN}"
    assert (node.home / "marker-tun").read_text() == "tun\n"

    # A tunnel that drops after start is re-opened by poll.
    tunnel_pid = again.local_pids()[0]
    os.kill(tunnel_pid, signal.SIGKILL)
    wait_for(lambda: again.poll().tunnel_up is False, what="tunnel seen down")
    wait_for(
        lambda: again.poll().tunnel_up is True and tunnel_pid not in again.local_pids(),
        what="tunnel re-opened",
    )
    assert tunnel_answers(tunnel_port)


def test_a_node_side_port_already_taken_fails_the_tunnel(
    make_bootstrap: Callable[..., NodeBootstrap],
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        b = make_bootstrap("wk-port-1", image("port"), tunnel_port=taken.getsockname()[1], argv=SLEEPER)
        b.start()
        state, _ = run_to_end(b)
    assert state.phase == "failed"
    assert "remote port forwarding failed" in state.detail
    assert "pick another tunnel port" in state.detail
    assert b.local_pids() == []


def test_an_unknown_key_fails_with_the_fix(
    make_bootstrap: Callable[..., NodeBootstrap], node: Any, tmp_path: Path
) -> None:
    import subprocess

    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "other")], check=True)
    b = make_bootstrap("wk-key-1", image("key"), argv=SLEEPER, connect_timeout_s=0.0)
    b.target = node.target(key_path=tmp_path / "other")
    b.start()
    state, _ = run_to_end(b)
    assert state.phase == "failed"
    assert "Permission denied" in state.detail and "authorized" in state.detail


def test_shipped_package_holds_the_mapped_subpackages_and_is_deterministic() -> None:
    names = dict(package_roots())
    assert names["cloudmodal"] == Path(cloudmodal.__file__).resolve().parent
    data, sha = package_tarball()
    with tarfile.open(fileobj=BytesIO(data), mode="r:gz") as tar:
        members = set(tar.getnames())
    for must in (
        "cloudmodal/__init__.py",
        "cloudmodal/worker/__main__.py",
        "cloudmodal/providers/node_bootstrap.py",
        "cloudmodal/pricing/offers.py",
        "cloudmodal/server/migrations/script.py.mako",
    ):
        assert must in members, must
    assert not any("__pycache__" in m or m.endswith(".pyc") for m in members)
    assert sha == hashlib.sha256(data).hexdigest()


def test_the_tarball_depends_only_on_the_files(tmp_path: Path) -> None:
    # two copies of the package made at different times (other mtimes, a stray cache) pack to the same bytes
    src = Path(cloudmodal.__file__).resolve().parent / "worker"
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(src, a, ignore=shutil.ignore_patterns("__pycache__"))
    time.sleep(0.01)
    shutil.copytree(src, b, ignore=shutil.ignore_patterns("__pycache__"))
    (b / "__pycache__").mkdir()
    (b / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"junk")
    os.utime(b / "__main__.py", (0, 1_000_000))
    assert build_tarball([("cloudmodal/worker", a)]) == build_tarball([("cloudmodal/worker", b)])
    (b / "__main__.py").write_text("changed")
    assert build_tarball([("cloudmodal/worker", a)])[1] != build_tarball([("cloudmodal/worker", b)])[1]


def test_known_hosts_default_is_cloudmodal_owned_and_private(tmp_path: Path) -> None:
    t = SshTarget("54.0.0.9", key_path=tmp_path / "k")
    path = t.known_hosts_path()  # CLOUDMODAL_HOME is a temporary directory in the tests
    assert path.parent.name == "ssh" and path.name == "known_hosts"
    assert str(path).startswith(os.environ["CLOUDMODAL_HOME"])
    assert (path.stat().st_mode & 0o777) == 0o600


def test_a_node_not_answering_ssh_yet_is_retried_until_the_deadline(
    make_bootstrap: Callable[..., NodeBootstrap], node: Any, tmp_path: Path
) -> None:
    config = tmp_path / "ssh_config"  # the node's address maps to a port where no sshd listens (yet)
    config.write_text(f"Host 54.*\n  HostName 127.0.0.1\n  Port {free_port()}\n")
    b = make_bootstrap("wk-boot-1", image("boot"), argv=SLEEPER, connect_timeout_s=1.5, retry_s=0.2)
    b.target = node.target(ssh_config=str(config))
    b.start()
    waiting = wait_for(
        lambda: (s := b.poll()).phase == "setup" and "waiting for the node's SSH" in s.detail and s
    )
    assert "Connection refused" in waiting.detail
    state, _ = run_to_end(b)
    assert state.phase == "failed"
    assert "Could not run the bootstrap on the node (ssh exited with 255)" in state.detail
    assert "check the node's address, that sshd runs there" in state.detail
