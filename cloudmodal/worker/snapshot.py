"""Memory snapshots (``enable_memory_snapshot=True``) on one node, as a fork server.

Per function version, a *zygote* process imports the user's module, creates the class instance and runs its
``@enter(snap=True)`` hooks once; each new container of that function on the node is a ``fork()`` of it that
then runs the ``@enter(snap=False)`` hooks, registers with the control plane under its own identity and
serves. The fork copies the warmed memory (imports, loaded models) copy-on-write, so a container starts in
milliseconds instead of paying the imports again.

Roles (all on the node, all the same user):

- the *agent* (:class:`SnapshotAgent`, in the process that launches workers: the local provider, or a node
  daemon on a cloud node) listens on a private Unix socket, owns the zygotes and asks them to fork;
- a *zygote* (:func:`zygote_main`) never sees a worker token and
  never talks to the control plane: the definition and the blobs it needs come from the agent on stdin;
- a *container* is a fork of the zygote; its environment and token come on a pipe only it reads, after the
  fork, and it opens its own connections.

A worker started the ordinary way for such a function registers, sees the flag, hands its identity to the
agent (:func:`hand_off`), and exits once the agent has forked its replacement from the zygote; later
containers of that function are forked directly by the agent.

A fork is refused (:class:`SnapshotError`, reported as the container's startup failure) where it would be
wrong: Python threads still alive after the import and the snap hooks (the child would not have them), and an
initialized CUDA context (a CPU snapshot cannot hold one).
"""

from __future__ import annotations

import base64
import contextlib
import gc
import hashlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cloudmodal.exception import ExecutionError

AGENT_ENV = "CLOUDMODAL_SNAPSHOT_AGENT"  # the agent's socket path, in a worker's environment
ZYGOTE_FD_ENV = "CLOUDMODAL_ZYGOTE_FD"  # the zygote's end of its control socket
TOKEN_ENV = "CLOUDMODAL_TOKEN"
ZYGOTE_COMMAND = "from cloudmodal.worker.snapshot import zygote_main; raise SystemExit(zygote_main())"
MAX_MESSAGE = 64 * 1024  # control messages are small JSON; bulk data goes through pipes


class SnapshotError(ExecutionError):
    """A memory snapshot could not be taken (or a container not started from it)."""


# -- what makes a fork unsafe --------------------------------------------------------------------------------


def live_threads() -> list[threading.Thread]:
    """Python threads other than the main one (a fork keeps only the calling thread)."""
    main = threading.main_thread()
    return [t for t in threading.enumerate() if t is not main and t.is_alive()]


def cuda_initialized(modules: Mapping[str, Any] | None = None) -> bool:
    """Whether a CUDA context exists in this process, as far as an imported torch knows. Importing torch
    is never forced here: a process that did not import it has not initialized CUDA through it."""
    torch = (sys.modules if modules is None else modules).get("torch")
    cuda = getattr(torch, "cuda", None)
    check = getattr(cuda, "is_initialized", None)
    if not callable(check):
        return False
    try:
        return bool(check())
    except Exception:
        return False


def check_fork_safe(
    what: str,
    *,
    threads: list[threading.Thread] | None = None,
    modules: Mapping[str, Any] | None = None,
) -> None:
    """Raise :class:`SnapshotError` naming what would not survive the fork of this process."""
    if cuda_initialized(modules):
        raise SnapshotError(
            f"Cannot take a memory snapshot of {what}: CUDA was initialized (torch.cuda.is_initialized() is "
            "True) during the import or an @enter(snap=True) hook. A CPU memory snapshot cannot hold a GPU "
            "context; move the GPU work (model.to('cuda'), torch.cuda calls) to an @enter(snap=False) hook, "
            "which runs in each container after the restore"
        )
    alive = live_threads() if threads is None else threads
    if alive:
        names = ", ".join(f"{t.name!r}" + (" (daemon)" if t.daemon else "") for t in alive)
        raise SnapshotError(
            f"Cannot take a memory snapshot of {what}: threads started during the import or an "
            f"@enter(snap=True) hook are still running: {names}. A snapshot copies memory, not threads, so "
            "the containers restored from it would not have them. Stop them before the snap=True hook "
            "returns, or start them in an @enter(snap=False) hook (it runs in each container after the "
            "restore)"
        )


