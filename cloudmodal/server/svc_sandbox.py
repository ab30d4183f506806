"""Sandboxes on the control plane: their rows, their hosts, and the streams between hosts and clients.

A sandbox is started by asking for a host process (:mod:`cloudmodal.worker.sandbox_host`) with a token scoped to
that one sandbox (``sandbox:<id>``, see :mod:`cloudmodal.server.security`). On the local provider this module
starts it as a subprocess, as the local provider starts workers: its own session (process group), the
environment of this process less the control plane's secrets, and the credentials on stdin, never in the
environment or the command line. Stdin then stays open: the host kills its sandbox and exits when it closes, so
a control plane that dies takes its sandboxes with it.

The host dials back (two WebSockets: commands in, output and exits out); clients never reach it, only this
control plane (:mod:`cloudmodal.server.api_sandbox`). Output is kept per process and stream until a client
reads it: a stream holding more than :data:`MAX_BUFFERED` unread bytes holds the host's next message (flow
control back to the sandboxed process's pipe). A sandbox's live state is in the memory of the control plane
that started it; its row (command, tags, end) is in the database.

On a cloud node (a sandbox with ``gpu=``, placed as a function's GPU workers are: the clouds' offers in
placement's order, on demand), the host is started by the cloud provider instead (:class:`CloudHost`,
``CloudProvider.launch_sandbox``): a node of its own, bootstrapped over SSH, the host run attached to the SSH
session with the same configuration line on its stdin, under bubblewrap on the node; when the sandbox ends
the node is deleted. Its ``timeout`` counts from the host's start (the node's provisioning is bounded apart,
by :data:`PROVISION_S`).

Ends: the command exits; ``terminate``; ``timeout`` (the host's timer, with this control plane's a few seconds
later as a backstop); the app stopping (checked every :data:`APP_CHECK_S`); this control plane shutting down.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from sqlalchemy import select

from cloudmodal import exception as exc
from cloudmodal.ids import new_id
from cloudmodal.server import models
from cloudmodal.server.models_sandbox import SandboxRow
from cloudmodal.server.security import Identity
from cloudmodal.server.states import AppState

if TYPE_CHECKING:
    from cloudmodal.server.service import ControlPlane

log = logging.getLogger("cloudmodal.sandbox")

SB = SandboxRow.__table__  # type: ignore[attr-defined]
MAX_BUFFERED = 4 * 1024 * 1024  # unread bytes of one stream before the host's next message waits
COMMAND_POLL_S = 20.0  # a host's long poll for commands
READ_POLL_S = 20.0  # a client's long poll for output
APP_CHECK_S = 1.0
BACKSTOP_S = 5.0  # after its timeout, a host that has not ended its sandbox is killed
KEEP_ENDED_S = 120.0
STANDBY_HOSTS = 2  # idle hosts kept started once sandboxes are used (each an interpreter, ~25 MB)  # an ended sandbox's unread output stays readable this long
HOST_ENV_DROP = (
    "CLOUDMODAL_TOKEN",
    "CLOUDMODAL_TOKEN_FILE",
    "CLOUDMODAL_CREDENTIALS",
    "CLOUDMODAL_SECRET_KEY",
    "CLOUDMODAL_SECRET_KEY_FILE",
    "CLOUDMODAL_DATABASE_URL",
    "PGPASSWORD",
)
STDOUT, STDERR = 1, 2
PROVISION_S = 900.0  # a cloud node for a sandbox that is not running its host after this is given up
CLOUD_POLL_S = 0.5  # how often a sandbox's node is described (the provider lists its nodes once per interval)
CLOUD_TRIES = 3  # cloud candidates a sandbox's launch tries, best first
SANDBOX_HOST_ARGV = ("-m", "cloudmodal.worker.sandbox_host")


class CloudHost:
    """A sandbox's host on a cloud node, as this module sees a host process: :meth:`poll` is None while it
    runs. :meth:`stop` (blocking: a cloud call) ends the SSH session the host is attached to (the host then ends
    its sandbox) and deletes the node; once."""

    def __init__(self, provider: Any, handle: Any, where: str) -> None:
        self.provider = provider
        self.handle = handle
        self.where = where
        self.returncode: int | None = None
        self.detail = ""
        self.stopped = False
        self._lock = threading.Lock()

    def poll(self) -> int | None:
        return self.returncode

    def stop(self) -> None:
        with self._lock:
            if self.stopped:
                return
            self.stopped = True
        try:
            self.provider.terminate(self.handle, grace_s=0.0)
        except Exception as e:  # the provider's inventory deletes a node left behind
            log.warning("deleting the node of sandbox %s: %s", self.handle.worker_id, e)
        if self.returncode is None:
            self.returncode = -9


@dataclass
class Stream:
    buf: bytearray = field(default_factory=bytearray)
    base: int = 0  # the offset of buf[0] in the stream
    eof: bool = False

    def read(self, offset: int, limit: int) -> tuple[bytes, int]:
        """Bytes from ``offset`` on (forgetting those before it: one reader per stream)."""
        if offset > self.base:
            drop = min(offset - self.base, len(self.buf))
            del self.buf[:drop]
            self.base += drop
        start = max(offset, self.base) - self.base
        data = bytes(self.buf[start : start + limit])
        return data, self.base + start + len(data)


@dataclass
class Proc:
    streams: dict[int, Stream] = field(default_factory=lambda: {STDOUT: Stream(), STDERR: Stream()})
    returncode: int | None = None
    error: str = ""


@dataclass
class Live:
    id: str
    app_id: str
    app_name: str
    timeout: float
    token_id: str = ""
    host: subprocess.Popen[bytes] | CloudHost | None = None
    cloud: bool = False  # its host runs on a cloud node
    started: bool = True  # a cloud host: it runs (its node is up and bootstrapped)
    procs: dict[int, Proc] = field(default_factory=dict)
    commands: list[tuple[int, str, int, bytes]] = field(default_factory=list)
    seq: int = 0
    next_proc: int = 1
    state: str = "running"
    returncode: int | None = None
    message: str = ""
    ending: bool = False  # its end is being recorded
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def bump(self) -> None:
        """Wake everyone waiting on this sandbox (they re-check what they wait for)."""
        self.changed.set()
        self.changed = asyncio.Event()

    def command(self, op: str, proc: int, data: bytes = b"") -> None:
        self.seq += 1
        self.commands.append((self.seq, op, proc, data))
        self.bump()

    async def wait_change(self, timeout: float) -> None:
        ev = self.changed
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(ev.wait(), timeout)


def _host_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in HOST_ENV_DROP}
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Sandboxes:
    def __init__(self, cp: ControlPlane, run: Any) -> None:
        self.cp = cp
        self.run = run  # runs blocking work off the event loop
        self.live: dict[str, Live] = {}
        self._watcher: asyncio.Task[None] | None = None
        self._ended: dict[str, float] = {}  # sandbox id -> when it ended (its Live is dropped later)
        self.standby: list[subprocess.Popen[bytes]] = []  # idle hosts, ready for the next sandboxes
        self._standby_lock = threading.Lock()

    # -- clients ------------------------------------------------------------------------------------------
    async def create(self, who: Identity, app_id: str, spec: dict[str, Any], tags: dict[str, str]) -> str:
        app = await self.run(self.cp.access.check_app, who, app_id)
        if app["state"] == AppState.STOPPED.value:
            raise exc.InvalidError(
                f"App {app['name']!r} is stopped: sandboxes run in a running or deployed app."
            )
        choices = await self.run(self._cloud_choices, spec) if spec.get("gpu") else None
        sid = new_id("sb")
        now = time.time()
        live = Live(sid, app["id"], app["name"], float(spec["timeout"]))
        if choices is not None:
            live.cloud, live.started = True, False
        if spec.get("argv"):
            live.procs[0] = Proc()
        wire_spec = {k: v for k, v in spec.items() if k != "env"}  # the env may hold secrets' values

        def write() -> str:
            with self.cp.db.write() as conn:
                conn.execute(
                    SB.insert().values(
                        id=sid,
                        app_id=app["id"],
                        created_by=who.principal,
                        state="running",
                        spec=wire_spec,
                        tags=tags,
                        created_at=now,
                    )
                )
            token_id, token = self.cp.tokens.create_token(f"sandbox:{sid}", f"sandbox {sid}")
            live.token_id = token_id
            return token

        token = await self.run(write)
        self.live[sid] = live
        self._start_watcher()
        if choices is not None:
            asyncio.ensure_future(self._start_cloud(live, token, spec, choices))
            return sid
        try:
            live.host = await self.run(self._spawn_host, sid, token, spec)
        except OSError as e:
            await self._end(live, "error", None, f"The sandbox host could not start: {e}")
            raise exc.ExecutionError(f"Sandbox {sid} could not start: {e}") from None
        asyncio.get_running_loop().call_later(live.timeout + BACKSTOP_S, self._backstop, live)
        asyncio.ensure_future(self.run(self._refill))
        return sid

    # -- cloud nodes --------------------------------------------------------------------------------------
    def _cloud_choices(self, spec: dict[str, Any]) -> list[Any]:
        """Where a sandbox with ``gpu`` may run: the clouds' offers as placement ranks them for a function's
        GPU workers (its tiers in order, cheapest first; ``cloud``/``region`` as a function's), on demand."""
        from cloudmodal.gpu import parse_gpu
        from cloudmodal.server.launcher import _no_gpu_message

        try:
            tiers = parse_gpu(spec["gpu"])
        except (ValueError, exc.Error) as e:
            raise exc.InvalidError(f"Sandbox gpu={spec['gpu']!r}: {e}") from None
        rec = self.cp.reconciler
        if rec is None:
            raise exc.NoProviderError(
                "Sandbox.create(gpu=...) runs the sandbox on a cloud node, and this control plane has no "
                "reconciler (no providers): start it with a cloud enabled."
            )
        shape = SimpleNamespace(
            gpu=tiers,
            spot="never",
            cloud=spec.get("cloud"),
            region=tuple(spec.get("region") or ()),
            max_price_per_hour=None,
        )
        choices = [
            c
            for c in rec._cloud_choices(shape, "sandbox", rec.clock(), force_on_demand=True)
            if hasattr(c.provider, "launch_sandbox")
        ]
        if not choices:
            raise exc.NoProviderError(
                "Sandbox.create(gpu=...) runs the sandbox on a cloud node. "
                + _no_gpu_message(tiers, getattr(rec, "local", None))
            )
        return choices

    def _launch_cloud(self, live: Live, token: str, spec: dict[str, Any], choices: list[Any]) -> CloudHost:
        """Launch the sandbox's node on the first candidate that accepts (blocking: cloud calls)."""
        from cloudmodal.providers.base import LaunchRequest, ProviderError

        refused = []
        for c in choices[:CLOUD_TRIES]:
            req = LaunchRequest(
                worker_id=live.id,
                app_id=live.app_id,
                function_id="sandbox",
                gpu=c.tier,
                offer=c.offer,
                market=c.market,
                argv=SANDBOX_HOST_ARGV,
            )
            try:
                handle = c.provider.launch_sandbox(
                    req, attach={"token": token, "sandbox_id": live.id, "spec": spec}
                )
            except ProviderError as e:
                refused.append(f"{c.describe()}: {e.message}")
                continue
            self.cp.activity.event(
                "sandbox.node_launched",
                f"sandbox {live.id}: node launched on {c.describe()}",
                app_id=live.app_id,
            )
            return CloudHost(c.provider, handle, c.describe())
        raise exc.ExecutionError("no cloud candidate started a node: " + "; ".join(refused))

    async def _start_cloud(self, live: Live, token: str, spec: dict[str, Any], choices: list[Any]) -> None:
        """Launch the sandbox's node and watch it (the provider's describe bootstraps it and reports the host's
        end); when it ends, end the sandbox and delete the node."""
        try:
            host = await self.run(self._launch_cloud, live, token, spec, choices)
        except Exception as e:
            await self._end(live, "error", None, f"The sandbox's cloud node could not start: {e}")
            return
        live.host = host
        deadline = time.monotonic() + PROVISION_S
        while live.state == "running" and not host.stopped:
            try:
                st = await self.run(host.provider.describe, host.handle)
            except Exception as e:  # a failed cloud call: asked again at the next round
                log.warning("sandbox %s: describing its node: %s", live.id, e)
                st = None
            if st is not None and st.state == "running" and not live.started:
                live.started = True
                asyncio.get_running_loop().call_later(live.timeout + BACKSTOP_S, self._backstop, live)
            elif st is not None and st.state in ("exited", "preempted"):
                host.returncode = st.returncode if st.returncode is not None else 1
                host.detail = st.detail
                break
            if not live.started and time.monotonic() > deadline:
                host.detail = f"its node on {host.where} did not run the host within {PROVISION_S:g} s"
                host.returncode = 1
                break
            await asyncio.sleep(CLOUD_POLL_S)
        if live.state == "running":
            await self._end(live, "error", None, f"The sandbox's node ended: {host.detail}")
        await self._stop_cloud(host)

    async def _stop_cloud(self, host: CloudHost) -> None:
        """Delete a sandbox's node once its host has ended (it exits once its end is reported), or after
        :data:`BACKSTOP_S`."""
        deadline = time.monotonic() + BACKSTOP_S
        while host.returncode is None and not host.stopped and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        await self.run(host.stop)

    # -- local hosts ----------------------------------------------------------------------------------------
    def _new_host(self) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-m", "cloudmodal.worker.sandbox_host"],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            # the host's own errors go to this process's stderr with CLOUDMODAL_SANDBOX_DEBUG=1
            stderr=None if os.environ.get("CLOUDMODAL_SANDBOX_DEBUG") else subprocess.DEVNULL,
            env=_host_env(),
            start_new_session=True,
            close_fds=True,
        )

    def _spawn_host(self, sid: str, token: str, spec: dict[str, Any]) -> subprocess.Popen[bytes]:
        """A host for sandbox ``sid``: a standby one (an interpreter that has imported the host's modules and
        waits for its configuration on stdin) when there is one, else a new process."""
        url = self.cp.reconciler.server_url if self.cp.reconciler is not None else ""
        proc = None
        with self._standby_lock:
            while self.standby and proc is None:
                proc = self.standby.pop(0)
                if proc.poll() is not None:
                    proc = None
        if proc is None:
            proc = self._new_host()
        assert proc.stdin is not None
        fingerprint = getattr(self.cp.reconciler, "tls_fingerprint", None)
        line = {"url": url, "token": token, "sandbox_id": sid, "spec": spec, "tls_fingerprint": fingerprint}
        proc.stdin.write(json.dumps(line).encode() + b"\n")
        proc.stdin.flush()  # stays open: the host ends its sandbox when it closes
        return proc

    def _refill(self) -> None:
        """Start standby hosts up to :data:`STANDBY_HOSTS` (after a sandbox took one: off its start's path)."""
        while not self.cp.hub.closing:
            with self._standby_lock:
                if len(self.standby) >= STANDBY_HOSTS:
                    return
            host = self._new_host()
            if self.cp.hub.closing:  # shut down meanwhile: kill_all has run
                self._kill_host(host)
                return
            with self._standby_lock:
                self.standby.append(host)

    def get(self, who: Identity, sid: str) -> Live:
        live = self.live.get(sid)
        if live is None:
            raise exc.NotFoundError(
                f"Sandbox {sid} is not running on this control plane (it ended, or another one started it)."
            )
        if not who.team_wide and not (who.apps and live.app_name in who.apps):
            raise exc.PermissionDeniedError(f"This token may not use the app of sandbox {sid}.")
        return live

    def exec(self, live: Live, argv: list[str], workdir: str | None, env: dict[str, str]) -> int:
        if live.state != "running":
            raise exc.InvalidError(f"Sandbox {live.id} has ended ({live.state}): it cannot run commands.")
        proc = live.next_proc
        live.next_proc += 1
        live.procs[proc] = Proc()
        spec = {"argv": argv, "cwd": workdir, "env": env}
        live.command("S", proc, json.dumps(spec).encode())
        return proc

    def proc(self, live: Live, proc: int) -> Proc:
        p = live.procs.get(proc)
        if p is None:
            raise exc.NotFoundError(f"Sandbox {live.id} has no process {proc}.")
        return p

    async def read(self, live: Live, proc: int, fd: int, offset: int, timeout: float) -> dict[str, Any]:
        """Output of ``proc``'s stream ``fd`` from ``offset``: waits up to ``timeout`` for some."""
        p = self.proc(live, proc)
        s = p.streams[fd]
        deadline = time.monotonic() + min(timeout, READ_POLL_S)
        while True:
            data, end = s.read(offset, MAX_BUFFERED)
            if data or s.eof or time.monotonic() >= deadline:
                live.bump()  # room freed: a host waiting on flow control may go on
                return {"data": data, "offset": end, "eof": s.eof and not data}
            await live.wait_change(deadline - time.monotonic())

    async def wait(self, live: Live, proc: int | None, timeout: float) -> int | None:
        deadline = time.monotonic() + min(timeout, READ_POLL_S)
        while True:
            code = live.returncode if proc is None else self.proc(live, proc).returncode
            if (live.state != "running") if proc is None else code is not None:
                return code
            if time.monotonic() >= deadline:
                return None
            await live.wait_change(deadline - time.monotonic())

    def terminate(self, live: Live) -> None:
        if live.state == "running" and not live.started:  # a cloud node not running the host yet
            asyncio.ensure_future(self._end(live, "terminated", 137))
            return
        if live.state == "running":
            live.command("terminate", 0)
            asyncio.get_running_loop().call_later(BACKSTOP_S, self._backstop, live)

    async def set_tags(self, live: Live, tags: dict[str, str]) -> None:
        def write() -> None:
            with self.cp.db.write() as conn:
                conn.execute(SB.update().where(SB.c.id == live.id).values(tags=tags))

        await self.run(write)

    def list_running(self, who: Identity, app_id: str | None, tags: dict[str, str]) -> list[dict[str, Any]]:
        """The running sandboxes ``who`` may see (of ``app_id``, with all of ``tags``), newest first."""
        A = models.apps
        q = (
            select(SB, A.c.name.label("app_name"))
            .join(A, A.c.id == SB.c.app_id)
            .where(SB.c.state == "running")
        )
        if app_id is not None:
            q = q.where(SB.c.app_id == app_id)
        with self.cp.db.read() as conn:
            rows = [dict(r._mapping) for r in conn.execute(q.order_by(SB.c.created_at.desc()).limit(1000))]
        out = []
        for r in rows:
            if not who.team_wide and not (who.apps and r["app_name"] in who.apps):
                continue
            if any((r["tags"] or {}).get(k) != v for k, v in tags.items()):
                continue
            out.append(r)
        return out

    def describe(self, who: Identity, sid: str) -> dict[str, Any]:
        A = models.apps
        q = select(SB, A.c.name.label("app_name")).join(A, A.c.id == SB.c.app_id).where(SB.c.id == sid)
        with self.cp.db.read() as conn:
            row = conn.execute(q).first()
        if row is None:
            raise exc.NotFoundError(
                f"Sandbox {sid} not found. `cloudmodal sandbox list` shows the running ones."
            )
        r = dict(row._mapping)
        if not who.team_wide and not (who.apps and r["app_name"] in who.apps):
            raise exc.PermissionDeniedError(f"This token may not use the app of sandbox {sid}.")
        return r

    # -- hosts --------------------------------------------------------------------------------------------
    def host_live(self, who: Identity, sid: str) -> Live:
        live = self.live.get(sid)
        if who.sandbox_id != sid or live is None:
            raise exc.PermissionDeniedError("This token belongs to another sandbox.")
        return live

    async def host_commands(self, live: Live, after: int) -> dict[str, Any]:
        deadline = time.monotonic() + COMMAND_POLL_S
        while True:
            live.commands = [c for c in live.commands if c[0] > after]
            if live.commands or live.state != "running" or time.monotonic() >= deadline:
                return {"commands": [list(c) for c in live.commands]}
            await live.wait_change(deadline - time.monotonic())

    async def host_events(self, live: Live, events: list[list[Any]]) -> None:
        for proc, kind, data in events:
            if kind == "done":
                info = json.loads(data)
                await self._host_done(live, info)
                continue
            p = live.procs.get(proc)
            if p is None:
                continue
            if kind in ("O", "R"):
                p.streams[STDOUT if kind == "O" else STDERR].buf += data
            elif kind == "X":
                p.returncode = int(data)
                for s in p.streams.values():
                    s.eof = True
                if proc == 0:
                    live.returncode = p.returncode
            elif kind == "F":
                p.error = data.decode(errors="replace")
                p.streams[STDERR].buf += data + b"\n"
        live.bump()
        # flow control: the host's next message waits while a stream holds too much unread output
        while live.state == "running" and any(
            len(s.buf) > MAX_BUFFERED for p in live.procs.values() for s in p.streams.values()
        ):
            await live.wait_change(1.0)

    async def _host_done(self, live: Live, info: dict[str, Any]) -> None:
        reason = info.get("reason", "exit")
        code = live.returncode
        if reason == "exit" and 0 in live.procs and code is None:
            reason = "error"
        if reason == "timeout":
            code = 124  # as timeout(1)
        elif reason == "terminated":
            code = 137  # killed
        message = ""
        if reason == "error":
            message = (info.get("stderr") or "").strip()[-500:]
        await self._end(live, {"exit": "finished"}.get(reason, reason), code, message)

    # -- ends ---------------------------------------------------------------------------------------------
    async def _end(self, live: Live, state: str, code: int | None, message: str = "") -> None:
        """Record how the sandbox ended (its row first: a client that sees the end then finds it in the
        database), revoke its host's token, wake its waiters and reap its host."""
        if live.state != "running" or live.ending:
            return
        live.ending = True

        def write() -> None:
            with self.cp.db.write() as conn:
                conn.execute(
                    SB.update()
                    .where(SB.c.id == live.id)
                    .values(state=state, returncode=code, finished_at=time.time())
                )
            if live.token_id:
                with contextlib.suppress(exc.NotFoundError):
                    self.cp.tokens.revoke(live.token_id)

        await self.run(write)
        live.state, live.returncode, live.message = state, code, message
        for p in live.procs.values():
            for s in p.streams.values():
                s.eof = True
            if p.returncode is None:
                p.returncode = code if code is not None else -1
        live.bump()
        self._ended[live.id] = time.monotonic()
        host = live.host
        if isinstance(host, CloudHost):
            asyncio.ensure_future(self._stop_cloud(host))
        elif host is not None:
            asyncio.get_running_loop().call_later(BACKSTOP_S, self._kill_host, host)
            # reaped apart: the host exits once this answers its last message
            asyncio.ensure_future(self.run(self._reap, host))

    @staticmethod
    def _reap(host: subprocess.Popen[bytes]) -> None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            host.wait(BACKSTOP_S)

    @staticmethod
    def _kill_host(host: subprocess.Popen[bytes] | CloudHost) -> None:
        """Kill a host and its sandbox: its process group (its session); bubblewrap dies with its parent,
        and its PID namespace with it. A cloud host: its node is deleted on a thread of its own (cloud calls
        block)."""
        if isinstance(host, CloudHost):
            if not host.stopped:
                threading.Thread(target=host.stop, name="cloudmodal-sandbox-node", daemon=True).start()
            return
        if host.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(host.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                host.wait(1)
        if host.stdin is not None:
            with contextlib.suppress(OSError):
                host.stdin.close()

    def _backstop(self, live: Live) -> None:
        if live.state == "running" and live.host is not None:
            self._kill_host(live.host)
            asyncio.ensure_future(self._end(live, "timeout" if live.state == "running" else live.state, 124))

    def kill_all(self) -> None:
        """Kill every sandbox this control plane started, and the standby host (its shutdown)."""
        with self._standby_lock:
            standby, self.standby = self.standby, []
        for host in standby:
            self._kill_host(host)
        for live in list(self.live.values()):
            if live.host is not None:
                self._kill_host(live.host)

    def _start_watcher(self) -> None:
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.ensure_future(self._watch())

    async def _watch(self) -> None:
        """Ends the sandboxes of stopped apps; kills every sandbox when the control plane shuts down; drops
        ended sandboxes' state after :data:`KEEP_ENDED_S`."""
        hub = self.cp.hub
        key = "sandboxes:watch"
        ev = hub.watch(key)
        try:
            while self.live or self.standby:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(ev.wait(), APP_CHECK_S)
                if hub.closing:
                    self.kill_all()
                    return
                now = time.monotonic()
                for sid, at in list(self._ended.items()):
                    if now - at > KEEP_ENDED_S:
                        self._ended.pop(sid, None)
                        self.live.pop(sid, None)
                for lv in list(self.live.values()):
                    if lv.state == "running" and lv.host is not None and lv.host.poll() is not None:
                        # a host that died without reporting (killed, crashed): its sandbox died with it
                        await self._end(
                            lv, "error", None, f"The sandbox's host exited ({lv.host.returncode})."
                        )
                running = {lv.app_id for lv in self.live.values() if lv.state == "running"}
                if not running:
                    continue
                stopped = await self.run(self._stopped_apps, running)
                for lv in list(self.live.values()):
                    if lv.state == "running" and lv.app_id in stopped:
                        self.terminate(lv)
        finally:
            hub.unwatch(key, ev)

    def _stopped_apps(self, app_ids: set[str]) -> set[str]:
        A = models.apps
        with self.cp.db.read() as conn:
            rows = conn.execute(
                select(A.c.id).where(A.c.id.in_(app_ids), A.c.state == AppState.STOPPED.value)
            )
            return {r[0] for r in rows}
