"""Issue 9, point 1: any local user was admin. Another Unix user (uid/gid 65534, switched to with ``setpriv``)
talks to a real ``cloudmodal server start`` over loopback without a token: it must be refused everything, and
must not be able to read the owner token (``server.json``) or the database.

Negative controls: the same user sending the very same requests with the owner token succeeds (the requests
are well formed and reach the server), the same user can read an ordinary world-readable file next to the
state dir (the file reads are allowed as such), and a server started with the explicit opt-in
``--allow-anonymous-loopback`` lets the anonymous request through (the test would catch the old default)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgpack
import pytest

from cloudmodal.ids import new_id

NOBODY = 65534
SETPRIV = shutil.which("setpriv") or "/usr/bin/setpriv"
PY = "/usr/bin/python3"  # the venv's python lives under /root (0700): the other user runs the system's

# Runs as the other user, with the standard library only: each request ([method, path, body hex, token]) or
# file read ([path]) in argv[1] (JSON) becomes one line of the answer: [status, body] or ["read", ok, error].
PROBE = r"""
import json, sys, urllib.request, urllib.error
base, jobs = sys.argv[1], json.loads(sys.argv[2])
out = []
for job in jobs:
    if len(job) == 1:
        try:
            with open(job[0], "rb") as f:
                f.read(1)
            out.append(["read", True, ""])
        except OSError as e:
            out.append(["read", False, type(e).__name__])
        continue
    method, path, body, token = job
    headers = {"content-type": "application/msgpack"}
    if token:
        headers["authorization"] = "Bearer " + token
    req = urllib.request.Request(base + path, data=bytes.fromhex(body) if body else None, method=method,
                                 headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=20) as r:
            out.append([r.status, r.read(300).decode("latin-1")])
    except urllib.error.HTTPError as e:
        out.append([e.code, e.read(300).decode("latin-1")])
