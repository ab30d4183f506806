"""Two control-plane replicas on one PostgreSQL behind one address (a TCP proxy, as a load balancer would be):
the reconciling one is SIGKILLed in the middle of a map, with inputs held by its workers, and the map completes
through the other, every result once and in order. Real processes: two control planes, their workers, the
proxy; the client and the workers know only the proxy's address."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import failover_app
import httpx
import pytest
from sqlalchemy import select
from support import client_env
from tcp_proxy import TcpProxy

from cloudmodal.client.session import run_app
from cloudmodal.server import models
from cloudmodal.server.auth import TokenStore
from cloudmodal.server.db import Database
from cloudmodal.server.states import InputState, WorkerState

HERE = Path(__file__).parent
N = 40  # inputs of the map
K = 10  # inputs 0..K-1 run at once; K.. wait for the gate, which opens only after the kill
W = models.workers
I = models.inputs  # noqa: E741
STATE_TIMEOUT_S = 120.0


def _until(cond: Callable[[], Any], timeout: float = STATE_TIMEOUT_S, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(0.05)
    got = cond()
    assert got, f"timed out waiting for {what or cond}"
    return got


@dataclass
class Replica:
    proc: subprocess.Popen[str]
    url: str
    log: Path

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def health(self) -> dict[str, Any] | None:
        try:
            return httpx.get(self.url + "/healthz", timeout=2).json()
        except (httpx.HTTPError, ValueError):
            return None

    def log_tail(self) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-40:])
        except OSError:
            return ""


def _start_replica(state_dir: Path, public_url: str, env: dict[str, str]) -> Replica:
    state_dir.mkdir(parents=True, exist_ok=True)
    log = state_dir / "replica.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, str(HERE / "replica_server.py"), str(state_dir), public_url],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
    line: list[str] = []
    reader = threading.Thread(target=lambda: line.append(proc.stdout.readline() if proc.stdout else ""))
    reader.start()
    reader.join(timeout=60)
    if not line or not line[0].startswith("LISTENING "):
        proc.kill()
        proc.wait()
        raise AssertionError(f"replica did not start: {line!r}\n{log.read_text(errors='replace')}")
    return Replica(proc, line[0].split()[1], log)


MARK = "FAILOVER_TEST_MARK"  # in the replicas' environment, and so in their workers' (at exec)


def _worker_processes(db: Database, mark: str) -> dict[str, int]:
    """Worker id -> pid of every worker that registered and whose process still runs. Only processes of this
    test's replicas count (their environment carries ``mark``): a reused pid is never taken for a worker."""
    with db.read() as conn:
        rows = conn.execute(select(W.c.id, W.c.pid).where(W.c.pid.is_not(None))).all()
    return {wid: pid for wid, pid in rows if _is_ours(pid, mark)}


def _is_ours(pid: int, mark: str) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = f.read().split(b"\0")
        with open(f"/proc/{pid}/stat") as f:
            zombie = f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return False
    return not zombie and f"{MARK}={mark}".encode() in env


@dataclass
class MapRun:
    """The map, consumed on a thread of its own so the test can wait for states while it runs."""

    results: list[int] = field(default_factory=list)
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def run(self, gate: str) -> None:
        try:
            for r in failover_app.gated_square.map(range(N), [gate] * N, [K] * N):
                with self.lock:
                    self.results.append(r)
        except BaseException as e:
            self.error = e
        finally:
            self.done.set()

    def count(self) -> int:
        with self.lock:
            return len(self.results)


@dataclass
class Cluster:
    proxy: TcpProxy
    a: Replica  # started first: it reconciles
    b: Replica
    db: Database
    mark: str


@pytest.fixture
def cluster(tmp_path: Path, new_postgres_database: Callable[[], str]) -> Iterator[Cluster]:
    url = new_postgres_database()
    mark = secrets.token_hex(8)
    # The proxy first: its address is the replicas' public one, handed to their workers. Its backends are
    # filled in once the replicas listen (nothing connects before).
    proxy = TcpProxy()
    env = {k: v for k, v in os.environ.items() if k not in ("CLOUDMODAL_SERVER_URL", "CLOUDMODAL_TOKEN")}
    env |= {
        "CLOUDMODAL_DATABASE_URL": url,
        # replicas on one database share its secret key and blob store
        "CLOUDMODAL_SECRET_KEY_FILE": str(tmp_path / "secret.key"),
        "CLOUDMODAL_BLOB_DIR": str(tmp_path / "blobs"),
        MARK: mark,
    }
    started: list[Replica] = []
    db: Database | None = None
    try:
        a = _start_replica(tmp_path / "a", proxy.url, env)
        started.append(a)
        _until(lambda: (a.health() or {}).get("reconciling"), what="replica a to reconcile")
        b = _start_replica(tmp_path / "b", proxy.url, env)
        started.append(b)
        _until(lambda: b.health() is not None, what="replica b to answer")
        proxy.set_backends([("127.0.0.1", a.port), ("127.0.0.1", b.port)])
        proxy.start()
        db = Database(url)
        yield Cluster(proxy, started[0], started[1], db, mark)
    finally:
        for r in started:
            if r.proc.poll() is None:
                r.proc.send_signal(signal.SIGTERM)  # its reconciler stops the workers it watches
        for r in started:
            try:
                r.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                r.proc.kill()
                r.proc.wait()
        # workers nobody watches any more (the killed replica's adopted ones): ours, by their environment
        if db is not None:
            for pid in _worker_processes(db, mark).values():
                try:
                    os.killpg(pid, signal.SIGKILL)  # each worker leads its own process group
                except OSError:
                    pass
            db.dispose()
        proxy.close()


