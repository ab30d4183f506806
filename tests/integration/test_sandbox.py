"""Sandboxes with real processes: a real control plane, real hosts, bubblewrap, real sandboxed commands.

Streams are interactive (a line's echo is read before the next line is written); exit codes, timeouts and
termination are those of real processes; isolation is checked from inside the sandbox against files, tokens and
a port that exist outside it, each with a control showing the same probe succeeds where access is allowed; no
process outlives its sandbox (this test process's descendants are counted before and after).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support import start_server, use_server

import cloudmodal
from cloudmodal.client.session import current_session
from cloudmodal.sandbox import Sandbox, SandboxTerminatedError, SandboxTimeoutError
from cloudmodal.server.app import ServerHandle
from cloudmodal.server.svc_sandbox import Sandboxes

pytestmark = pytest.mark.skipif(
    shutil.which("bwrap") is None, reason="needs bubblewrap (apt-get install bubblewrap)"
)

TOKEN_RE = re.compile(rb"cm_[A-Za-z0-9_-]{43}")


def descendants(root: int) -> dict[int, str]:
    """Every process below ``root``: pid -> command line."""
    children: dict[int, list[int]] = {}
    cmd: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmd[int(entry)] = (
                Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            )
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found: dict[int, str] = {}
    todo = [root]
    while todo:
        for c in children.get(todo.pop(), []):
            if c in cmd:
                found[c] = cmd[c]
                todo.append(c)
    return found


def eventually(what: str, fn: Callable[[], Any], timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s (last: {value!r})")
        time.sleep(0.05)


def sandboxes_of(handle: ServerHandle) -> Sandboxes:
    """The control plane's sandbox service (set on it with the route table)."""
    service: Sandboxes = handle.cp.sandboxes  # type: ignore[attr-defined]
    return service


def sandbox_procs(plane: ServerHandle | None = None) -> dict[int, str]:
    """This test process's descendants that belong to sandboxes (hosts, bubblewrap, what runs inside), less
    ``plane``'s standby hosts (idle interpreters kept ready for the next sandboxes)."""
    standby = {h.pid for h in sandboxes_of(plane).standby} if plane is not None else set()
    return {
        pid: c
        for pid, c in descendants(os.getpid()).items()
        if pid not in standby
        and any(k in c for k in ("sandbox_host", "bwrap", "sandbox", "SANDBOXED"))
        or c.startswith(("cat", "sleep"))
    }


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def plane(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerHandle]:
    state = tmp_path_factory.mktemp("cp")
    if request.param == "sqlite":
        url = f"sqlite:///{state / 'cloudmodal.db'}"
    else:
        url = request.getfixturevalue("new_postgres_database")()
    handle = start_server(state, url)
    try:
        with use_server(handle):
            yield handle
    finally:
        handle.stop()


@pytest.fixture(scope="module")
def app(plane: ServerHandle) -> cloudmodal.App:
    return cloudmodal.App.lookup("sandbox-tests", create_if_missing=True)


ECHO_UPPER = "import sys\nfor line in sys.stdin:\n    print(line.upper(), end='', flush=True)\n    print('e:' + line, end='', file=sys.stderr, flush=True)\nsys.exit(3)"


def test_interactive_stdio_and_exit_code(app: cloudmodal.App) -> None:
    sb = Sandbox.create("python", "-c", ECHO_UPPER, app=app, timeout=60)
    for word in ("hello", "world", "again"):
        sb.stdin.write(word + "\n")
        sb.stdin.drain()
        assert sb.stdout.readline() == word.upper() + "\n"  # read before the next line is written
        assert sb.stderr.readline() == f"e:{word}\n"
    assert sb.poll() is None  # still reading stdin
    sb.stdin.write_eof()
    sb.stdin.drain()
    assert sb.stdout.read() == ""
    sb.wait()
    assert sb.returncode == 3


def test_exec_streams_and_exit_codes(app: cloudmodal.App) -> None:
    sb = Sandbox.create(app=app, timeout=60)  # no command: it waits for execs
    try:
        assert sb.stdout.read() == ""  # its own streams are empty
        p = sb.exec("echo", "hi")
        assert p.stdout.read() == "hi\n"
        assert p.wait() == 0
        p = sb.exec("sh", "-c", "echo out; echo err >&2; exit 5")
        assert p.stdout.read() == "out\n"
        assert p.stderr.read() == "err\n"
        assert p.wait() == 5 and p.returncode == 5
        p = sb.exec("python", "-c", "import sys\nfor l in sys.stdin: print(int(l) * 2, flush=True)")
        for n in (1, 21):
            p.stdin.write(f"{n}\n")
            p.stdin.drain()
            assert p.stdout.readline() == f"{2 * n}\n"
        p.stdin.write_eof()
        p.stdin.drain()
        assert p.wait() == 0
        p = sb.exec("no-such-command-here")
        assert p.wait() == 127
        assert "no-such-command-here" in p.stderr.read()
        p = sb.exec("sh", "-c", "kill -9 $$")
        assert p.wait() == -9
        assert sb.poll() is None
    finally:
        sb.terminate(wait=True)
    with pytest.raises(SandboxTerminatedError):
        sb.wait()
    assert sb.returncode == 137