# -- the warmed state a container starts from ----------------------------------------------------------------


@dataclass(frozen=True)
class Restored:
    """What a container forked from a zygote inherits: the loaded target, for one function version."""

    function_id: str
    version: Any
    kind: str
    target: Any
    instance: Any

    def matches(self, defn: Mapping[str, Any]) -> bool:
        return defn.get("id") == self.function_id and defn.get("version") == self.version


_agent_path: str | None = None


def take_agent_path(environ: Any = None) -> str | None:
    """The node agent's socket path handed to this worker, removed from ``environ`` (default ``os.environ``)
    so the user's code and what it starts do not see it; kept for :func:`wanted` and :func:`hand_off`."""
    global _agent_path
    env = os.environ if environ is None else environ
    _agent_path = env.pop(AGENT_ENV, None) or None
    return _agent_path


def wanted(defn: Mapping[str, Any]) -> bool:
    """Whether this worker should start from a snapshot: the function asks for one and an agent runs."""
    from cloudmodal.spec import FunctionSpec

    return bool(_agent_path) and FunctionSpec.from_wire(defn["spec"]).enable_memory_snapshot


def definition_for_zygote(defn: Mapping[str, Any]) -> dict[str, Any]:
    """The parts of a worker's definition a zygote loads from (no lease settings, which are per worker)."""
    return {k: v for k, v in defn.items() if k not in ("lease_s", "heartbeat_s")}


class _Blobs:
    """Stands in for the transport in the zygote: the blobs the worker fetched before the hand-off."""

    def __init__(self, blobs: Mapping[str, bytes]) -> None:
        self.blobs = blobs

    def request(self, method: str, path: str, **_kw: Any) -> bytes:
        blob = path.rstrip("/").rsplit("/", 1)[-1]
        if method != "GET" or blob not in self.blobs:
            raise SnapshotError(
                f"The snapshot's zygote has no copy of {path}; it does not call the control plane."
            )
        return self.blobs[blob]


def prefetch_blobs(transport: Any, defn: Mapping[str, Any]) -> dict[str, str]:
    """The blobs :func:`cloudmodal.worker.loader.load_target` reads for ``defn``, base64 by id."""
    out: dict[str, str] = {}
    for key in ("source_blob", "pickled_blob"):
        blob = defn.get(key)
        if isinstance(blob, str) and blob:
            raw = transport.request("GET", f"/v1/blobs/{blob}", raw_response=True)
            out[blob] = base64.b64encode(raw).decode()
    return out


def load_warm(defn: Mapping[str, Any], blobs: Mapping[str, bytes]) -> Restored:
    """Import the target and run the ``@enter(snap=True)`` hooks, in this (zygote) process."""
    from cloudmodal.worker.loader import load_target

    kind, target, params = load_target(_Blobs(blobs), dict(defn))
    instance = None
    if kind == "cls":
        from cloudmodal.partial_function import instantiate, run_lifecycle_hooks

        instance = instantiate(target, **params)
        run_lifecycle_hooks(instance, "enter_pre_snapshot")
    return Restored(str(defn.get("id")), defn.get("version"), kind, target, instance)


# -- the zygote process ----------------------------------------------------------------------------------------


def _send(sock: socket.socket, msg: dict[str, Any], fds: list[int] | None = None) -> None:
    data = json.dumps(msg).encode()
    if fds:
        socket.send_fds(sock, [data], fds)
    else:
        sock.send(data)


