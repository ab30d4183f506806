"""`cloudmodal container list|exec` and `cloudmodal shell` into a running container on a cloud node, end to end,
with the real command line as a user runs it.

The function keeps one container up (``min_containers=1``) on a fake AWS node (moto for the cloud's API, a real
``sshd`` on this machine as the node), bootstrapped over SSH and reaching the control plane through the reverse
tunnel (the default, a laptop's control plane). Then:

- ``container list`` shows that container with its cloud and instance (the id moto gave the node);
- ``container exec`` runs the command inside the node's worker: its parent is the worker process the node's
  bootstrap started (the pid file on the node), its ``HOME`` is the node's, and it has the function's env (a
  marker this test process does not have) and the worker's id;
- the worker's control-plane token is in none of what the command can read cheaply: its environment
  (``/proc/self/environ``, ``env``) and the worker's (``/proc/$PPID/environ``). Tokens are recognized by their
  hash in the control plane's tokens table (the worker's, ``worker:<id>``, among them); the control is the same
  check in a local shell (``cloudmodal shell FILE.py::NAME``), which finds the CLI's own token;
- stdin streams (each line's echo is read before the next is written), exit statuses propagate, a PTY works
  (``cloudmodal shell ta-...``);
- a member token scoped to another app is refused; one scoped to the app is admitted (the control).

Real control plane, drivers, SkyPilot, boto3, ssh, sshd and worker; moto on 127.0.0.1 (see ``cloud_support``).
"""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
import termios
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cloud_support import (
    REGION,
    cloud_plane,
    cloud_provider,
    moto_instances,
    node_ssh_config,
    wait_for,
    write_catalog,
)
from exec_support import assert_cat_echoes, read_until
from sqlalchemy import select as sql_select

import cloudmodal
from cloudmodal.providers.nodes import worker_key
from cloudmodal.server import models
from cloudmodal.server.app import ServerHandle
from cloudmodal.server.auth import hash_token
from tests.fakes.sshd import sshd_missing, stand_in_node

pytestmark = pytest.mark.skipif(bool(sshd_missing()), reason=sshd_missing() or "")

MARKER = "exec-cloud-marker-" + "Zq7w" * 3
TOKEN_RE = re.compile(r"cm_[A-Za-z0-9_\-]{20,}")
# What the command reads: its own environment, twice over, and its parent's (the worker's) environment.
# (``cat`` opens the files itself: a file a shell opened before exec'ing the reader would be the shell's.)
PROBE = (
    'echo "PPID=$PPID"; echo "HOME=$HOME"; echo "--- self"; cat /proc/self/environ | tr "\\0" "\\n"; echo; '
    'echo "--- env"; env; echo "--- parent"; cat /proc/$PPID/environ | tr "\\0" "\\n"; echo; exit 5'
)

APP_SOURCE = """
import os

import cloudmodal

app = cloudmodal.App("{name}")


@app.function(
    gpu="H100:8", spot="never", min_containers=1, max_containers=1, scaledown_window=600,
    env={{"EXEC_CLOUD_MARKER": "{marker}"}},
)
def where() -> dict:
    return {{"worker": os.environ.get("CLOUDMODAL_WORKER_ID"), "pid": os.getpid(), "home": os.environ.get("HOME")}}
"""


@dataclass
class Node:
    handle: ServerHandle
    app_name: str
    app_file: Path
    wid: str
    where: dict[str, Any]
    node: Any  # tests.fakes.sshd.StandInNode
    instance_id: str

    def env(self, token: str | None = None) -> dict[str, str]:
        env = dict(os.environ)
        env["CLOUDMODAL_SERVER_URL"] = self.handle.url
        env["CLOUDMODAL_TOKEN"] = token or self.handle.token
        env.pop("CLOUDMODAL_CONFIG", None)
        return env

    def cli(self, *args: str, token: str | None = None, stdin: str = "") -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "cloudmodal.cli.main", *args],
            input=stdin,
            capture_output=True,
            text=True,
            env=self.env(token),
            timeout=180,
        )