def test_timeout_kills_the_sandbox(app: cloudmodal.App) -> None:
    sb = Sandbox.create("sh", "-c", "sleep 600 & sleep 600", app=app, timeout=1)
    with pytest.raises(SandboxTimeoutError):
        sb.wait()
    assert sb.returncode == 124
    assert sb.object_id not in {s.object_id for s in Sandbox.list(app_id=app.app_id)}
    eventually(
        "the timed-out sandbox's processes are gone",
        lambda: not any("sleep 600" in c for c in sandbox_procs().values()),
    )


def test_terminate_kills_the_whole_tree(app: cloudmodal.App, plane: ServerHandle) -> None:
    sb = Sandbox.create("sh", "-c", "sleep 700 & (sleep 701 &) ; echo ready; wait", app=app, timeout=60)
    assert sb.stdout.readline() == "ready\n"
    # control: the probe sees the sandbox's processes (the detached subshell may not have exec'd its sleep yet
    # when "ready" is printed, so wait for both to show)
    eventually(
        "the sandbox's sleeps are visible to the probe",
        lambda: {"sleep 700", "sleep 701"} <= {c.strip() for c in sandbox_procs().values()},
    )
    sb.terminate()
    with pytest.raises(SandboxTerminatedError):
        sb.wait()
    # this sandbox's own processes, by their command lines: other tests on the same pytest worker may have
    # sandbox processes of their own coming and going meanwhile
    eventually(
        "no process of the terminated sandbox is left",
        lambda: not any(c.startswith(("sleep 700", "sleep 701")) for c in sandbox_procs().values()),
    )


def test_terminate_right_after_create(app: cloudmodal.App, plane: ServerHandle) -> None:
    """Killed while its host and bubblewrap are still starting, a sandbox still ends as terminated, at once."""
    before = set(sandbox_procs(plane))
    for _ in range(3):
        sb = Sandbox.create("sleep", "800", app=app, timeout=60)
        sb.terminate()
        with pytest.raises(SandboxTerminatedError):
            sb.wait()
        assert sb.returncode == 137
    eventually("no process of the terminated sandboxes is left", lambda: set(sandbox_procs(plane)) <= before)


def test_open_files(app: cloudmodal.App) -> None:
    sb = Sandbox.create(app=app, timeout=60, workdir="/box")
    try:
        with sb.open("/box/notes.txt", "w") as f:
            f.write("one\n")
            f.write("two\n")
        with sb.open("/box/notes.txt", "a") as f:
            f.write("three\n")
        assert sb.exec("cat", "/box/notes.txt").stdout.read() == "one\ntwo\nthree\n"
        with sb.open("/box/notes.txt") as f:
            assert list(f) == ["one\n", "two\n", "three\n"]
        with sb.open("/box/blob", "wb") as f:
            f.write(bytes(range(256)) * 1000)
        assert sb.open("/box/blob", "rb").read() == bytes(range(256)) * 1000
        with pytest.raises(FileNotFoundError):
            sb.open("/box/missing.txt")
        with pytest.raises(IsADirectoryError):
            sb.open("/box")
    finally:
        sb.terminate(wait=True)


def test_list_tags_and_from_id(app: cloudmodal.App) -> None:
    a = Sandbox.create(app=app, timeout=60, tags={"role": "a"})
    b = Sandbox.create(app=app, timeout=60, tags={"role": "b"})
    try:
        assert [s.object_id for s in Sandbox.list(app_id=app.app_id, tags={"role": "a"})] == [a.object_id]
        b.set_tags({"role": "a", "x": "1"})
        assert {s.object_id for s in Sandbox.list(app_id=app.app_id, tags={"role": "a"})} == {
            a.object_id,
            b.object_id,
        }
        assert b.get_tags() == {"role": "a", "x": "1"}
        same = Sandbox.from_id(a.object_id)
        assert same.exec("echo", "via from_id").stdout.read() == "via from_id\n"
    finally:
        a.terminate(wait=True)
        b.terminate(wait=True)
    assert not {s.object_id for s in Sandbox.list(app_id=app.app_id)} & {a.object_id, b.object_id}


