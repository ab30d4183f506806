"""Schedules fire from real control-plane processes (``cloudmodal server start``) exactly once per tick: across
a SIGKILL and restart of the control plane (SQLite and PostgreSQL), and with two control planes on one
PostgreSQL database, the leader SIGKILLed and the standby taking over.

Every tick from the first to the last is accounted for exactly once: fired (a ``schedule.fired`` event and
its call, in one transaction) or skipped (listed in a ``schedule.skipped`` event: it fell in the outage and a
later one fired instead; missed runs are not made up, as on Modal). The assertions are on the set of tick
times, never on counts sampled after sleeps."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, select
from support import client_env

from cloudmodal.functions import FunctionCall
from cloudmodal.server import models
from tests.ports import reserved_port

APP_FILE = Path(__file__).parent / "apps" / "schedule_app.py"
PERIOD_S = 2.0
E = models.events
CA = models.calls


def _until(cond: Callable[[], Any], what: str, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("CLOUDMODAL_SERVER_URL", "CLOUDMODAL_TOKEN")}
    return dict(env, CLOUDMODAL_HOME=str(home), **extra)


def _start(home: Path, port: int, database_url: str, blob_dir: Path) -> subprocess.Popen[bytes]:
    """A real control plane (``cloudmodal server start --foreground``), in a process group of its own."""
    home.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [sys.executable, "-m", "cloudmodal.cli.main", "server", "start", "--foreground"]
        + ["--port", str(port), "--database-url", database_url],
        env=_env(home, CLOUDMODAL_BLOB_DIR=str(blob_dir), CLOUDMODAL_HEARTBEAT_S="0.5"),
        stdout=subprocess.DEVNULL,
        stderr=(home / "server.log").open("ab"),
        start_new_session=True,
    )

    def healthy() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"the control plane exited: {(home / 'server.log').read_text()[-3000:]}")
        try:
            return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    _until(healthy, "the control plane to answer", timeout=60)
    return proc


def _kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _member_token(home: Path) -> str:
    p = subprocess.run(
        [sys.executable, "-m", "cloudmodal.cli.main", "token", "create", "--member", "--name", "schedules"],
        env=_env(home),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    return p.stdout.strip().splitlines()[-1]


def _kill_orphan_workers(ports: list[int], homes: list[Path]) -> None:
    """Workers of a SIGKILLed control plane are not its children any more: stop them by their env (the
    server's URL; a warm spare that serves nothing yet has only the control plane's CLOUDMODAL_HOME)."""
    marks = [f"CLOUDMODAL_SERVER_URL=http://127.0.0.1:{port}\0".encode() for port in ports]
    marks += [f"CLOUDMODAL_HOME={home}\0".encode() for home in homes]
    for pid_dir in Path("/proc").iterdir():
        if not pid_dir.name.isdigit() or int(pid_dir.name) == os.getpid():
            continue
        try:
            env = (pid_dir / "environ").read_bytes()
        except OSError:
            continue
        if any(m in env for m in marks):
            try:
                os.kill(int(pid_dir.name), signal.SIGKILL)
            except ProcessLookupError:
                pass


def _deploy(name: str) -> dict[str, Any]:
    """Deploy a fresh copy of the schedule app (deploying changes the module's handles)."""
    spec = importlib.util.spec_from_file_location("schedule_app", APP_FILE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    info: dict[str, Any] = module.app.deploy(name=name)
    return info


class Ledger:
    """What the database says the schedule did: its ``schedule.set``/``.fired``/``.skipped`` events and calls."""

    def __init__(self, database_url: str, app_id: str) -> None:
        self.engine = create_engine(database_url)
        self.app_id = app_id

    def events(self, kind: str) -> list[Any]:
        with self.engine.connect() as conn:
            q = select(E).where(E.c.app_id == self.app_id, E.c.kind == kind).order_by(E.c.id)
            return list(conn.execute(q).all())

    def fired(self) -> list[float]:
        return [e.data["tick"] for e in self.events("schedule.fired")]

    def schedule_calls(self) -> set[str]:
        with self.engine.connect() as conn:
            q = select(CA.c.id).where(CA.c.app_id == self.app_id, CA.c.kind == "schedule")
            return {r[0] for r in conn.execute(q).all()}

    def check_each_tick_once(self, after: float) -> list[float]:
        """Every tick of the grid from the first to the last fired is fired once or skipped once (never both,
        never twice, none missing), each fired tick has its own call, and ticks fired after ``after`` (the
        outage's start) exist. Returns the fired ticks."""
        (set_event,) = self.events("schedule.set")
        first = set_event.data["next_fire_at"]
        fired_events = self.events("schedule.fired")
        fired = [e.data["tick"] for e in fired_events]
        skipped = [t for e in self.events("schedule.skipped") for t in e.data["ticks"]]
        assert all(not e.data["more"] for e in self.events("schedule.skipped"))
        dup = {t: n for t, n in Counter(fired + skipped).items() if n > 1}
        assert not dup, f"ticks fired or skipped more than once: {dup}"
        last = max(fired)
        n = round((last - first) / PERIOD_S) + 1
        grid = [first + k * PERIOD_S for k in range(n)]
        assert sorted(fired + skipped) == grid, (sorted(fired), sorted(skipped), grid)
        print(
            f"grid of {n} ticks from {first}: fired {[t - first for t in fired]}, skipped {[t - first for t in skipped]}"
        )
        call_ids = [e.data["call_id"] for e in fired_events]
        assert len(set(call_ids)) == len(call_ids)
        assert set(call_ids) == self.schedule_calls()  # no call without its event, nor the reverse
        assert any(t < after for t in fired) and sum(t > after for t in fired) >= 2
        return fired


@contextmanager
def _cleanup(procs: list[subprocess.Popen[bytes]], ports: list[int], homes: list[Path]) -> Iterator[None]:
    try:
        yield
    finally:
        for p in procs:
            _kill(p)
        _kill_orphan_workers(ports, homes)


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_a_schedule_fires_once_per_tick_across_a_sigkill_and_restart(
    tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    db = (
        f"sqlite:///{tmp_path / 'cp.db'}"
        if backend == "sqlite"
        else request.getfixturevalue("new_postgres_database")()
    )
    # the port is free for seconds while the control plane is down: a reserved one (tests/ports.py), which
    # nothing else on the machine is handed out meanwhile, so the restart binds it again
    home, port, blobs = tmp_path / "home", reserved_port(), tmp_path / "blobs"
    procs = [_start(home, port, db, blobs)]
    with _cleanup(procs, [port], [home]), client_env(f"http://127.0.0.1:{port}", _member_token(home)):
        app_id = _deploy("schedule-restart")["app_id"]
        ledger = Ledger(db, app_id)
        _until(lambda: len(ledger.fired()) >= 2, "two firings before the kill")
        killed_at = time.time()
        _kill(procs.pop())
        time.sleep(3 * PERIOD_S)  # down across several ticks
        procs.append(_start(home, port, db, blobs))
        _until(lambda: sum(t > killed_at for t in ledger.fired()) >= 3, "three firings after the restart")
        fired = ledger.check_each_tick_once(after=killed_at)
        # a firing is a normal call the user can look up by the id its event names
        last = ledger.events("schedule.fired")[-1].data["call_id"]
        assert FunctionCall.from_id(last).get(timeout=60) == "ticked"
        skipped = ledger.events("schedule.skipped")
        assert skipped, f"no tick was missed while the control plane was down (fired: {fired})"


def test_two_control_planes_on_one_postgres_database_fire_each_tick_once(
    tmp_path: Path, new_postgres_database: Callable[[], str]
) -> None:
    db = new_postgres_database()
    blobs = tmp_path / "blobs"  # control planes sharing a database share its blob store
    ports = [reserved_port(), reserved_port()]  # b's is bound only once a leads (tests/ports.py)
    a = _start(tmp_path / "a", ports[0], db, blobs)
    procs = [a]
    with _cleanup(procs, ports, [tmp_path / "a", tmp_path / "b"]):
        _until(lambda: httpx.get(f"http://127.0.0.1:{ports[0]}/healthz").json()["reconciling"], "a to lead")
        b = _start(tmp_path / "b", ports[1], db, blobs)
        procs.append(b)
        assert httpx.get(f"http://127.0.0.1:{ports[1]}/healthz").json()["reconciling"] is False
        # deployed through the standby: the leader fires it
        with client_env(f"http://127.0.0.1:{ports[1]}", _member_token(tmp_path / "a")):
            app_id = _deploy("schedule-two")["app_id"]
        ledger = Ledger(db, app_id)
        _until(lambda: len(ledger.fired()) >= 2, "two firings by the leader")
        killed_at = time.time()
        _kill(a)  # the leader dies hard; the standby takes over
        _until(
            lambda: httpx.get(f"http://127.0.0.1:{ports[1]}/healthz").json()["reconciling"], "b to take over"
        )
        _until(lambda: sum(t > killed_at for t in ledger.fired()) >= 3, "three firings by the new leader")
        ledger.check_each_tick_once(after=killed_at)
