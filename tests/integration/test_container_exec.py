"""`cloudmodal container list|exec|stop` and `cloudmodal shell APP.FUNCTION|ta-...`: commands and shells inside a
real running worker of a deployed app, through a real control plane, with the real command line as a user runs it.

What runs is checked from inside: the function's secret is in the command's environment and the worker's
control-plane token is not (a recognizer that finds the owner's token in the same kind of text is the control);
its working directory is the function's; the volume the function wrote to is mounted there and not on the host;
stdin streams (each line's echo is read before the next is written); exit statuses propagate; an interactive
shell runs on a real PTY driven through a pseudo-terminal pair, and the same probe without one shows no
terminal. Access: a member scoped to another app and a worker token are refused, a member scoped to the app is
admitted. Stopping the container ends an open session with EOF and a status.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
import termios
import time
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

import httpx
import msgpack
import pytest
from exec_support import assert_cat_echoes, read_until
from sqlalchemy import select as sql_select
from support import start_server, use_server

import cloudmodal
from cloudmodal.server import models
from cloudmodal.server.app import ServerHandle
from cloudmodal.server.auth import hash_token

SECRET_VALUE = "exec-probe-" + "k3Vq" * 4
TOKEN_RE = re.compile(r"cm_[A-Za-z0-9_\-]{20,}")

APP_SOURCE = """
import os

import cloudmodal

app = cloudmodal.App("{name}")
vol = cloudmodal.Volume.from_name("{name}-vol", create_if_missing=True)


@app.function(
    min_containers=1,
    secrets=[cloudmodal.Secret.from_dict({{"EXEC_PROBE_VAR": "{secret}"}})],
    volumes={{"{mount}": vol}},
)
def where() -> dict:
    with open("{mount}/hello.txt", "w") as f:
        f.write("written by the function")
    return {{"cwd": os.getcwd(), "pid": os.getpid()}}


@app.function(min_containers=1)
def spare() -> None:  # a container of its own for the stop test: the others keep theirs
    pass