def zygote_main() -> int:
    """The zygote process (:data:`ZYGOTE_COMMAND`): load, warm up, then fork containers on request."""
    sock = socket.socket(fileno=int(os.environ.pop(ZYGOTE_FD_ENV)))
    job = json.loads(sys.stdin.buffer.read() or b"{}")
    defn = job["defn"]
    blobs = {k: base64.b64decode(v) for k, v in (job.get("blobs") or {}).items()}
    what = f"function {defn.get('name')!r} (version {defn.get('version')})"
    for k, v in (defn.get("inline_env") or {}).items():
        os.environ[k] = v
    try:
        image = load_warm(defn, blobs)
        _preload_runtime()
        check_fork_safe(what)
    except BaseException as e:
        traceback.print_exc()
        msg = str(e) if isinstance(e, SnapshotError) else f"{type(e).__name__}: {e}"
        with contextlib.suppress(OSError):
            _send(sock, {"op": "failed", "error": msg})
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)  # threads left running must not keep it alive
    del blobs, job
    gc.freeze()  # the collector leaves the warmed objects alone: their pages stay shared with the forks
    print(f"[cloudmodal] snapshot of {what} ready (pid {os.getpid()})", flush=True)
    _send(sock, {"op": "ready", "pid": os.getpid()})
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # wakes the select below through the wakeup fd
    while True:
        readable, _, _ = select.select([sock.fileno(), wake_r], [], [], 1.0)
        if wake_r in readable:
            with contextlib.suppress(BlockingIOError, InterruptedError):
                os.read(wake_r, 4096)
        _report_exits(sock)
        if sock.fileno() not in readable:
            continue
        try:
            data, fds, _flags, _addr = socket.recv_fds(sock, MAX_MESSAGE, 4)
        except InterruptedError:
            continue
        if not data:  # the agent is gone: so is the reason to exist
            os._exit(0)
        msg = json.loads(data)
        if msg.get("op") != "fork" or len(fds) != 2:
            for fd in fds:
                os.close(fd)
            continue
        creds_r, log_fd = fds
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _container(image, sock, creds_r, log_fd, (wake_r, wake_w))
        os.close(creds_r)
        os.close(log_fd)
        _send(sock, {"op": "forked", "worker_id": msg.get("worker_id"), "pid": pid})


def _preload_runtime() -> None:
    """What every container imports before its first request, imported once here (no connection opened)."""
    import cloudmodal.partial_function
    import cloudmodal.worker.preemption
    import cloudmodal.worker.runtime  # noqa: F401
    from cloudmodal.client.transport import warm_up
    from cloudmodal.settings import settings

    warm_up()
    with contextlib.suppress(ValueError):
        settings()


def _report_exits(sock: socket.socket) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        with contextlib.suppress(OSError):
            _send(sock, {"op": "exited", "pid": pid, "rc": os.waitstatus_to_exitcode(status)})


def _container(
    image: Restored, sock: socket.socket, creds_r: int, log_fd: int, wake: tuple[int, int]
) -> None:
    """In the forked child: become the worker whose environment and token come on ``creds_r``."""
    rc = 1
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for fd in wake:
            os.close(fd)
        sock.close()  # the zygote's channel to the agent is not this container's
        os.setsid()  # its own process group: the provider stops it (and what it starts) with killpg
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        os.close(log_fd)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        chunks = []
        while chunk := os.read(creds_r, 65536):
            chunks.append(chunk)
        os.close(creds_r)
        env = json.loads(b"".join(chunks))
        token = env.pop(TOKEN_ENV, None)
        os.environ.clear()
        os.environ.update(env)
        from cloudmodal.worker.runtime import main

        rc = main(token=token, restored=image)
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(rc)


# -- the worker side of a hand-off -----------------------------------------------------------------------------


