"""Shells and commands in a running worker's container (``cloudmodal shell``, ``cloudmodal container exec``):
the control plane's half, between a client and the worker's exec host (:mod:`cloudmodal.worker.exec_host`).

Neither side reaches the other: both dial this control plane, as a sandbox's host does
(:mod:`cloudmodal.server.svc_sandbox`), so a cloud worker behind NAT answers as a local one does.

- **The worker** keeps one long poll open (``/v1/workers/{id}/exec/commands``, a WebSocket, with its own
  ``worker:<id>`` token): it answers with the commands queued for that worker's sessions — ``start`` (argv,
  PTY and window size), ``stdin``, ``eof``, ``resize``, ``signal``, ``close`` — in order, each with a sequence
  number the next poll acknowledges. Output and exits come back on ``/v1/workers/{id}/exec/events``.
- **The client** (an owner or member token allowed on the worker's app) starts a session and then, on
  WebSockets of its own (``/v1/containers/{id}/exec``), writes stdin, long-polls output and waits for the
  exit code. A session belongs to the token that started it.

Output is buffered per session and stream until the client reads it; a stream holding more than
:data:`MAX_BUFFERED` unread bytes holds the worker's next events message (flow control back to the
process's pipe or PTY). Sessions live in the memory of the control plane both sides reach (as sandboxes do).

Ends: the process exits (its code; minus a signal's number, shown as ``128 + n``); the client closes the
session or stops touching it for :data:`CLIENT_LEASE_S` (the process is killed); the worker stops — it kills
its sessions' processes as it drains, and a worker that stopped or vanished without saying so has its
sessions ended here within :data:`CHECK_S` with :data:`STOPPED_CODE` and a message naming the container. A
session never counts as the worker's load: an idle shell does not keep its container from scaling down.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy import select

from cloudmodal import exception as exc
from cloudmodal.ids import new_id
from cloudmodal.server import models
from cloudmodal.server.security import Identity, may_use_app
from cloudmodal.server.states import WorkerState
from cloudmodal.server.svc_sandbox import MAX_BUFFERED, STDERR, STDOUT, Stream

if TYPE_CHECKING:
    from cloudmodal.server.service import ControlPlane

COMMAND_POLL_S = 20.0  # the worker's long poll for commands
READ_POLL_S = 20.0  # a client's long poll for output
CHECK_S = 1.0  # how often sessions are checked against their workers and clients
START_TIMEOUT_S = 15.0  # a worker that has not taken a session's start by then does not run an exec host
CLIENT_LEASE_S = 60.0  # a session no client has touched for this long is closed (its process killed)
KEEP_ENDED_S = 60.0  # an ended session's unread output stays readable this long
STOPPED_CODE = 137  # the exit code of a session whose container stopped under it (killed, as SIGKILL)
LIVE = (WorkerState.STARTING, WorkerState.READY, WorkerState.DRAINING)

W = models.workers
F = models.functions
A = models.apps


@dataclass
class Session:
    id: str
    worker_id: str
    app_name: str
    created_by: str
    pty: bool
    streams: dict[int, Stream] = field(default_factory=lambda: {STDOUT: Stream(), STDERR: Stream()})
    state: str = "starting"  # running once the worker started the process; ended
    returncode: int | None = None
    message: str = ""
    created: float = field(default_factory=time.monotonic)
    touched: float = field(default_factory=time.monotonic)
    ended_at: float | None = None
    polls: int = 0  # client long polls in progress (a client inside one is there, whatever ``touched`` says)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def bump(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()

    async def wait_change(self, timeout: float) -> None:
        ev = self.changed
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(ev.wait(), max(0.0, timeout))


@dataclass
class Link:
    """One worker's queue of commands (for all its sessions)."""

    worker_id: str
    commands: list[tuple[int, str, str, bytes]] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def command(self, seq: int, exec_id: str, op: str, data: bytes = b"") -> None:
        self.commands.append((seq, exec_id, op, data))
        self.changed.set()
        self.changed = asyncio.Event()