print(json.dumps(out))
"""


def _uid_switch_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "switching to another Unix user needs root (run as root, e.g. in CI's container)"
    if not Path(SETPRIV).exists() or not Path(PY).exists():
        return f"needs {SETPRIV} and {PY} (util-linux and a system Python)"
    try:
        r = subprocess.run(
            _as_nobody(["-c", "import os; print(os.getuid())"]), capture_output=True, timeout=20
        )
    except OSError as e:
        return f"setpriv cannot run here: {e}"
    if r.returncode != 0 or r.stdout.strip() != str(NOBODY).encode():
        return f"setpriv could not switch to uid {NOBODY}: {r.stderr.decode()[-300:]}"
    return None


def _as_nobody(py_args: list[str]) -> list[str]:
    return [SETPRIV, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", PY, "-I", *py_args]


pytestmark = pytest.mark.skipif((_reason := _uid_switch_unavailable()) is not None, reason=_reason or "")


def probe(url: str, jobs: list[list[Any]]) -> list[list[Any]]:
    """Run ``jobs`` as the other user; its answers, in order."""
    r = subprocess.run(
        _as_nobody(["-c", PROBE, url, json.dumps(jobs)]), capture_output=True, timeout=120, cwd="/"
    )
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    return json.loads(r.stdout)


def _pack(body: Any) -> str:
    return msgpack.packb(body, use_bin_type=True).hex()


class Server:
    def __init__(self, proc: subprocess.Popen[bytes], log: Any, home: Path, info: dict[str, Any]) -> None:
        self.proc = proc
        self.log = log
        self.home = home
        self.info = info
        self.url: str = info["url"]
        self.token: str = info["token"]


def _start(base: Path, *extra: str) -> Server:
    """``cloudmodal server start --port 0`` (in the foreground, so this test owns the process) with its own
    ``CLOUDMODAL_HOME`` under ``base``; ready once its server.json names this process."""
    home = base / ("home" + "-".join(extra).replace("--", "-"))
    env = dict(os.environ, CLOUDMODAL_HOME=str(home), CLOUDMODAL_PROVIDERS="local")
    env.pop("CLOUDMODAL_SERVER_URL", None)
    env.pop("CLOUDMODAL_TOKEN", None)
    env.pop("CLOUDMODAL_DATABASE_URL", None)
    log_path = base / f"server{len(extra)}.log"
    # 0600: the other user may enter ``base``, and this log is the test's, not the server's to protect
    log = os.fdopen(os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cloudmodal.cli.main",
            "server",
            "start",
            "--foreground",
            "--port",
            "0",
            *extra,
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    info_file = home / "server.json"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.close()
            raise AssertionError(
                f"`cloudmodal server start {' '.join(extra)}` exited with {proc.returncode}: "
                + log_path.read_text()[-3000:]
            )
        try:
            info = json.loads(info_file.read_text())
        except (OSError, ValueError):
            info = {}
        if info.get("pid") == proc.pid and info.get("url"):
            return Server(proc, log, home, info)
        time.sleep(0.05)
    proc.kill()
    log.close()
    raise AssertionError("`cloudmodal server start` wrote no server.json within 60 s")


def _stop(server: Server) -> None:
    server.proc.send_signal(signal.SIGTERM)
    try:
        server.proc.wait(30)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        server.proc.wait(10)
    server.log.close()


@pytest.fixture(scope="module")
def base() -> Iterator[Path]:
    """A directory the other user may enter (pytest's own tmp dirs are 0700, which would make every file read
    fail for the wrong reason): each server's state dir goes inside."""
    d = Path(tempfile.mkdtemp(prefix="cm-sec-users-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def server(base: Path) -> Iterator[Server]:
    s = _start(base)
    yield s
    _stop(s)


def _attempts(token: str | None, who: str) -> list[list[Any]]:
    return [
        ["POST", "/v1/tokens", _pack({"kind": "owner", "apps": None, "name": f"minted-{who}"}), token],
        ["GET", "/v1/apps", "", token],
        [
            "POST",
            "/v1/apps",
            _pack({"app_id": new_id("ap"), "name": f"planted-{who}", "ephemeral": True}),
            token,
        ],
        ["POST", "/v1/blobs", f"import os  # source shipped by {who}".encode().hex(), token],
    ]


def _sqlite_file(server: Server) -> Path:
    url = str(server.info.get("database_url") or f"sqlite:///{server.home / 'cloudmodal.db'}")
    assert url.startswith("sqlite:///"), url
    return Path(url[len("sqlite:///") :])


def test_another_user_gets_nothing_without_the_owner_token(server: Server, base: Path) -> None:
    canary = base / "canary.txt"
    canary.write_text("anyone may read this")
    canary.chmod(0o644)
    db = _sqlite_file(server)
    assert db.exists() and (server.home / "server.json").exists()
    reads = [[str(server.home / "server.json")], [str(db)], [str(canary)]]

    anonymous = probe(server.url, _attempts(None, "anonymous") + reads)
    forged = probe(server.url, _attempts("cm_" + "x" * 43, "forged"))
    with_token = probe(server.url, _attempts(server.token, "owner"))

    assert [a[0] for a in anonymous[:4]] == [401] * 4, anonymous
    assert [a[0] for a in forged] == [401] * 4, forged
    # the owner's token, the same requests, the same user: accepted (so the 401s above are the check)
    assert [a[0] for a in with_token] == [200] * 4, with_token
    # neither the owner token (server.json) nor the database is readable; an ordinary file beside them is
    assert [a[1] for a in anonymous[4:]] == [False, False, True], anonymous[4:]
    assert stat.S_IMODE((server.home / "server.json").stat().st_mode) & 0o077 == 0
    # nothing was planted by the refused requests; the owner's app is there
    r = httpx.get(server.url + "/v1/apps", headers={"authorization": f"Bearer {server.token}"}, timeout=30)
    names = {a["name"] for a in msgpack.unpackb(r.content, raw=False)}
    assert "planted-owner" in names and not names & {"planted-anonymous", "planted-forged"}, names


def test_the_explicit_opt_in_lets_anonymous_loopback_through(base: Path) -> None:
    """The negative control for the default: with ``--allow-anonymous-loopback`` the very same anonymous
    request is answered, so the refusal above is the default at work (the old default answered it too)."""
    s = _start(base, "--allow-anonymous-loopback")
    try:
        got = probe(s.url, [["GET", "/v1/apps", "", None]])
        assert got[0][0] == 200, got
    finally:
        _stop(s)
