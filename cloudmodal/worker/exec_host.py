"""A worker's exec host: shells and commands run inside this running container (``cloudmodal shell``,
``cloudmodal container exec``), started by :func:`start_exec_host` once the worker is set up.

**Connection.** The worker dials its control plane, never the other way (a cloud node behind NAT works as a
local process does): one WebSocket long poll (``/v1/workers/{id}/exec/commands``) brings the commands of this
worker's sessions — ``start``, ``stdin``, ``eof``, ``resize``, ``signal``, ``close`` — and a second one
(``.../exec/events``) carries their output, starts and exits back, batched, under the control plane's flow
control. Both use the worker's own transport and ``worker:<id>`` token, which only ever reaches this worker's
sessions (:mod:`cloudmodal.server.svc_container` holds the client's side).

**Where a command runs.** A child of the worker's process, started from a thread made after the worker's
set-up, so it is in the function's container as the user's code is: the same interpreter and image (its
``bin`` first on ``PATH``), the same working directory, the function's environment and secrets
(``os.environ`` of the worker, from which :func:`cloudmodal.worker.runtime.take_token` removed the
control-plane token — it is dropped here again by name in case), and the volumes mounted in the worker's
mount namespace (:mod:`cloudmodal.worker.volumes`). A child can also read its parent's *initial* environment
(``/proc/$PPID/environ``: the block the worker was started with, which ``unsetenv`` does not change); a cloud
node's bootstrap starts the worker with the token in it, so :func:`scrub_initial_environ` blanks that entry
there before the first session. The token is then in this process's memory only.

**PTY.** A session asked with ``pty`` gets a pseudo-terminal (``os.openpty``) of the client's size, as its
controlling terminal in a session of its own (a small shim sets ``TIOCSCTTY`` and execs the command), so job
control, ``Ctrl-C`` and full-screen programs work; ``resize`` sets the window size (the kernel sends
``SIGWINCH``). Without it, stdin, stdout and stderr are pipes. Either way the process leads its own process
group: ``signal`` goes to it (to the terminal's foreground group with a PTY), and ``close`` and the end kill
the whole group.

**Ends.** The process exits: what it left in its group is killed, its output is drained, and its exit code
sent (``128 + n`` for a signal ``n``). The worker drains (scale-down, ``container stop``, SIGTERM): sessions
are hung up at once (``SIGHUP``, then ``SIGKILL`` after :data:`HANGUP_GRACE_S`) and their exits reported,
so an open shell never holds a container up; clients see EOF and the shell's status with a message. A worker
killed outright takes its sessions' processes with it (``PR_SET_PDEATHSIG``), and the control plane ends their
sessions when it sees the worker gone.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import queue
import shutil
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
from typing import Any

READ = 65536
BATCH_BYTES = 1 << 20  # at most this much output in one message to the control plane
HANGUP_GRACE_S = 2.0  # after SIGHUP, how long a session's processes have before SIGKILL
RETRY_S = 1.0
DROP_ENV = ("CLOUDMODAL_TOKEN", "CLOUDMODAL_TOKEN_FILE", "CLOUDMODAL_CREDENTIALS")

# Runs (with the worker's interpreter, isolated) between fork and the command: dies with the worker, takes the
# PTY as its controlling terminal, then becomes the command.
SHIM = r"""
import ctypes, fcntl, os, sys, termios
parent, tty, argv = int(sys.argv[1]), sys.argv[2] == "1", sys.argv[3:]
try:
    ctypes.CDLL(None, use_errno=True).prctl(1, 9)  # PR_SET_PDEATHSIG = SIGKILL: dies with the worker
except Exception:
    pass
if os.getppid() != parent:
    os._exit(137)
if tty:
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)
try:
    os.execvp(argv[0], argv)
except OSError as e:
    sys.stderr.write(f"{argv[0]}: {e.strerror}\n")
    os._exit(127 if isinstance(e, FileNotFoundError) else 126)
