"""Nothing is lost: worker deaths, control-plane restarts and inputs that kill their workers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import basic
import pytest
from sqlalchemy import text

from cloudmodal.client import session as session_mod
from cloudmodal.client.session import run_app
from cloudmodal.exception import WorkerCrashedError
from tests.ports import reserved_port


@pytest.fixture(scope="module")
def app(control_plane):
    with run_app(basic.app, show_logs=False) as running:
        yield running


def _live_worker_pids(cp, function_name: str) -> list[int]:
    with cp.db.read() as conn:
        rows = conn.execute(
            text(
                "select w.pid from worker w join function f on f.id = w.function_id where f.name = :n and w.state = 'ready' and w.pid is not null"
            ),
            {"n": function_name},
        ).all()
    return [r[0] for r in rows]


def test_sigkill_a_worker_mid_map_every_input_has_exactly_one_result(app, control_plane):
    cp = control_plane.cp
    n = 2000
    results = []
    killed: list[int] = []

    def killer() -> None:
        while len(results) < 300:
            time.sleep(0.01)
        pids = _live_worker_pids(cp, "slow_identity")
        assert pids, "no live worker to kill"
        os.kill(pids[0], signal.SIGKILL)
        killed.append(pids[0])

    t = threading.Thread(target=killer)
    t.start()
    for r in basic.slow_identity.map(range(n)):
        results.append(r)
    t.join()
    assert killed, "the worker was never killed"
    assert results == list(range(n))  # every input, once, in order
    with cp.db.read() as conn:
        call_id = conn.execute(
            text(
                "select call_id from input i join function f on f.id = i.function_id where f.name='slow_identity' order by i.id desc limit 1"
            )
        ).scalar_one()
        finals = conn.execute(
            text("select count(*), count(distinct idx) from output where call_id=:c and gen_index=-1"),
            {"c": call_id},
        ).one()
        retries_used = conn.execute(
            text("select coalesce(sum(attempts), 0), coalesce(sum(crashes), 0) from input where call_id=:c"),
            {"c": call_id},
        ).one()
    assert finals == (n, n)
    assert retries_used[0] == 0  # a worker death never consumes the user's Retries
    assert retries_used[1] >= 1  # ...but it is counted


def test_input_that_always_crashes_its_worker_ends_as_a_clear_error(app):
    with pytest.raises(WorkerCrashedError, match="died 3 times"):
        basic.crash.remote(1)
    assert basic.square.remote(2) == 4  # and everything else keeps working


def _start_server(home: Path, port: int, database_url: str) -> subprocess.Popen:
    env = dict(
        os.environ,
        CLOUDMODAL_HOME=str(home),
        CLOUDMODAL_LEASE_S="5",
        CLOUDMODAL_HEARTBEAT_S="0.5",
        CLOUDMODAL_WORKER_TIMEOUT_S="20",
    )
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cloudmodal.cli.main",
            "server",
            "start",
            "--foreground",
            "--port",
            str(port),
            "--database-url",
            database_url,
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + 60
    import httpx

    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.1)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    raise AssertionError(
        f"server did not start (exit {proc.returncode}): {proc.stdout.read().decode() if proc.stdout else ''}"
    )


def _member_token(home: Path) -> str:
    """A member token made with the CLI (as the owner, from server.json): it outlives a restart of the
    control plane, which revokes the owner token the killed one left in server.json."""
    env = {k: v for k, v in os.environ.items() if k not in ("CLOUDMODAL_SERVER_URL", "CLOUDMODAL_TOKEN")}
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "cloudmodal.cli.main",
            "token",
            "create",
            "--member",
            "--name",
            "restart test",
        ],
        env=dict(env, CLOUDMODAL_HOME=str(home)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    return p.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_restart_the_control_plane_mid_map(tmp_path, backend, request, monkeypatch):
    db = (
        f"sqlite:///{tmp_path / 'cp.db'}"
        if backend == "sqlite"
        else request.getfixturevalue("postgres_database")
    )
    # the port is free while the control plane is down: a reserved one (tests/ports.py), which nothing else
    # on the machine is handed out meanwhile, so the restart binds it again
    port = reserved_port()
    proc = _start_server(tmp_path, port, db)
    monkeypatch.setenv("CLOUDMODAL_SERVER_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("CLOUDMODAL_TOKEN", _member_token(tmp_path))
    session_mod.disconnect()
    results: list[int] = []
    restarted = threading.Event()
    map_ended = threading.Event()
    chaos_errors: list[BaseException] = []  # what went wrong in the thread, asserted on after it is joined

    def chaos() -> None:
        nonlocal proc
        try:
            while len(results) < 200:
                if map_ended.is_set():
                    return  # the map failed (or ended) before the kill: the main thread reports it
                time.sleep(0.01)
            os.killpg(proc.pid, signal.SIGKILL)  # the control plane dies hard; workers live on and retry
            proc.wait()
            time.sleep(1.0)
            proc = _start_server(tmp_path, port, db)
            restarted.set()
        except BaseException as e:
            chaos_errors.append(e)
            session = session_mod.current_session(required=False)
            if session is not None:  # the map stops retrying now rather than after its patience (minutes)
                session.transport.give_up_at = time.monotonic()

    try:
        with run_app(basic.app, show_logs=False):
            t = threading.Thread(target=chaos)
            t.start()
            try:
                for r in basic.slow_identity.map(range(1000)):
                    results.append(r)
            finally:
                # a failed restart makes the map fail too: the restart's error is the one to see, raised here
                # over the map's
                map_ended.set()
                t.join()
                assert not chaos_errors, f"killing or restarting the control plane failed: {chaos_errors!r}"
        assert restarted.is_set()
        assert results == list(range(1000))
    finally:
        session_mod.disconnect()
        subprocess.run(
            [sys.executable, "-m", "cloudmodal.cli.main", "server", "stop"],
            env=dict(os.environ, CLOUDMODAL_HOME=str(tmp_path)),
            capture_output=True,
        )
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        _kill_orphan_workers(port)


def _kill_orphan_workers(port: int) -> None:
    """Workers of the SIGKILLed control plane were not its children any more: stop them by their env."""
    for pid_dir in Path("/proc").iterdir():
        if not pid_dir.name.isdigit():
            continue
        try:
            env = (pid_dir / "environ").read_bytes()
        except OSError:
            continue
        if f"CLOUDMODAL_SERVER_URL=http://127.0.0.1:{port}".encode() in env:
            try:
                os.kill(int(pid_dir.name), signal.SIGKILL)
            except ProcessLookupError:
                pass