@pytest.mark.parametrize("memory", [128, None])
def test_memory_limit(app: cloudmodal.App, memory: int | None) -> None:
    sb = Sandbox.create(
        "python",
        "-c",
        "b = bytearray(300 * 1024 * 1024); print('allocated')",
        app=app,
        timeout=60,
        memory=memory,
    )
    out, err = sb.stdout.read(), sb.stderr.read()
    sb.wait()
    if memory:
        assert sb.returncode == 1 and "MemoryError" in err, (out, err)
    else:  # control: the same allocation without the limit succeeds
        assert sb.returncode == 0 and out == "allocated\n", (out, err)


PROBE = r"""
import json, os, re, sys
found = {"env": sorted(k for k in os.environ if "CLOUDMODAL" in k or "TOKEN" in k), "tokens": [], "files": {}, "procs": []}
pat = re.compile(rb"cm_[A-Za-z0-9_-]{43}")
for pid in os.listdir("/proc"):
    if not pid.isdigit():
        continue
    for name in ("environ", "cmdline"):
        try:
            data = open(f"/proc/{pid}/{name}", "rb").read()
        except OSError:
            continue
        found["tokens"] += [t.decode() for t in pat.findall(data)]
        if name == "cmdline":
            found["procs"].append(data.replace(b"\0", b" ").decode(errors="replace"))
for path in sys.argv[1:]:
    try:
        found["files"][path] = open(path, "rb").read(100).decode(errors="replace")
    except OSError as e:
        found["files"][path] = "refused: " + type(e).__name__
print(json.dumps(found))
"""


def test_sandbox_sees_no_outside_file_and_no_token(
    app: cloudmodal.App, plane: ServerHandle, tmp_path: Path
) -> None:
    secret_file = tmp_path / "secret.txt"
    secret_file.write_text("outside-secret")
    state_db = plane.settings.state_dir / "cloudmodal.db"
    home_file = Path.home() / ".bashrc"
    paths = [str(secret_file), str(state_db), str(plane.settings.state_dir)]
    # control: this process (outside the sandbox) reads them
    assert secret_file.read_text() == "outside-secret"
    if state_db.exists():  # SQLite: the control plane's database is a file of its state dir
        assert state_db.read_bytes()[:6] == b"SQLite"
    for f in plane.settings.state_dir.iterdir():  # its key, logs...: readable here
        if f.is_file():
            f.read_bytes()
            paths.append(str(f))
    if os.access("/etc/shadow", os.R_OK):  # readable by this user outside: the sandbox must not read it
        paths.append("/etc/shadow")
    sb = Sandbox.create("python", "-c", PROBE, *paths, str(home_file), app=app, timeout=60)
    found = json.loads(sb.stdout.read())
    sb.wait()
    for p in paths + [str(home_file)]:
        assert found["files"][p].startswith("refused"), (p, found["files"][p])
    assert found["env"] == []
    assert found["tokens"] == []
    # the sandbox sees only its own PID namespace: not its host (which holds the sandbox's token), not the tests
    assert not any("-m cloudmodal.worker.sandbox_host" in c or "bin/pytest" in c for c in found["procs"]), (
        found["procs"]
    )
    assert len(found["procs"]) <= 4, found["procs"]
    # control: outside, the same scan finds hosts' command lines, and the pattern recognizes a token
    sb2 = Sandbox.create(app=app, timeout=60)
    try:
        assert any("-m cloudmodal.worker.sandbox_host" in c for c in sandbox_procs().values())
        assert TOKEN_RE.search(current_session().transport._headers["authorization"].encode())
    finally:
        sb2.terminate(wait=True)


def test_secrets_reach_the_sandbox_and_no_command_line(app: cloudmodal.App) -> None:
    value = "s3cr3t-" + os.urandom(8).hex()
    sb = Sandbox.create(
        "python",
        "-c",
        "import os, sys; print(os.environ['API_KEY'] + ' ' + os.environ['MODE'], flush=True); sys.stdin.read()",
        app=app,
        timeout=60,
        secrets=[cloudmodal.Secret.from_dict({"API_KEY": value})],
        env={"MODE": "test"},
    )
    try:
        assert sb.stdout.readline() == f"{value} test\n"  # control: the sandbox has it
        for pid in os.listdir("/proc"):  # and no command line on the machine shows it
            if pid.isdigit():
                try:
                    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                except OSError:
                    continue
                assert value.encode() not in cmdline, pid
    finally:
        sb.terminate(wait=True)