class Containers:
    def __init__(self, cp: ControlPlane, run: Any) -> None:
        self.cp = cp
        self.run = run  # runs blocking work off the event loop
        self.sessions: dict[str, Session] = {}
        self.links: dict[str, Link] = {}
        self.seq = 0  # commands' sequence numbers: one counter for every worker, so a link made again goes on
        self.epoch = new_id("ep")  # this control plane's numbering (a worker's ``after`` of another is void)
        self._watcher: asyncio.Task[None] | None = None

    # -- reads --------------------------------------------------------------------------------------------
    def list_running(self, who: Identity, app_id: str | None) -> list[dict[str, Any]]:
        """The live workers (containers) ``who`` may see, of ``app_id`` if given, newest first; a cloud worker's
        with its node (``instance_id``: the cloud's, ``region``, ``zone``, ``instance_type``; empty or None for
        a local one)."""
        q = (
            select(
                W.c.id,
                W.c.app_id,
                W.c.function_id,
                W.c.state,
                W.c.started_at,
                W.c.ready_at,
                W.c.provider,
                W.c.instance_id,
                W.c.offer,
                W.c.host,
                W.c.gpu,
                A.c.name.label("app_name"),
                F.c.name.label("function_name"),
            )
            .select_from(W.join(A, A.c.id == W.c.app_id).join(F, F.c.id == W.c.function_id))
            .where(W.c.state.in_([s.value for s in LIVE]))
        )
        if app_id is not None:
            q = q.where(W.c.app_id == app_id)
        with self.cp.db.read() as conn:
            rows = [dict(r._mapping) for r in conn.execute(q.order_by(W.c.started_at.desc()).limit(1000))]
        out = []
        for r in rows:
            if not may_use_app(who, r["app_name"]):
                continue
            offer = r.pop("offer") or {}  # where a cloud worker runs: its node's region, zone and type
            r.update({k: offer.get(k) for k in ("region", "zone", "instance_type")})
            out.append(r)
        return out

    def container(self, who: Identity, worker_id: str) -> dict[str, Any]:
        """A live worker's row with its app's name, if ``who`` may use its app (else 404 / 403)."""
        q = (
            select(W.c.id, W.c.state, W.c.app_id, A.c.name.label("app_name"))
            .select_from(W.join(A, A.c.id == W.c.app_id))
            .where(W.c.id == worker_id)
        )
        with self.cp.db.read() as conn:
            row = conn.execute(q).first()
        if row is None:
            raise exc.NotFoundError(
                f"Container {worker_id} not found. `cloudmodal container list` shows the running ones."
            )
        r = dict(row._mapping)
        if not may_use_app(who, r["app_name"]):
            raise exc.PermissionDeniedError(
                f"This token may not use app {r['app_name']!r} of container {worker_id}"
                + (f": it is scoped to apps {', '.join(sorted(who.apps))}." if who.apps else ".")
            )
        if r["state"] not in LIVE:
            raise exc.NotFoundError(
                f"Container {worker_id} has stopped. `cloudmodal container list` shows the running ones."
            )
        return r

    def stop(self, who: Identity, worker_id: str) -> None:
        self.container(who, worker_id)
        self.cp.workers.drain_worker(worker_id, f"stopped by {who.principal} (cloudmodal container stop)")

    # -- clients ------------------------------------------------------------------------------------------
    async def start(self, who: Identity, worker_id: str, spec: dict[str, Any]) -> str:
        row = await self.run(self.container, who, worker_id)
        if row["state"] == WorkerState.DRAINING:
            raise exc.InvalidError(
                f"Container {worker_id} is stopping: it takes no new shells. `cloudmodal container list` shows "
                "the running ones."
            )
        sid = new_id("ex")
        s = Session(sid, worker_id, row["app_name"], who.principal, bool(spec.get("pty")))
        self.sessions[sid] = s
        self.command(worker_id, sid, "start", json.dumps(spec).encode())
        self._start_watcher()
        return sid

    def session(self, who: Identity, worker_id: str, exec_id: str) -> Session:
        s = self.sessions.get(exec_id)
        if s is None or s.worker_id != worker_id:
            raise exc.NotFoundError(
                f"Container {worker_id} has no exec session {exec_id} (it ended, or never ran)."
            )
        if who.kind != "owner" and who.principal != s.created_by:
            raise exc.PermissionDeniedError(
                f"This token may not use exec session {exec_id}: another token started it."
            )
        if who.kind != "owner" and not may_use_app(who, s.app_name):
            raise exc.PermissionDeniedError(
                f"This token may not use app {s.app_name!r} of exec session {exec_id}."
            )
        s.touched = time.monotonic()
        return s

    def send(self, s: Session, op: str, data: bytes = b"") -> None:
        if s.state != "ended":
            self.command(s.worker_id, s.id, op, data)

    def command(self, worker_id: str, exec_id: str, op: str, data: bytes = b"") -> None:
        self.seq += 1
        self.link(worker_id).command(self.seq, exec_id, op, data)

    async def read(self, s: Session, fd: int, offset: int, timeout: float) -> dict[str, Any]:
        stream = s.streams[fd]
        deadline = time.monotonic() + min(timeout, READ_POLL_S)
        s.polls += 1
        try:
            while True:
                data, end = stream.read(offset, MAX_BUFFERED)
                if data or stream.eof or time.monotonic() >= deadline or self.cp.hub.closing:
                    s.bump()  # room freed: a worker waiting on flow control may go on
                    return {"data": data, "offset": end, "eof": stream.eof and not data}
                await s.wait_change(min(1.0, deadline - time.monotonic()))
        finally:
            s.polls -= 1
            s.touched = time.monotonic()

    async def wait(self, s: Session, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + min(timeout, READ_POLL_S)
        s.polls += 1
        try:
            while s.state != "ended" and time.monotonic() < deadline and not self.cp.hub.closing:
                await s.wait_change(min(1.0, deadline - time.monotonic()))
        finally:
            s.polls -= 1
            s.touched = time.monotonic()
        return {"returncode": s.returncode, "state": s.state, "message": s.message}

    # -- workers ------------------------------------------------------------------------------------------
    def link(self, worker_id: str) -> Link:
        got = self.links.get(worker_id)
        if got is None:
            got = self.links[worker_id] = Link(worker_id)
        return got

    async def worker_commands(self, worker_id: str, after: int, epoch: str) -> dict[str, Any]:
        """The worker's long poll: its sessions' commands after ``after`` (every one when ``epoch`` is not this
        control plane's: the numbers start again on another control plane, or after a restart)."""
        if epoch != self.epoch:  # the worker's first poll here: answered at once, with the numbering
            link = self.link(worker_id)
            return {"commands": [list(c) for c in link.commands], "epoch": self.epoch}
        deadline = time.monotonic() + COMMAND_POLL_S
        while True:
            link = self.link(worker_id)
            link.commands = [c for c in link.commands if c[0] > after]
            if link.commands or time.monotonic() >= deadline or self.cp.hub.closing:
                if not link.commands:
                    del self.links[worker_id]  # made again by the next poll or command: nothing idles here
                return {"commands": [list(c) for c in link.commands], "epoch": self.epoch}
            ev = link.changed
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(ev.wait(), min(1.0, deadline - time.monotonic()))

    async def worker_events(self, worker_id: str, events: list[list[Any]]) -> None:
        touched: dict[str, Session] = {}
        for exec_id, kind, data in events:
            s = self.sessions.get(exec_id)
            if s is None or s.worker_id != worker_id or s.state == "ended":
                continue  # another worker's session (refused), or one already ended here
            touched[s.id] = s
            if kind == "P":
                s.state = "running"
            elif kind in ("O", "R"):
                s.streams[STDOUT if kind == "O" else STDERR].buf += data
            elif kind == "F":
                s.streams[STDERR].buf += data + b"\n"
                s.message = data.decode(errors="replace")
            elif kind == "X":
                self._end(s, int(data), s.message)
        for s in touched.values():
            s.bump()
        # flow control: the worker's next message waits while a session's stream holds too much unread output
        while not self.cp.hub.closing:
            full = [
                s
                for s in self.sessions.values()
                if s.worker_id == worker_id
                and s.state != "ended"
                and any(len(st.buf) > MAX_BUFFERED for st in s.streams.values())
            ]
            if not full:
                return
            await full[0].wait_change(1.0)

    # -- ends ---------------------------------------------------------------------------------------------
    def _end(self, s: Session, code: int | None, message: str = "") -> None:
        if s.state == "ended":
            return
        s.state, s.returncode, s.message = "ended", code, message
        s.ended_at = time.monotonic()
        for st in s.streams.values():
            st.eof = True
        s.bump()

    def close(self, s: Session, message: str = "closed by its client") -> None:
        """End a session from this side: its process is killed on the worker."""
        self.send(s, "close")
        self._end(s, STOPPED_CODE, message)

    def _start_watcher(self) -> None:
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.ensure_future(self._watch())

    async def _watch(self) -> None:
        """Ends the sessions of stopped workers, of clients gone, and of workers that never took them; forgets
        ended sessions after :data:`KEEP_ENDED_S`."""
        while self.sessions and not self.cp.hub.closing:
            await asyncio.sleep(CHECK_S)
            now = time.monotonic()
            for sid, s in list(self.sessions.items()):
                if s.state == "ended":
                    if s.ended_at is not None and now - s.ended_at > KEEP_ENDED_S:
                        del self.sessions[sid]
                elif s.polls == 0 and now - s.touched > CLIENT_LEASE_S:
                    self.close(s, "no client read it for a minute")
                elif s.state == "starting" and now - s.created > START_TIMEOUT_S:
                    self.close(
                        s,
                        f"Container {s.worker_id} did not start the command within {START_TIMEOUT_S:g} s: its "
                        "worker does not answer exec requests (a worker of an older cloudmodal, or one busy "
                        "starting). Try again, or `cloudmodal container list` for another container.",
                    )
            workers = {s.worker_id for s in self.sessions.values() if s.state != "ended"}
            if not workers:
                continue
            states = await self.run(self._states, workers)
            for s in list(self.sessions.values()):
                if s.state != "ended" and states.get(s.worker_id) not in LIVE:
                    self._end(s, STOPPED_CODE, f"Container {s.worker_id} stopped.")
                    self.links.pop(s.worker_id, None)  # its commands: nobody will take them
        if self.cp.hub.closing:
            for s in self.sessions.values():
                self._end(s, STOPPED_CODE, "The control plane is shutting down.")

    def _states(self, worker_ids: set[str]) -> dict[str, str]:
        with self.cp.db.read() as conn:
            return {r[0]: r[1] for r in conn.execute(select(W.c.id, W.c.state).where(W.c.id.in_(worker_ids)))}