@pytest.fixture(scope="module")
def cloud_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    """One control plane whose one GPU cloud is AWS (moto), its nodes the stand-in; the app deployed, its one
    container up on the node and ready."""
    from cloudmodal.providers.aws import AwsNodes
    from tests.fakes.moto_ec2 import MotoEc2

    base = tmp_path_factory.mktemp("execcloud")
    name = "exec-cloud-" + base.name.replace("_", "-").lower()[-12:]
    module_name = "exec_cloud_app_" + re.sub(r"\W", "_", base.name)
    app_dir = base / "app"
    app_dir.mkdir()
    app_file = app_dir / f"{module_name}.py"
    app_file.write_text(APP_SOURCE.format(name=name, marker=MARKER))
    with (
        pytest.MonkeyPatch.context() as mp,
        stand_in_node(base / "node") as node,
        MotoEc2.start(regions=[REGION]) as fake,
    ):
        mp.setenv("HOME", str(base / "home"))
        catalog = write_catalog(base / "catalog")
        mp.setenv("CLOUDMODAL_CATALOG_DIR", str(catalog))
        for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE"):
            mp.delenv(key, raising=False)
        for key, value in fake.env().items():
            mp.setenv(key, value)
        driver = AwsNodes(regions=[REGION], catalog_dir=str(catalog))
        provider = cloud_provider(driver, base / "aws", node, node_ssh_config(base, node.port))
        mp.syspath_prepend(str(app_dir))
        try:
            with cloud_plane(base / "cp", {"aws": provider}) as handle:
                mod = importlib.import_module(module_name)
                mod.app.deploy()
                where = cloudmodal.Function.from_name(name, "where").remote()
                wid = where["worker"]
                W = models.workers  # noqa: N806
                with handle.cp.db.read() as conn:
                    row = conn.execute(W.select().where(W.c.id == wid)).mappings().one()
                (inst,) = moto_instances(fake)
                assert row["provider"] == "aws" and row["instance_id"] == inst["InstanceId"], dict(row)
                yield Node(handle, name, app_file, wid, where, node, inst["InstanceId"])
        finally:
            sys.modules.pop(module_name, None)


def node_worker_pid(node: Any, wid: str) -> int | None:
    """The pid of worker ``wid`` as its node's bootstrap wrote it (on the node)."""
    path = node.home / ".cloudmodal" / "workers" / f"{worker_key(wid)}.pid"
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def known_tokens(handle: ServerHandle) -> dict[str, str]:
    """Hash -> scope of every token the control plane issued (the worker's among them)."""
    t = models.tokens
    with handle.cp.db.read() as conn:
        return {h: s for h, s in conn.execute(sql_select(t.c.token_hash, t.c.scope))}


def tokens_in(text: str, known: dict[str, str]) -> list[str]:
    return [known[hash_token(c)] for c in TOKEN_RE.findall(text) if hash_token(c) in known]


def section(out: str, name: str) -> str:
    """The lines of ``out`` under ``--- name`` up to the next section."""
    return out.split(f"--- {name}\n", 1)[1].split("\n--- ", 1)[0]


# -- the tests -----------------------------------------------------------------------------------------------
def test_list_shows_the_cloud_container_with_its_instance(cloud_node: Node) -> None:
    r = cloud_node.cli("container", "list", "--json")
    assert r.returncode == 0, r.stderr
    (row,) = [x for x in json.loads(r.stdout) if x["id"] == cloud_node.wid]
    assert row["app_name"] == cloud_node.app_name and row["function_name"] == "where"
    assert row["provider"] == "aws" and row["state"] == "ready", row
    assert row["instance_id"] == cloud_node.instance_id and row["instance_id"].startswith("i-"), row
    assert row["region"] == REGION and row["instance_type"] == "p5.48xlarge", row
    # the table, as piped (tab-separated, every column): the same container, its cloud and instance
    table = cloud_node.cli("container", "list")
    assert table.returncode == 0, table.stderr
    header, *lines = table.stdout.splitlines()
    line = next(ln for ln in lines if ln.startswith(cloud_node.wid))
    cells = dict(zip(header.split("\t"), line.split("\t"), strict=True))
    assert cells["Provider"] == "aws" and cells["Instance"] == cloud_node.instance_id, cells
    assert cells["Region"] == REGION, cells
    # a member scoped to another app does not see it (the control: the owner just did)
    other = cloud_node.handle.cp.tokens.create("member:some-other-app", "exec cloud test")
    r = cloud_node.cli("container", "list", "--json", token=other)
    assert r.returncode == 0, r.stderr
    assert cloud_node.wid not in r.stdout