CONNECT = r"""
import socket, sys
try:
    socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=5).sendall(b"ping")
    print("connected")
except OSError as e:
    print("refused:", type(e).__name__)
"""


@pytest.mark.parametrize("block", [True, False])
def test_block_network(app: cloudmodal.App, block: bool) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(30)
    port = listener.getsockname()[1]
    got: list[bytes] = []

    def accept() -> None:
        try:
            conn, _ = listener.accept()
            got.append(conn.recv(4))
            conn.close()
        except OSError:
            pass

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    sb = Sandbox.create("python", "-c", CONNECT, str(port), app=app, timeout=60, block_network=block)
    out = sb.stdout.read()
    sb.wait()
    listener.close()
    t.join(5)
    if block:
        assert out.startswith("refused"), out
        assert got == []
    else:  # negative control: the same probe without block_network reaches the port
        assert out == "connected\n", out
        assert got == [b"ping"]


def test_fifty_sandboxes_at_once_leak_nothing(app: cloudmodal.App, plane: ServerHandle) -> None:
    before = set(sandbox_procs(plane))
    boxes = [Sandbox.create("cat", app=app, timeout=120) for _ in range(50)]
    # every one answers while all 50 run (cat waits for its stdin's end)
    for i, sb in enumerate(boxes):
        sb.stdin.write(f"box {i}\n")
        sb.stdin.drain()
    for i, sb in enumerate(boxes):
        assert sb.stdout.readline() == f"box {i}\n"
    cats = [c for c in sandbox_procs().values() if c.strip() == "cat"]
    assert len(cats) >= 50
    for sb in boxes[:25]:
        sb.stdin.write_eof()
        sb.stdin.drain()
    for sb in boxes[25:]:
        sb.terminate()
    for sb in boxes[:25]:
        sb.wait()
        assert sb.returncode == 0
    for sb in boxes[25:]:
        sb.wait(raise_on_termination=False)
        assert sb.returncode == 137
    eventually("every sandbox process is gone", lambda: set(sandbox_procs(plane)) <= before, timeout=90)


def test_app_stop_and_control_plane_shutdown_end_sandboxes(tmp_path: Path) -> None:
    handle = start_server(tmp_path, f"sqlite:///{tmp_path / 'cloudmodal.db'}")
    try:
        with use_server(handle):
            app = cloudmodal.App.lookup("sandbox-stop", create_if_missing=True)
            sb = Sandbox.create("sleep", "900", app=app, timeout=600)
            current_session().transport.post(f"/v1/apps/{app.app_id}/stop", {})
            with pytest.raises(SandboxTerminatedError):
                sb.wait()
            app2 = cloudmodal.App.lookup("sandbox-shutdown", create_if_missing=True)
            Sandbox.create("sleep", "901", app=app2, timeout=600)
            eventually("the sandbox runs", lambda: any("sleep 901" in c for c in sandbox_procs().values()))
            service = sandboxes_of(handle)
            host_pids = {p.host.pid for p in service.live.values() if p.host is not None}
            host_pids |= {h.pid for h in service.standby}
    finally:
        handle.stop()

    def gone() -> bool:
        left = sandbox_procs()
        return not any("sleep 90" in c for c in left.values()) and not host_pids & set(left)

    eventually("the control plane's shutdown ended its sandboxes, their hosts and its standby", gone)


def test_cli_list_and_stop(app: cloudmodal.App) -> None:
    from typer.testing import CliRunner

    from cloudmodal.cli import sandbox_cmd

    sb = Sandbox.create("sleep", "300", app=app, timeout=60, tags={"cli": "yes"})
    runner = CliRunner()
    listed = runner.invoke(sandbox_cmd.app, ["list", "--json", "--tag", "cli=yes"])
    assert listed.exit_code == 0, listed.output
    assert [r["id"] for r in json.loads(listed.output)] == [sb.object_id]
    wide = runner.invoke(sandbox_cmd.app, ["list", "--wide", "--app-id", str(app.app_id)])
    assert sb.object_id in wide.output and "sleep 300" in wide.output
    stopped = runner.invoke(sandbox_cmd.app, ["stop", sb.object_id])
    assert stopped.exit_code == 0, stopped.output
    with pytest.raises(SandboxTerminatedError):
        sb.wait()
    missing = runner.invoke(sandbox_cmd.app, ["stop", "sb-nosuchsandbox"])
    assert missing.exit_code != 0