def _events(db: Database, kind: str) -> list[Any]:
    E = models.events  # noqa: N806
    with db.read() as conn:
        return list(conn.execute(select(E).where(E.c.kind == kind).order_by(E.c.id)))


def _workers(db: Database) -> dict[str, Any]:
    with db.read() as conn:
        return {r.id: r for r in conn.execute(select(W))}


@pytest.mark.parametrize("machine_dies", [False, True], ids=["process-killed", "machine-dies"])
def test_the_map_completes_through_the_other_replica_when_one_is_killed(
    cluster: Cluster, tmp_path: Path, machine_dies: bool
) -> None:
    """The reconciling replica is SIGKILLed while its workers hold inputs. ``process-killed``: only the control
    plane's process dies; its workers (processes of their own session) reconnect to the address, the other
    replica adopts them and they finish what they hold. ``machine-dies``: its workers die with it; the other
    replica writes them off once they are silent, requeues what they held and starts workers of its own."""
    c = cluster
    proxy, a, b, db = c.proxy, c.a, c.b, c.db
    assert (a.health() or {}).get("reconciling") is True and (b.health() or {}).get("reconciling") is False
    token = TokenStore(db).create("owner", "failover test client")  # shared database: good on both replicas
    gate = tmp_path / "gate"
    run = MapRun()
    with client_env(proxy.url, token), run_app(failover_app.app, show_logs=False):
        consumer = threading.Thread(target=run.run, args=(str(gate),), daemon=True)
        consumer.start()
        # the ungated inputs' results are back, and the gated ones are held by a's workers, mid-run
        _until(lambda: run.count() >= K or run.done.is_set(), what="the first results")
        assert run.error is None, run.error
        assert run.count() == K  # nothing past the gate ran

        def held() -> dict[int, str]:
            with db.read() as conn:
                q = select(I.c.idx, I.c.worker_id).where(I.c.state == InputState.CLAIMED, I.c.idx >= K)
                return {r.idx: r.worker_id for r in conn.execute(q)}

        held_at_kill = _until(held, what="gated inputs held by workers")
        holders = set(held_at_kill.values())

        # both of a's workers (max_containers=2, and a backlog for more) run: none starts after the kill
        def both() -> dict[str, int] | None:
            got = _worker_processes(db, c.mark)
            return got if len(got) == 2 else None

        a_workers = _until(both, what="a's two workers")
        assert holders and holders <= set(a_workers), (holders, a_workers)
        routed_before = list(proxy.connections)
        assert routed_before[0] > 0 and routed_before[1] > 0, routed_before  # both replicas served

        a.proc.send_signal(signal.SIGKILL)
        a.proc.wait(timeout=30)
        if machine_dies:
            for pid in a_workers.values():
                os.killpg(pid, signal.SIGKILL)  # each worker leads its own process group
        killed_at = time.time()
        before_kill = run.count()

        _until(lambda: (b.health() or {}).get("reconciling"), what="replica b to take over")
        adopted = lambda: {e.data["worker_id"] for e in _events(db, "worker.adopted")} >= holders  # noqa: E731
        _until(adopted, what="replica b to adopt a's workers")
        if machine_dies:
            # silent for worker_timeout_s: written off, what they held requeued
            _until(
                lambda: all(_workers(db)[w].state == WorkerState.STOPPED for w in holders),
                what="a's dead workers written off",
            )
        else:
            # they reconnected to the address, so to b: their heartbeats reach it
            _until(
                lambda: all(_workers(db)[w].last_heartbeat > killed_at + 1 for w in holders),
                what="a's workers heartbeating to b",
            )
        gate.touch()  # the held inputs may finish now: only after the take-over
        _until(run.done.is_set, timeout=240, what="the map to complete")
        assert run.error is None, f"{run.error!r}\n--- b:\n{b.log_tail()}\n--- a:\n{a.log_tail()}"

    assert run.results == [x * x for x in range(N)]  # every result, once, in order
    assert before_kill == K and N - before_kill > 0  # the kill came mid-map: results before and after it
    assert proxy.connections[1] > routed_before[1]  # after the kill, the survivor took the connections
    assert len(_events(db, "control_plane.leader")) == 2  # a, then b
    workers = _workers(db)
    with db.read() as conn:
        q = select(I.c.idx, I.c.crashes, I.c.worker_id).where(I.c.idx >= K)
        ran = {r.idx: (r.worker_id, r.crashes) for r in conn.execute(q)}  # who finished each gated input
    crashes = {i: n for i, (_, n) in ran.items()}
    replacements = {w for w, r in workers.items() if r.started_at > killed_at}
    crashed_events = [e.message for e in _events(db, "worker.crashed")]
    if machine_dies:
        silent = {e.data["worker_id"] for e in _events(db, "worker.crashed") if "no heartbeat" in e.message}
        assert holders <= silent, crashed_events
        # what they held was requeued as a crash (not a retry: never twice) and run by workers b started
        assert any(crashes[i] == 1 for i in held_at_kill) and max(crashes.values()) == 1, crashes
        assert replacements and all(workers[w].provider == "local" for w in replacements)
        assert all(ran[i][0] in replacements for i in held_at_kill), (held_at_kill, ran, replacements)
    else:
        # adopted, not written off: each held input was finished by the worker that held it, none crashed
        assert all(ran[i][0] == w for i, w in held_at_kill.items()), (held_at_kill, ran)
        assert not any(crashes.values()), crashes
        assert not crashed_events, crashed_events