def test_exec_runs_in_the_nodes_worker_without_its_token(cloud_node: Node) -> None:
    r = cloud_node.cli("container", "exec", "--no-pty", cloud_node.wid, "sh", "-c", PROBE)
    assert r.returncode == 5, (r.returncode, r.stdout, r.stderr)  # the remote status, propagated
    out = r.stdout
    # On the node, in its worker: the command's parent is the process the node's bootstrap started (its pid
    # file on the node), which ran the function; HOME is the node's (sshd's SetEnv), not this process's.
    pid = node_worker_pid(cloud_node.node, cloud_node.wid)
    assert pid is not None and f"PPID={pid}\n" in out and pid == cloud_node.where["pid"], (pid, out[:300])
    assert f"HOME={cloud_node.node.home}\n" in out and str(cloud_node.node.home) != os.environ["HOME"]
    env = section(out, "self")
    assert f"CLOUDMODAL_WORKER_ID={cloud_node.wid}" in env.splitlines()
    assert f"EXEC_CLOUD_MARKER={MARKER}" in env.splitlines()  # the function's env: this is its container
    assert "EXEC_CLOUD_MARKER" not in os.environ  # ... which this test process does not have
    assert f"CLOUDMODAL_WORKER_ID={cloud_node.wid}" in section(out, "env").splitlines()
    # The worker's control-plane token: not in the command's environment, nor in the worker's.
    parent = section(out, "parent")
    assert f"CLOUDMODAL_WORKER_ID={cloud_node.wid}" in parent.splitlines()  # the worker's own, was readable
    known = known_tokens(cloud_node.handle)
    assert f"worker:{cloud_node.wid}" in known.values()
    assert tokens_in(env + section(out, "env"), known) == [], "a control-plane token in the command's env"
    # The node's bootstrap started the worker with its token in its environment: blanked there (exec_host's
    # scrub_initial_environ) before any session, or the session would read it here.
    assert tokens_in(parent, known) == [], "the worker's token is in its /proc/<pid>/environ"
    assert tokens_in(out + r.stderr, known) == []
    assert "CLOUDMODAL_TOKEN=" not in out


def test_the_same_check_in_a_local_shell_finds_the_token(cloud_node: Node) -> None:
    """The control of the token check: ``cloudmodal shell FILE.py::NAME`` (a shell on this machine in the
    function's environment) has the CLI's token in its environment, and the same probe finds it."""
    r = cloud_node.cli("shell", f"{cloud_node.app_file}::where", "--cmd", PROBE)
    assert r.returncode == 5, (r.returncode, r.stderr)
    env = section(r.stdout, "self")
    assert f"EXEC_CLOUD_MARKER={MARKER}" in env.splitlines()  # the function's env, here too
    assert f"CLOUDMODAL_TOKEN={cloud_node.handle.token}" in env.splitlines()
    assert tokens_in(env, known_tokens(cloud_node.handle)) == ["owner"]
    assert f"HOME={cloud_node.node.home}\n" not in r.stdout  # not on the node


def test_stdin_streams_to_the_node(cloud_node: Node) -> None:
    assert_cat_echoes(
        [sys.executable, "-m", "cloudmodal.cli.main", "container", "exec", "--no-pty", cloud_node.wid, "cat"],
        cloud_node.env(),
        "to the node",
    )


def test_shell_on_a_pty_on_the_node(cloud_node: Node) -> None:
    master, slave = os.openpty()
    env = cloud_node.env()
    env["TERM"] = "xterm"
    p = subprocess.Popen(
        [sys.executable, "-m", "cloudmodal.cli.main", "shell", cloud_node.wid],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env=env,
        start_new_session=True,
    )
    os.close(slave)
    try:
        wait_for(
            lambda: not termios.tcgetattr(master)[3] & termios.ECHO, 60, "the local terminal in raw mode"
        )
        os.write(master, b"tty; echo ID=$CLOUDMODAL_WORKER_ID; echo TERM=$TERM\n")
        seen = read_until(master, b"TERM=xterm")
        assert re.search(rb"/dev/pts/\d+", seen), seen  # a real terminal inside the container
        assert f"ID={cloud_node.wid}".encode() in seen
        os.write(master, b"exit 3\n")
        assert p.wait(60) == 3
    finally:
        if p.poll() is None:
            p.kill()
        os.close(master)


def test_a_member_of_another_app_is_refused(cloud_node: Node) -> None:
    cp = cloud_node.handle.cp
    other = cp.tokens.create("member:some-other-app", "exec cloud test")
    refused = cloud_node.cli("container", "exec", "--no-pty", cloud_node.wid, "echo", "ran", token=other)
    assert refused.returncode == 1 and "may not use app" in refused.stderr, refused.stderr
    assert "ran" not in refused.stdout
    # the control: a member scoped to this app is admitted
    member = cp.tokens.create(f"member:{cloud_node.app_name}", "exec cloud test")
    ok = cloud_node.cli("container", "exec", "--no-pty", cloud_node.wid, "echo", "ran", token=member)
    assert ok.returncode == 0 and ok.stdout == "ran\n", (ok.returncode, ok.stderr)