def hand_off(transport: Any, worker_id: str, token: str | None, defn: Mapping[str, Any]) -> None:
    """Ask the node's agent to start this worker again as a fork of the function's zygote (creating it if
    needed). Returns once the replacement runs: the caller exits without a word to the control plane, the
    replacement registers under the same identity. Raises :class:`SnapshotError` when no snapshot can be had.
    """
    path = _agent_path or ""
    request = {
        "worker_id": worker_id,
        "token": token,
        "python": sys.executable,
        "defn": definition_for_zygote(defn),
        "blobs": prefetch_blobs(transport, defn),
    }
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(path)
            s.sendall(json.dumps(request).encode() + b"\n")
            s.shutdown(socket.SHUT_WR)
            reply = _read_all(s)
    except OSError as e:
        raise SnapshotError(
            f"Cannot reach the node's snapshot agent at {path}: {e}. The process that launched this worker "
            "(the local provider, or the node's agent) must be running."
        ) from e
    answer = json.loads(reply or b"{}")
    if not answer.get("ok"):
        raise SnapshotError(answer.get("error") or "the snapshot agent gave no answer")


def _read_all(s: socket.socket) -> bytes:
    chunks = []
    while chunk := s.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


# -- the agent side ----------------------------------------------------------------------------------------------


class ForkedProcess:
    """A container forked from a zygote, as the agent's ``Popen``-like handle: ``pid``, ``poll``, ``wait``.
    Its exit status comes from the zygote (its parent); a pidfd tells when it is gone even if the zygote is."""

    LOST_RC = 255  # gone, with its zygote: the status is unknown

    def __init__(self, pid: int, zygote: Zygote) -> None:
        self.pid = pid
        self.zygote = zygote
        self.returncode: int | None = None
        # poll() runs on several threads (the provider's janitor, describe, terminate): the pidfd is closed
        # once, and never selected on after it is (its number is reused by the next open in this process)
        self._lock = threading.Lock()
        try:
            self._pidfd: int | None = os.pidfd_open(pid)
        except OSError:
            self._pidfd = None

    def poll(self) -> int | None:
        with self._lock:
            if self.returncode is not None:
                return self.returncode
            rc = self.zygote.exits.get(self.pid)
            if rc is None and self._gone() and not self.zygote.alive():
                rc = self.LOST_RC
            if rc is not None:
                self.returncode = rc
                fd, self._pidfd = self._pidfd, None
                if fd is not None:
                    os.close(fd)
            return rc

    def _gone(self) -> bool:
        if self._pidfd is None:
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                return True
            except PermissionError:
                return False
            return False
        readable, _, _ = select.select([self._pidfd], [], [], 0)
        return bool(readable)

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            rc = self.poll()
            if rc is not None:
                return rc
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired([f"pid {self.pid}"], timeout or 0.0)
            time.sleep(0.01)