"""


def scrub_initial_environ(names: tuple[str, ...] = DROP_ENV) -> int:
    """Blank the ``NAME=VALUE`` entries of ``names`` in this process's initial environment block: what
    ``/proc/<pid>/environ`` shows to other processes (this worker's children among them) for its whole life,
    whatever ``os.environ`` holds now. The number of entries blanked; 0 where there is nothing to do or no
    ``/proc`` to do it with.

    The block is the one the kernel copied at ``execve``; nothing points into it once ``unsetenv`` removed the
    variable (:func:`cloudmodal.worker.runtime.take_token`), and ``os.environ`` holds copies. It is written
    through ``/proc/self/mem``, so an address that is not this process's (a kernel without the fields) fails
    with an error instead of a crash."""
    wanted = {n.encode() for n in names}
    try:
        with open("/proc/self/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        # after the ")" come fields 3...; env_start and env_end are fields 50 and 51 (proc(5), Linux 3.5+)
        start, end = int(fields[47]), int(fields[48])
        with open("/proc/self/environ", "rb") as f:
            block = f.read()
    except (OSError, IndexError, ValueError):
        return 0
    if not start or end - start != len(block):
        return 0
    blanked = 0
    offset = 0
    with contextlib.suppress(OSError), open("/proc/self/mem", "r+b", buffering=0) as mem:
        for entry in block.split(b"\0"):
            name, eq, _ = entry.partition(b"=")
            if eq and name in wanted:
                mem.seek(start + offset)
                mem.write(b"\0" * len(entry))
                blanked += 1
            offset += len(entry) + 1
    return blanked


def default_shell() -> str:
    """The container's shell: bash where there is one, else sh."""
    return shutil.which("bash") or "/bin/sh"


def exec_env(term: str | None, pty: bool) -> dict[str, str]:
    """The environment of a session's process: the worker's (the function's env and secrets; never the
    control-plane token), the image's ``bin`` first on ``PATH``, the client's ``TERM`` with a PTY."""
    env = {k: v for k, v in os.environ.items() if k not in DROP_ENV}
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", os.defpath)
    if pty:
        env["TERM"] = term or env.get("TERM") or "xterm-256color"
    return env


def set_winsize(fd: int, rows: int, cols: int) -> None:
    with contextlib.suppress(OSError):
        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


class Session:
    """One command in this container, on a thread of its own (its parent: ``PR_SET_PDEATHSIG`` follows the
    thread that started it, which waits for it)."""

    def __init__(self, host: ExecHost, exec_id: str, spec: dict[str, Any]) -> None:
        self.host = host
        self.id = exec_id
        self.spec = spec
        self.pty = bool(spec.get("pty"))
        self.proc: subprocess.Popen[bytes] | None = None
        self.master = -1
        # master's closing and the command thread's ioctls on it take turns: a number closed is reused by
        # the next open in this process (its connection to the control plane, say)
        self.master_lock = threading.Lock()
        self.inbox: queue.Queue[bytes | None] = queue.Queue()  # stdin bytes; None: end of stdin
        self.started = threading.Event()
        self.exited = threading.Event()  # the process has exited: its stdin writer stops
        self.done = threading.Event()  # its exit is reported

    # -- on the host's command thread ----------------------------------------------------------------------
    def command(self, op: str, data: bytes) -> None:
        if op == "stdin":
            self.inbox.put(data)
        elif op == "eof":
            self.inbox.put(None)
        elif op == "resize" and self.pty:
            rows, cols = json.loads(data)
            if self.started.wait(5):
                with self.master_lock:
                    if self.master >= 0:
                        set_winsize(self.master, int(rows), int(cols))
        elif op == "signal":
            self.signal(int(data))
        elif op == "close":
            threading.Thread(target=self.hang_up, name=f"exec-close-{self.id}", daemon=True).start()

    def signal(self, sig: int) -> None:
        if not self.started.wait(5) or self.proc is None:
            return
        group = self.proc.pid
        with self.master_lock, contextlib.suppress(OSError):
            if self.pty and self.master >= 0:
                group = os.tcgetpgrp(self.master)  # the terminal's foreground job, as a keyboard's ^C
        with contextlib.suppress(OSError):
            os.killpg(group, sig)

    def hang_up(self) -> None:
        """End the session: SIGHUP to its group, SIGKILL if it is still there after the grace."""
        if not self.started.wait(5) or self.proc is None:
            return
        with contextlib.suppress(OSError):
            os.killpg(self.proc.pid, signal.SIGHUP)
        if not self.done.wait(HANGUP_GRACE_S):
            with contextlib.suppress(OSError):
                os.killpg(self.proc.pid, signal.SIGKILL)

    # -- its own thread ------------------------------------------------------------------------------------
    def run(self) -> None:
        try:
            self._run()
        finally:
            self.done.set()
            self.host.forget(self)

    def _run(self) -> None:
        argv = list(self.spec.get("argv") or ()) or [default_shell()]
        env = exec_env(self.spec.get("term"), self.pty)
        shim = [sys.executable, "-I", "-S", "-c", SHIM, str(os.getpid()), "1" if self.pty else "0", *argv]
        emit = self.host.emit
        try:
            if self.pty:
                self.master, slave = os.openpty()
                set_winsize(slave, int(self.spec.get("rows") or 24), int(self.spec.get("cols") or 80))
                try:
                    self.proc = subprocess.Popen(
                        shim, stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True
                    )
                finally:
                    os.close(slave)
            else:
                self.proc = subprocess.Popen(
                    shim,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    env=env,
                    start_new_session=True,
                )
        except OSError as e:
            emit(self.id, "F", f"Could not start {argv[0]!r} in the container: {e}".encode())
            emit(self.id, "X", b"127")
            self._close_master()
            return
        self.started.set()
        emit(self.id, "P", str(self.proc.pid).encode())
        if self.pty:
            readers = [self._reader(self.master, "O")]
            out_fd = self.master
        else:
            assert (
                self.proc.stdout is not None and self.proc.stderr is not None and self.proc.stdin is not None
            )
            readers = [
                self._reader(self.proc.stdout.fileno(), "O"),
                self._reader(self.proc.stderr.fileno(), "R"),
            ]
            out_fd = self.proc.stdin.fileno()
        # the writer and readers each use a duplicate of their descriptor and close it when they end: this
        # thread closes the originals below, and one of them may still be running then
        threading.Thread(
            target=self._writer, args=(os.dup(out_fd),), name=f"exec-in-{self.id}", daemon=True
        ).start()
        code = self.proc.wait()
        self.exited.set()
        with contextlib.suppress(OSError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # what it left running in its group goes with it
        for t in readers:
            t.join(5)  # a process that left its group and kept the terminal does not hold the exit
        self.inbox.put(None)
        if self.pty:
            self._close_master()
        else:
            for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
                with contextlib.suppress(OSError):
                    if f is not None:
                        f.close()
        emit(self.id, "X", str(128 - code if code < 0 else code).encode())

    def _close_master(self) -> None:
        with self.master_lock:
            if self.master >= 0:
                with contextlib.suppress(OSError):
                    os.close(self.master)
                self.master = -1

    def _reader(self, fd: int, kind: str) -> threading.Thread:
        own = os.dup(fd)

        def read() -> None:
            try:
                while True:
                    try:
                        data = os.read(own, READ)
                    except OSError:  # EIO: the PTY's last other end closed
                        break
                    if not data:
                        break
                    self.host.emit(self.id, kind, data)
            finally:
                os.close(own)

        t = threading.Thread(target=read, name=f"exec-out-{self.id}", daemon=True)
        t.start()
        return t

    def _writer(self, fd: int) -> None:
        """Feed the inbox to ``fd`` (this thread's own descriptor, closed when it ends: without a PTY that is
        the end of the process's stdin)."""
        try:
            while True:
                data = self.inbox.get()
                if self.exited.is_set():
                    return
                if data is None:
                    if self.pty:
                        with contextlib.suppress(OSError):
                            os.write(fd, b"\x04")  # end of input on a terminal: ^D at the start of a line
                        continue
                    with contextlib.suppress(OSError):
                        assert self.proc is not None and self.proc.stdin is not None
                        self.proc.stdin.close()
                    return
                try:
                    view = memoryview(data)
                    while view:
                        n = os.write(fd, view)
                        view = view[n:]
                except OSError:
                    return  # the process closed its stdin, or exited
        finally:
            os.close(fd)


class ExecHost:
    def __init__(self, transport: Any, base: str, draining: threading.Event) -> None:
        self.commands = transport.channel(f"{base}/exec/commands")
        self.events = transport.channel(f"{base}/exec/events")
        self.draining = draining
        self.out: queue.Queue[list[Any]] = queue.Queue()
        self.sessions: dict[str, Session] = {}
        self.lock = threading.Lock()
        self.gone = threading.Event()  # the control plane refuses this worker: nothing more to do

    def emit(self, exec_id: str, kind: str, data: bytes) -> None:
        self.out.put([exec_id, kind, data])

    def forget(self, s: Session) -> None:
        with self.lock:
            self.sessions.pop(s.id, None)

    def start(self, exec_id: str, spec: dict[str, Any]) -> None:
        if self.draining.is_set():
            self.emit(exec_id, "F", b"The container is stopping: it takes no new shells.")
            self.emit(exec_id, "X", b"137")
            return
        s = Session(self, exec_id, spec)
        with self.lock:
            self.sessions[exec_id] = s
        threading.Thread(target=s.run, name=f"exec-{exec_id}", daemon=True).start()

    # -- threads ------------------------------------------------------------------------------------------
    def take_commands(self) -> None:
        from cloudmodal import exception as exc
        from cloudmodal.tls import TlsPinError

        after, epoch = 0, ""
        while not self.gone.is_set():
            try:
                reply = self.commands.call({"after": after, "epoch": epoch})
            except exc.AuthError:
                self.gone.set()  # this worker has stopped: its token no longer opens its routes
                return
            except TlsPinError:
                self.gone.set()  # the control plane's certificate is not the pinned one: never dialled again
                return
            except Exception:
                time.sleep(RETRY_S)  # the control plane is away (restarting): dial again
                continue
            if reply.get("epoch") != epoch:
                epoch = reply.get("epoch") or ""
            for seq, exec_id, op, data in reply.get("commands") or ():
                after = max(after, seq)
                if op == "start":
                    if exec_id not in self.sessions:
                        self.start(exec_id, json.loads(data))
                    continue
                with self.lock:
                    s = self.sessions.get(exec_id)
                if s is not None:
                    s.command(op, bytes(data))

    def send_events(self) -> None:
        """Output in batches: what queued up while the previous message was sent goes in the next one."""
        from cloudmodal import exception as exc

        while not self.gone.is_set():
            batch = [self.out.get()]
            size = len(batch[0][2])
            while size < BATCH_BYTES:
                try:
                    item = self.out.get_nowait()
                except queue.Empty:
                    break
                batch.append(item)
                size += len(item[2])
            try:
                self.events.call({"events": batch})
            except exc.AuthError:
                self.gone.set()
                return
            except Exception:
                pass  # lost past the transport's patience: the control plane ends those sessions itself

    def watch_drain(self) -> None:
        """Hang up every session once the worker drains: an open shell never holds the container up."""
        self.draining.wait()
        with self.lock:
            sessions = list(self.sessions.values())
        for s in sessions:
            self.emit(s.id, "F", b"The container is stopping: the session was hung up.")
            threading.Thread(target=s.hang_up, name=f"exec-hangup-{s.id}", daemon=True).start()

    def kill_all(self) -> None:
        """At the worker's exit: nothing started here outlives it."""
        with self.lock:
            sessions = list(self.sessions.values())
        for s in sessions:
            if s.proc is not None:
                with contextlib.suppress(OSError):
                    os.killpg(s.proc.pid, signal.SIGKILL)

    def start_threads(self) -> None:
        import atexit

        atexit.register(self.kill_all)
        for target in (self.take_commands, self.send_events, self.watch_drain):
            threading.Thread(target=target, name=f"exec-host-{target.__name__}", daemon=True).start()


def start_exec_host(worker: Any) -> ExecHost:
    """Start ``worker``'s exec host (:class:`cloudmodal.worker.runtime.Worker`, set up: its volumes mounted and
    its environment final). Its threads are daemons; they end with the worker."""
    scrub_initial_environ()  # before any session: a child could read it in /proc/$PPID/environ
    host = ExecHost(worker.t, worker.base, worker.draining)
    host.start_threads()
    return host
