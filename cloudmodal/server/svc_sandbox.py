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

Images: on this machine a sandbox's ``image=`` with pip packages (``pip_install``, ``uv_pip_install``,
``pip_install_from_requirements``) gets the Python environment workers of that image get here
(:func:`cloudmodal.providers.envs.resolve_python`, built once per image hash and cached), bound read-only in
the sandbox with its ``bin`` first on ``PATH``; the image's ``env`` is in the sandbox's environment and its
``workdir`` is the default working directory. ``apt_install``, ``run_commands`` and the other steps that change
the system are refused here (they need root on the control plane's machine); on a cloud node the node's
bootstrap sets the image up as a worker's (:func:`cloudmodal.image_render.setup_script`) and the host runs with
its venv's Python.

Volumes (this machine only): each mount is a working copy of the volume made by this control plane outside the
sandbox (with the creator's access to the volume), bound read-write at its path (read-only with
``read_only``); it is committed when the sandbox ends, before its end is visible, as Modal commits a sandbox's
volumes when it terminates, and then removed.

Named secrets (``Secret.from_name``) are resolved here at create (and at each ``exec`` that names some) into
the sandbox's environment only, before its inline ones and ``env``.

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
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from sqlalchemy import select

from cloudmodal import exception as exc
from cloudmodal.ids import new_id
from cloudmodal.server import models
from cloudmodal.server.models_sandbox import SandboxRow
from cloudmodal.server.security import Identity
from cloudmodal.server.states import AppState
from cloudmodal.server.svc_sandbox_cloud import BACKSTOP_S, CloudHost, SandboxNodes
from cloudmodal.server.svc_secrets import NamedSecrets, check_manager

if TYPE_CHECKING:
    from cloudmodal.server.service import ControlPlane

log = logging.getLogger("cloudmodal.sandbox")

SB = SandboxRow.__table__  # type: ignore[attr-defined]
MAX_BUFFERED = 4 * 1024 * 1024  # unread bytes of one stream before the host's next message waits
COMMAND_POLL_S = 20.0  # a host's long poll for commands
READ_POLL_S = 20.0  # a client's long poll for output
APP_CHECK_S = 1.0
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
# image steps a sandbox on this machine cannot have: they change the system (root) or ship files
LOCAL_REFUSED_OPS = {
    "apt_install": "apt_install needs root on the control plane's machine",
    "run_commands": "run_commands would run as root on the control plane's machine",
    "run_function": "run_function builds need a container image",
    "uv_sync": "uv_sync is not supported for sandboxes yet",
    "add_local_python_source": "add_local_python_source is not supported for sandboxes yet",
}
PIP_OPS = ("pip_install", "uv_pip_install", "pip_install_requirements")
# pip options an image's steps may pass to the build on the control plane's machine (others could make pip
# write outside the image's environment: --target, --prefix, --root, --src...)
SAFE_PIP_OPTIONS = ("--no-index", "--no-deps", "--prefer-binary", "--pre")
# mount paths a volume may not take: the image's system directories and the kernel's
RESERVED_MOUNTS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/etc", "/proc", "/dev")


def check_mount_path(path: str) -> str:
    """A volume's mount path in a sandbox: absolute, normalized, not ``/`` nor a system directory."""
    import posixpath

    norm = posixpath.normpath(path)
    if not path.startswith("/") or norm != path or path == "/":
        raise exc.InvalidError(
            f"Sandbox volumes: mount path {path!r} must be an absolute, normalized path "
            "other than /, e.g. '/data'."
        )
    if any(path == r or path.startswith(r + "/") for r in RESERVED_MOUNTS):
        raise exc.InvalidError(
            f"Sandbox volumes: {path!r} is in the sandbox's read-only system directories; mount the volume "
            "elsewhere, e.g. '/data'."
        )
    return path


def image_pip_args(image: dict[str, Any]) -> list[str]:
    """``pip install`` options of the image's pip steps (``find_links``, ``index_url``, ``extra_index_url``,
    ``pre``, ``extra_options``), for the environment built for it here."""
    out: list[str] = []
    for layer in image.get("layers") or ():
        if layer.get("op") not in PIP_OPS:
            continue
        for key, flag in (
            ("find_links", "--find-links"),
            ("index_url", "--index-url"),
            ("extra_index_url", "--extra-index-url"),
        ):
            if layer.get(key) and str(layer[key]) not in out:
                out += [flag, str(layer[key])]
        if layer.get("pre") and "--pre" not in out:
            out.append("--pre")
        for o in layer.get("extra_options") or ():
            o = str(o)
            if not (o in SAFE_PIP_OPTIONS or o.startswith("--only-binary=")):
                raise exc.InvalidError(
                    f"Sandbox image: pip option {o!r} is not taken for an environment built on the control "
                    f"plane's machine (only {', '.join(SAFE_PIP_OPTIONS)} and --only-binary=...). Remove it "
                    "from extra_options, or use find_links=/index_url=."
                )
            if o not in out:
                out.append(o)
    return out


class _ServerHead:
    """A volume's head as the engine sees it, read and swapped through this control plane's own service with
    the sandbox creator's access (what ``ControlPlaneHead`` does over HTTP for a worker)."""

    def __init__(self, vols: Any, who: Identity, volume_id: str) -> None:
        self.vols, self.who, self.volume_id = vols, who, volume_id

    def read(self) -> tuple[int, str | None]:
        h = self.vols.head(self.who, self.volume_id)
        return int(h["version"]), h["manifest"]

    def swap(self, expected: int, manifest_key: str) -> bool:
        return bool(self.vols.swap(self.who, self.volume_id, expected, manifest_key)["swapped"])


@dataclass
class SandboxMount:
    """A volume mounted in a sandbox: its working copy in a private directory of this machine."""

    path: str
    label: str  # the volume's name or id, for messages
    data: Any  # VolumeData
    copy: Any  # WorkingCopy
    root: str  # the private directory holding the copy (removed at the end)
    read_only: bool


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
    mounts: list[SandboxMount] = field(default_factory=list)  # its volumes, committed at its end
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


class Sandboxes(SandboxNodes):
    def __init__(self, cp: ControlPlane, run: Any) -> None:
        self.cp = cp
        self.run = run  # runs blocking work off the event loop
        self.live: dict[str, Live] = {}
        self._watcher: asyncio.Task[None] | None = None
        self._ended: dict[str, float] = {}  # sandbox id -> when it ended (its Live is dropped later)
        self.standby: list[subprocess.Popen[bytes]] = []  # idle hosts, ready for the next sandboxes
        self._standby_lock = threading.Lock()

    # -- clients ------------------------------------------------------------------------------------------
    async def create(
        self,
        who: Identity,
        app_id: str,
        spec: dict[str, Any],
        tags: dict[str, str],
        image: dict[str, Any] | None = None,
        mounts: list[dict[str, Any]] | None = None,
    ) -> str:
        app = await self.run(self.cp.access.check_app, who, app_id)
        if app["state"] == AppState.STOPPED.value:
            raise exc.InvalidError(
                f"App {app['name']!r} is stopped: sandboxes run in a running or deployed app."
            )
        cloud = bool(spec.get("gpu"))
        image = self._check_image(image, cloud)
        if mounts and cloud:
            raise exc.InvalidError(
                "Sandbox.create(volumes=...) with gpu=: volumes are mounted in sandboxes on the control plane's "
                "machine only so far. Leave gpu= out, or read and write the volume from a function."
            )
        for m in mounts or ():
            check_mount_path(m["path"])
        if len({m["path"] for m in mounts or ()}) < len(mounts or ()):
            raise exc.InvalidError("Sandbox volumes: two volumes at one mount path.")
        if spec.get("secret_names"):
            spec["env"] = await self.run(self.named_secrets, who, spec["secret_names"]) | spec["env"]
        if image is not None:
            spec["image_env"] = dict(image.get("env") or {})
            workdirs = [la["path"] for la in image.get("layers") or () if la.get("op") == "workdir"]
            if workdirs and not spec.get("workdir"):
                spec["workdir"] = workdirs[-1]
        choices = await self.run(self._cloud_choices, spec) if cloud else None
        if image is not None and not cloud:
            spec["python"] = await self.run(self._image_python, image)
        sid = new_id("sb")
        now = time.time()
        live = Live(sid, app["id"], app["name"], float(spec["timeout"]))
        if choices is not None:
            live.cloud, live.started = True, False
        if spec.get("argv"):
            live.procs[0] = Proc()
        if mounts:
            live.mounts = await self.run(self._mount_volumes, who, sid, mounts)
            spec["mounts"] = [
                {"path": m.path, "source": str(m.copy.directory), "read_only": m.read_only}
                for m in live.mounts
            ]
        # the env may hold secrets' values; the host's paths are this machine's business
        wire_spec = {k: v for k, v in spec.items() if k not in ("env", "python", "mounts", "image_env")}
        if image is not None:
            wire_spec["image"] = image.get("hash")
        if mounts:
            wire_spec["volumes"] = [{"path": m["path"], "ref": m["ref"]} for m in mounts]

        def write() -> str:
            with self.cp.db.write() as conn:
                if spec.get("name"):
                    self._check_name_free(conn, app["id"], spec["name"])
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

        try:
            token = await self.run(write)
        except BaseException:
            await self.run(self._unmount, live, False)
            raise
        self.live[sid] = live
        self._start_watcher()
        if choices is not None:
            asyncio.ensure_future(self._start_cloud(live, token, spec, choices, image))
            return sid
        try:
            live.host = await self.run(self._spawn_host, sid, token, spec)
        except OSError as e:
            await self._end(live, "error", None, f"The sandbox host could not start: {e}")
            raise exc.ExecutionError(f"Sandbox {sid} could not start: {e}") from None
        asyncio.get_running_loop().call_later(live.timeout + BACKSTOP_S, self._backstop, live)
        asyncio.ensure_future(self.run(self._refill))
        return sid

    # -- names ----------------------------------------------------------------------------------------------
    def _check_name_free(self, conn: Any, app_id: str, name: str) -> None:
        """In the creating transaction: no running sandbox of the app has ``name`` (PostgreSQL: the app's
        creates are serialized by a transaction lock; SQLite's writes are serialized already)."""
        from sqlalchemy import text

        if not self.cp.db.is_sqlite:
            conn.execute(text("SELECT pg_advisory_xact_lock(hashtext(:k))"), {"k": f"sandbox-name:{app_id}"})
        rows = conn.execute(select(SB.c.spec).where(SB.c.app_id == app_id, SB.c.state == "running")).all()
        if any((r.spec or {}).get("name") == name for r in rows):
            raise exc.AlreadyExistsError(
                f"A running sandbox of this app is already named {name!r}: names are unique among an app's "
                "running sandboxes. Pick another name, or Sandbox.from_name(app_name, name) to use that one."
            )

    def from_name(self, who: Identity, app_name: str, name: str) -> dict[str, Any]:
        """The running sandbox named ``name`` of the app named ``app_name`` (Modal's ``Sandbox.from_name``)."""
        A = models.apps
        q = (
            select(SB, A.c.name.label("app_name"))
            .join(A, A.c.id == SB.c.app_id)
            .where(A.c.name == app_name, SB.c.state == "running")
            .order_by(SB.c.created_at.desc())
        )
        with self.cp.db.read() as conn:
            rows = [dict(r._mapping) for r in conn.execute(q.limit(10_000))]
        for r in rows:
            if (r["spec"] or {}).get("name") != name:
                continue
            if not who.team_wide and not (who.apps and r["app_name"] in who.apps):
                raise exc.PermissionDeniedError(f"This token may not use app {app_name!r}.")
            return r
        raise exc.NotFoundError(f"No running sandbox named {name!r} in app {app_name!r}.")

    # -- images, secrets, volumes --------------------------------------------------------------------------
    @staticmethod
    def _check_image(image: dict[str, Any] | None, cloud: bool) -> dict[str, Any] | None:
        """The image's recipe (None: the default image), its steps checked against where the sandbox runs."""
        if not image or not image.get("layers"):
            return None
        if not isinstance(image.get("hash"), str) or not isinstance(image.get("layers"), list):
            raise exc.InvalidError("Sandbox image: send Image.to_wire() (a recipe with hash and layers).")
        ops = [str(la.get("op")) for la in image["layers"] if isinstance(la, dict)]
        refused = [LOCAL_REFUSED_OPS[o] for o in dict.fromkeys(ops) if o in LOCAL_REFUSED_OPS]
        if cloud:
            refused = [
                r
                for o, r in LOCAL_REFUSED_OPS.items()
                if o in ops and o in ("uv_sync", "add_local_python_source")
            ]
        if refused:
            where = "on a cloud node" if cloud else "on the control plane's machine"
            raise exc.InvalidError(
                f"Sandbox.create(image=...) {where}: " + "; ".join(refused) + ". Sandboxes take images with "
                "pip_install, uv_pip_install, pip_install_from_requirements, env and workdir"
                + ("" if cloud else " here; with gpu= (a cloud node) also apt_install and run_commands")
                + ". Remove those steps, or run that code in a function."
            )
        if not cloud:
            image_pip_args(image)  # its pip options, checked before anything starts
        return image

    @staticmethod
    def _image_python(image: dict[str, Any]) -> str | None:
        """The interpreter of the image's environment on this machine (None: this process's environment has
        every package). Built once per image hash, as workers' (blocking: it may run pip)."""
        from cloudmodal.providers.base import ImageBuildError
        from cloudmodal.providers.envs import resolve_python

        packages = [str(p) for p in image.get("pip_packages") or ()]
        if not packages:
            return None
        try:
            python = resolve_python(packages, str(image["hash"]), pip_args=image_pip_args(image))
        except ImageBuildError as e:
            raise exc.InvalidError(f"Sandbox image: {e}") from None
        return None if python == sys.executable else python

    def named_secrets(self, who: Identity, names: list[str]) -> dict[str, str]:
        """The environment named secrets ``names`` give (merged in order), read now (blocking)."""
        if not names:
            return {}
        check_manager(who, f"use named secrets ({', '.join(repr(n) for n in names)})")
        return NamedSecrets(self.cp).resolve(list(names), "Sandbox: ")

    def _mount_volumes(self, who: Identity, sid: str, mounts: list[dict[str, Any]]) -> list[SandboxMount]:
        """A working copy of each volume, in a private directory (blocking: it downloads the volume)."""
        import shutil
        import tempfile

        from cloudmodal.server.svc_volumes import Volumes
        from cloudmodal.settings import settings
        from cloudmodal.volume import check_sub_path
        from cloudmodal.volumes.engine import VolumeData
        from cloudmodal.volumes.store import open_store

        vols = Volumes(self.cp, settings().volume_store)
        made: list[SandboxMount] = []
        try:
            for m in mounts:
                row = vols.get(who, m["ref"])
                sub = check_sub_path(m["sub_path"]) if m.get("sub_path") else ""
                data = VolumeData(open_store(row["location"]), _ServerHead(vols, who, row["id"]))
                root = tempfile.mkdtemp(prefix=f"cloudmodal-{sid}-")  # 0700
                try:
                    copy = data.working_copy(
                        Path(root) / "root", sub_path=sub or "", read_only=m["read_only"]
                    )
                except BaseException:
                    data.close()
                    shutil.rmtree(root, ignore_errors=True)
                    raise
                made.append(
                    SandboxMount(m["path"], row["name"] or row["id"], data, copy, root, bool(m["read_only"]))
                )
        except BaseException:
            self._unmount(SimpleNamespace(id=sid, mounts=made), False)
            raise
        return made

    @staticmethod
    def _unmount(live: Any, commit: bool) -> str:
        """Commit (``commit``) each writable volume of ``live``, then remove the working copies (blocking).
        Returns what failed, for the sandbox's message."""
        import shutil

        failed = []
        for m in live.mounts:
            try:
                if commit and not m.read_only:
                    m.copy.commit()
            except Exception as e:
                log.warning("sandbox %s: committing volume %s: %s", live.id, m.label, e)
                failed.append(f"committing the volume {m.label!r} at {m.path} failed: {e}")
            finally:
                with contextlib.suppress(Exception):
                    m.data.close()
                shutil.rmtree(m.root, ignore_errors=True)
        live.mounts = []
        return "; ".join(failed)

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

    def exec(
        self,
        live: Live,
        argv: list[str],
        workdir: str | None,
        env: dict[str, str],
        timeout: int | None = None,
    ) -> int:
        if live.state != "running":
            raise exc.InvalidError(f"Sandbox {live.id} has ended ({live.state}): it cannot run commands.")
        proc = live.next_proc
        live.next_proc += 1
        live.procs[proc] = Proc()
        spec: dict[str, Any] = {"argv": argv, "cwd": workdir, "env": env}
        if timeout:
            spec["timeout"] = timeout
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
            nonlocal message
            if live.mounts:  # its volumes, committed before its end is visible (its processes are gone)
                failed = self._unmount(live, commit=True)
                message = "; ".join(x for x in (message, failed) if x)
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
            if live.mounts and live.state == "running":  # what its processes wrote, committed as they end
                self._unmount(live, commit=True)

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