class Zygote:
    """One function version's warmed process, from the agent's side."""

    def __init__(self, function_id: str, version: Any, python: str, log_path: Path) -> None:
        self.function_id = function_id
        self.version = version
        self.python = python
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.sock: socket.socket | None = None
        self.error: str | None = None
        self.ready = threading.Event()
        self.exits: dict[int, int] = {}
        self._forked: dict[str, int] = {}
        self._cond = threading.Condition()
        self._send_lock = threading.Lock()
        self.idle_since: float | None = None

    def start(self, env: dict[str, str], defn: Mapping[str, Any], blobs: Mapping[str, str]) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = dict(env)
        env[ZYGOTE_FD_ENV] = str(theirs.fileno())
        env.pop(TOKEN_ENV, None)
        with open(self.log_path, "ab", buffering=0) as log:
            os.chmod(self.log_path, 0o600)
            self.proc = subprocess.Popen(
                [self.python, "-c", ZYGOTE_COMMAND],
                env=env,
                stdin=subprocess.PIPE,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                pass_fds=(theirs.fileno(),),
            )
        theirs.close()
        self.sock = ours
        threading.Thread(target=self._read_loop, name=f"zygote-{self.function_id}", daemon=True).start()
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps({"defn": dict(defn), "blobs": dict(blobs)}).encode())
            self.proc.stdin.close()
        except OSError:
            pass  # it died at once: the read loop reports it

    def _read_loop(self) -> None:
        assert self.sock is not None and self.proc is not None
        while True:
            try:
                data = self.sock.recv(MAX_MESSAGE)
            except OSError:
                data = b""
            if not data:
                break
            msg = json.loads(data)
            with self._cond:
                if msg["op"] == "ready":
                    self.ready.set()
                elif msg["op"] == "failed":
                    self.error = msg.get("error") or "the snapshot could not be taken"
                elif msg["op"] == "forked":
                    self._forked[str(msg["worker_id"])] = int(msg["pid"])
                elif msg["op"] == "exited":
                    self.exits[int(msg["pid"])] = int(msg["rc"])
                self._cond.notify_all()
        self.proc.wait()
        with self._cond:
            if not self.ready.is_set() and self.error is None:
                self.error = (
                    f"The snapshot process of function {self.function_id} exited with code "
                    f"{self.proc.returncode} before it was ready; see {self.log_path}."
                )
            self._cond.notify_all()
        self.ready.set()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(self, timeout: float) -> str | None:
        """None once it serves forks; else why not."""
        if not self.ready.wait(timeout):
            return f"The snapshot of function {self.function_id} was not ready within {timeout:g} s; see {self.log_path}."
        return self.error

    def fork(
        self, worker_id: str, env: Mapping[str, str], log_path: Path, timeout: float = 30.0
    ) -> ForkedProcess:
        """A new container for ``worker_id``; ``env`` (with its token) goes on a pipe only the child reads."""
        if self.sock is None or not self.alive():
            raise SnapshotError(f"The snapshot process of function {self.function_id} is not running.")
        creds_r, creds_w = os.pipe()
        log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            with self._send_lock:
                _send(self.sock, {"op": "fork", "worker_id": worker_id}, [creds_r, log_fd])
        finally:
            os.close(creds_r)
            os.close(log_fd)
        deadline = time.monotonic() + timeout
        with self._cond:
            while worker_id not in self._forked:
                left = deadline - time.monotonic()
                if left <= 0 or not self.alive():
                    os.close(creds_w)
                    raise SnapshotError(f"The snapshot process of function {self.function_id} did not fork.")
                self._cond.wait(min(left, 0.2))
            pid = self._forked.pop(worker_id)
        child = ForkedProcess(pid, self)
        with os.fdopen(creds_w, "wb") as w:
            with contextlib.suppress(OSError):
                w.write(json.dumps(dict(env)).encode())
        return child

    def stop(self) -> None:
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)  # the read loop's recv returns, before the close
            with contextlib.suppress(OSError):
                self.sock.close()
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def token_hash(token: str | None) -> str:
    return hashlib.sha256((token or "").encode()).hexdigest()


class SnapshotAgent:
    """Listens on a private Unix socket for hand-offs (see :func:`hand_off`); ``handle(request) -> reply``
    does the work (the provider's)."""

    def __init__(self, handle: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
        import tempfile

        self._handle = handle
        self.dir = Path(tempfile.mkdtemp(prefix="cm-snap-"))  # 0700; short enough for a socket path
        self.path = str(self.dir / "agent.sock")
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(self.path)
        os.chmod(self.path, 0o600)
        self._server.listen(64)
        self._closed = False
        threading.Thread(target=self._accept_loop, name="snapshot-agent", daemon=True).start()

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), name="snapshot-handoff", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                request = json.loads(_read_all(conn) or b"{}")
                reply = self._handle(request)
            except Exception as e:
                reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
            with contextlib.suppress(OSError):
                conn.sendall(json.dumps(reply).encode())

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._server.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self._server.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        with contextlib.suppress(OSError):
            self.dir.rmdir()