"""


def eventually(what: str, fn: Callable[[], Any], timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s (last: {value!r})")
        time.sleep(0.05)


class Plane:
    def __init__(
        self, handle: ServerHandle, app_name: str, wid: str, where: dict[str, Any], mount: str
    ) -> None:
        self.handle = handle
        self.app_name = app_name
        self.wid = wid
        self.where = where
        self.mount = mount

    def env(self, token: str | None = None) -> dict[str, str]:
        env = dict(os.environ)
        env["CLOUDMODAL_SERVER_URL"] = self.handle.url
        env["CLOUDMODAL_TOKEN"] = token or self.handle.token
        env.pop("CLOUDMODAL_CONFIG", None)
        return env

    def cli(
        self,
        *args: str,
        module: str = "cloudmodal.cli.container_cmd",
        token: str | None = None,
        stdin: str = "",
        timeout: float = 120,
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", module, *args],
            input=stdin,
            capture_output=True,
            text=True,
            env=self.env(token),
            timeout=timeout,
        )


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Plane]:
    state = tmp_path_factory.mktemp("exec")
    name = "exec-probe-" + state.name.replace("_", "-").lower()[-12:]
    mount = str(state / "mnt" / "data")
    d = state / "app"
    d.mkdir()
    module_name = "exec_probe_app_" + re.sub(r"\W", "_", state.name)
    (d / f"{module_name}.py").write_text(APP_SOURCE.format(name=name, secret=SECRET_VALUE, mount=mount))
    handle = start_server(state, f"sqlite:///{state / 'cp.db'}")
    sys.path.insert(0, str(d))
    try:
        with use_server(handle):
            mod: ModuleType = importlib.import_module(module_name)
            mod.app.deploy()
            where = cloudmodal.Function.from_name(name, "where").remote()

            def ready_worker() -> str | None:
                with handle.cp.db.read() as conn:
                    rows = conn.execute(
                        sql_select(models.workers.c.id, models.workers.c.pid).where(
                            models.workers.c.state == "ready"
                        )
                    ).all()
                return next((r[0] for r in rows if r[1] == where["pid"]), None)

            wid = eventually("the worker that served the call is ready", ready_worker)
            yield Plane(handle, name, wid, where, mount)
    finally:
        sys.path.remove(str(d))
        sys.modules.pop(module_name, None)
        handle.stop()


def _worker_token_hashes(handle: ServerHandle) -> dict[str, str]:
    t = models.tokens
    with handle.cp.db.read() as conn:
        return {h: s for h, s in conn.execute(sql_select(t.c.token_hash, t.c.scope))}


def _tokens_in(text: str, known: dict[str, str]) -> list[str]:
    return [known[hash_token(c)] for c in TOKEN_RE.findall(text) if hash_token(c) in known]


def test_list_shows_the_container_to_whom_may_see_it(plane: Plane) -> None:
    r = plane.cli("list", "--json")
    assert r.returncode == 0, r.stderr
    assert plane.wid in r.stdout and plane.app_name in r.stdout and '"where"' in r.stdout
    # a member scoped to another app does not see it (the control: the owner just did)
    other = plane.handle.cp.tokens.create("member:some-other-app", "exec test")
    r = plane.cli("list", "--json", token=other)
    assert r.returncode == 0, r.stderr
    assert plane.wid not in r.stdout


def test_exec_has_the_functions_env_not_the_workers_token(plane: Plane) -> None:
    r = plane.cli(
        "exec", "--no-pty", plane.wid, "sh", "-c", "tr '\\0' '\\n' < /proc/self/environ; env; exit 7"
    )
    assert r.returncode == 7, (r.returncode, r.stderr)  # the remote status, propagated
    assert f"EXEC_PROBE_VAR={SECRET_VALUE}" in r.stdout  # the function's secret: this is its container
    assert f"CLOUDMODAL_WORKER_ID={plane.wid}" in r.stdout
    assert "EXEC_PROBE_VAR" not in os.environ  # ... which this test process does not have
    known = _worker_token_hashes(plane.handle)
    assert f"worker:{plane.wid}" in known.values()
    assert _tokens_in(r.stdout + r.stderr, known) == []
    # the recognizer's control: it finds a real token in the same kind of text
    assert _tokens_in(f"CLOUDMODAL_TOKEN={plane.handle.token}\n", known) == ["owner"]
    assert "CLOUDMODAL_TOKEN=" not in r.stdout


def test_exec_runs_where_the_function_runs(plane: Plane) -> None:
    r = plane.cli("exec", "--no-pty", plane.wid, "sh", "-c", f'pwd; cat "{plane.mount}/hello.txt"')
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [plane.where["cwd"], "written by the function"]
    # the volume is mounted in the worker's namespace, not on this host (the file exists only in there)
    assert not os.path.exists(os.path.join(plane.mount, "hello.txt"))
    missing = plane.cli("exec", "--no-pty", plane.wid, "cat", f"{plane.mount}/no-such-file")
    assert missing.returncode == 1 and "No such file" in missing.stderr


def test_stdin_streams_and_eof_ends_it(plane: Plane) -> None:
    assert_cat_echoes(
        [sys.executable, "-m", "cloudmodal.cli.container_cmd", "exec", "--no-pty", plane.wid, "cat"],
        plane.env(),
        "through the container",
    )


@pytest.mark.parametrize("how", ["shell APP.FUNCTION", "container exec ID"])
def test_interactive_shell_on_a_pty(plane: Plane, how: str) -> None:
    master, slave = os.openpty()
    if how == "shell APP.FUNCTION":
        argv = [sys.executable, "-m", "cloudmodal.cli.main", "shell", f"{plane.app_name}.where"]
    else:
        argv = [sys.executable, "-m", "cloudmodal.cli.container_cmd", "exec", plane.wid, "sh"]
    env = plane.env()
    env["TERM"] = "xterm"
    p = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True)
    os.close(slave)
    try:
        # typed once the command line has put its terminal in raw mode (a user types at the shell's prompt)
        eventually("the local terminal in raw mode", lambda: not termios.tcgetattr(master)[3] & termios.ECHO)
        os.write(master, b"echo PWD=$PWD; tty; echo TERM=$TERM\n")
        seen = read_until(master, b"TERM=xterm")
        assert f"PWD={plane.where['cwd']}".encode() in seen
        assert re.search(rb"/dev/pts/\d+", seen), seen  # a real terminal inside the container
        os.write(master, b"exit 3\n")
        assert p.wait(60) == 3
    finally:
        if p.poll() is None:
            p.kill()
        os.close(master)
    # the control: without a PTY the same probe finds no terminal
    r = plane.cli("exec", "--no-pty", plane.wid, "tty")
    assert r.returncode == 1 and "not a tty" in r.stdout


def test_access_refused_to_other_apps_members_and_workers(plane: Plane) -> None:
    cp = plane.handle.cp
    tokens = {
        "owner": plane.handle.token,
        "member of the app": cp.tokens.create(f"member:{plane.app_name}", "exec test"),
        "member of another app": cp.tokens.create("member:some-other-app", "exec test"),
        "the worker itself": cp.tokens.create(f"worker:{plane.wid}", "exec test"),
    }
    body = msgpack.packb({"op": "start", "argv": ["true"]})
    status = {}
    for who, token in tokens.items():
        r = httpx.post(
            f"{plane.handle.url}/v1/containers/{plane.wid}/exec",
            content=body,
            headers={"authorization": f"Bearer {token}", "content-type": "application/msgpack"},
            timeout=30,
        )
        status[who] = r.status_code
    assert status == {
        "owner": 200,
        "member of the app": 200,
        "member of another app": 403,
        "the worker itself": 403,
    }
    # a worker token cannot take another worker's commands either (the control: its own are answered)
    headers = {
        "authorization": f"Bearer {tokens['the worker itself']}",
        "content-type": "application/msgpack",
    }
    other = httpx.post(
        f"{plane.handle.url}/v1/workers/ta-other/exec/commands",
        content=msgpack.packb({}),
        headers=headers,
        timeout=30,
    )
    own = httpx.post(
        f"{plane.handle.url}/v1/workers/{plane.wid}/exec/commands",
        content=msgpack.packb({}),
        headers=headers,
        timeout=30,
    )
    assert (other.status_code, own.status_code) == (403, 200)
    # through the command line: a clear refusal, naming the app
    refused = plane.cli("exec", "--no-pty", plane.wid, "true", token=tokens["member of another app"])
    assert refused.returncode == 1 and "may not use app" in refused.stderr
    assert plane.cli("exec", "--no-pty", plane.wid, "true", token=tokens["member of the app"]).returncode == 0


def test_stopping_the_container_ends_an_open_session(plane: Plane) -> None:
    def spare_worker() -> str | None:
        r = plane.cli("list", "--json")
        rows = json.loads(r.stdout) if r.returncode == 0 else []
        return next((x["id"] for x in rows if x["function_name"] == "spare" and x["state"] == "ready"), None)

    wid = eventually("a ready container of spare (min_containers=1)", spare_worker, timeout=120)
    p = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cloudmodal.cli.container_cmd",
            "exec",
            "--no-pty",
            wid,
            "sh",
            "-c",
            "echo started; sleep 600",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=plane.env(),
        text=True,
    )
    assert p.stdout is not None
    try:
        assert p.stdout.readline() == "started\n"
        assert p.poll() is None  # the control: it runs until the container stops
        r = plane.cli("stop", "-y", wid)
        assert r.returncode == 0, r.stderr
        out, err = p.communicate(timeout=60)
        assert p.returncode in (129, 137), (p.returncode, err)  # hung up (SIGHUP), or killed with it
        assert "stopping" in err or "stopped" in err, err
    finally:
        if p.poll() is None:
            p.kill()
    # the stopped container takes no new sessions, with a message naming the fix
    r = plane.cli("exec", "--no-pty", wid, "true")
    assert r.returncode != 0 and "container list" in r.stderr
