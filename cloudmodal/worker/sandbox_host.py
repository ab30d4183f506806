"""The host of one sandbox: ``python -m cloudmodal.worker.sandbox_host``.

Started by the control plane (:mod:`cloudmodal.server.svc_sandbox`; on a cloud node, by the node's bootstrap) with
one JSON line on stdin: ``{"url", "token", "sandbox_id", "spec"}``. The token is scoped to this one sandbox
(``sandbox:<id>``) and stays in this process's memory: it is in no environment, file or command line, and the
sandboxed processes, in their own PID namespace, cannot see this process. Stdin stays open: when it closes (the
control plane is gone) the sandbox is killed and the host exits.

The command runs under bubblewrap (:func:`bwrap_argv`): the image read-only (here: the system directories and the
Python environment; with an image's packages, the environment built for it, ``spec["python"]``), a private
``/tmp`` and workdir, the volumes' working copies bound at their paths (``spec["mounts"]``, prepared outside
the sandbox by the control plane), a fresh ``/proc`` of a new PID namespace, no network with
``block_network``, killed with its parent. Inside, :mod:`cloudmodal.worker.sandbox_agent` starts the command
and later ``exec``s and carries their stdio over a pipe; this process relays it to the control plane over two
WebSockets it dials (commands in, output and exits out), so it works the same from behind a NAT.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import json
import os
import queue
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

HEADER = struct.Struct(">cII")
BATCH_BYTES = 1 << 20  # at most this much output goes in one message to the control plane
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/etc")
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def image_dirs() -> list[str]:
    """What the local provider's image is: the current Python environment (its prefix and the base
    interpreter's), read-only. Directories under a system directory are already there."""
    found: list[str] = []
    for d in {sys.prefix, sys.base_prefix, str(Path(sys.executable).resolve().parent.parent)}:
        if not any(d == s or d.startswith(s + "/") for s in SYSTEM_DIRS) and os.path.isdir(d):
            found.append(d)
    return sorted(found)


@functools.cache
def private_in_etc(etc: str = "/etc") -> list[str]:
    """``/etc``'s files and directories that not every user of the machine may read (``shadow``, private keys):
    hidden in the sandbox, whose processes run as the host's user in a user namespace."""
    argv: list[str] = []
    for root, dirs, files in os.walk(etc):
        for d in list(dirs):
            path = os.path.join(root, d)
            if not os.path.islink(path) and os.stat(path).st_mode & 0o005 != 0o005:
                argv += ["--tmpfs", path]
                dirs.remove(d)
        for f in files:
            path = os.path.join(root, f)
            with contextlib.suppress(OSError):
                if not os.path.islink(path) and os.stat(path).st_mode & 0o004 == 0:
                    argv += ["--ro-bind", "/dev/null", path]
    return argv


def image_python(spec: dict[str, Any]) -> str:
    """The sandbox's Python: the image's environment built for it on this machine (``spec["python"]``, see
    :func:`cloudmodal.providers.envs.resolve_python`), else this host's own (on a cloud node: the image's venv)."""
    return str(spec.get("python") or sys.executable)


def image_prefix(spec: dict[str, Any]) -> str:
    """The prefix of the sandbox's Python environment (its ``bin`` goes first on ``PATH``)."""
    python = spec.get("python")
    return str(Path(python).parent.parent) if python else sys.prefix


def _under_system(d: str) -> bool:
    return any(d == s or d.startswith(s + "/") for s in SYSTEM_DIRS)


def bwrap_argv(spec: dict[str, Any], *, bwrap: str = "bwrap") -> list[str]:
    """The bubblewrap command line that runs the agent (and through it the sandbox's commands) for ``spec``."""
    argv = [bwrap, "--die-with-parent", "--new-session", "--unshare-pid", "--unshare-ipc", "--unshare-uts"]
    argv += ["--unshare-user", "--cap-drop", "ALL", "--hostname", "sandbox"]
    if spec.get("block_network"):
        argv.append("--unshare-net")
    # the private directories first: a bind below one of them (the base interpreter under /root) stays visible
    workdir = spec.get("workdir") or "/root"
    argv += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp"]
    if spec.get("gpu"):  # on a GPU node: its NVIDIA devices (the driver's libraries are under /usr)
        for dev in sorted(glob.glob("/dev/nvidia*")):
            if not os.path.isdir(dev):
                argv += ["--dev-bind", dev, dev]
    if workdir != "/tmp":
        argv += ["--tmpfs", workdir]
    for d in SYSTEM_DIRS:
        if os.path.islink(d):
            argv += ["--symlink", os.readlink(d), d]
        elif os.path.isdir(d):
            argv += ["--ro-bind", d, d]
    if os.path.isdir("/etc") and not os.path.islink("/etc"):
        argv += private_in_etc("/etc")
    for d in image_dirs():
        argv += ["--ro-bind", d, d]
    prefix = image_prefix(spec)
    if spec.get("python") and not _under_system(prefix):  # the image's environment, built for it: read-only
        argv += ["--ro-bind", prefix, prefix]
    # volumes: their working copies (made by the control plane outside the sandbox), read-write unless
    # mounted read_only; after everything above, so that a mount under the workdir or /tmp shows
    for m in spec.get("mounts") or ():
        argv += ["--ro-bind" if m.get("read_only") else "--bind", m["source"], m["path"]]
    argv += ["--chdir", workdir, "--clearenv"]
    agent = (Path(__file__).parent / "sandbox_agent.py").read_text()
    # the command itself goes to the agent on its stdin (main_command), not here: every user of the machine
    # reads command lines, and its environment may hold secrets' values
    argv += ["--", image_python(spec), "-I", "-S", "-c", agent, "main" if spec.get("argv") else ""]
    return argv


def main_command(spec: dict[str, Any]) -> bytes:
    """The agent's frame that starts the sandbox's own command (process 0)."""
    workdir = spec.get("workdir") or "/root"
    start = {
        "argv": spec["argv"],
        "cwd": workdir,
        "env": sandbox_env(spec, workdir, spec.get("env")),
        **limits(spec),
    }
    payload = json.dumps(start).encode()
    return HEADER.pack(b"S", 0, len(payload)) + payload


def limits(spec: dict[str, Any]) -> dict[str, Any]:
    """What the agent applies to each process it starts: ``memory`` (MiB) as its address-space limit."""
    memory = spec.get("memory_mib")
    return {"memory_bytes": int(memory) * 1024 * 1024} if memory else {}


def sandbox_env(spec: dict[str, Any], workdir: str, env: dict[str, str] | None) -> dict[str, str]:
    """The environment of a process of the sandbox: a plain one, the image's Python first on ``PATH``, the
    image's ``env`` (``spec["image_env"]``), then ``env`` (the sandbox's or the exec's, with their secrets;
    never this host's)."""
    out = {
        "PATH": os.path.join(image_prefix(spec), "bin") + ":" + DEFAULT_PATH,
        "HOME": workdir,
        "LANG": "C.UTF-8",
        "PYTHONUNBUFFERED": "1",
    }
    out.update(spec.get("image_env") or {})
    out.update(env or {})
    return out


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid``."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                with open(f"/proc/{entry}/stat", "rb") as f:
                    if int(f.read().rsplit(b")", 1)[1].split()[1]) == pid:
                        found.append(int(entry))
    return found


class HostSocket:
    """Requests to one of the host's routes over a WebSocket (each message a body, each reply its answer), as
    :class:`cloudmodal.client.transport.Channel` without its HTTP client (whose set-up would cost every
    sandbox's start). A broken connection is opened again for up to ``patience_s``."""

    def __init__(
        self, url: str, token: str, path: str, patience_s: float = 30.0, fingerprint: str | None = None
    ) -> None:
        """``fingerprint``: the control plane's TLS certificate's (wss://), the only one accepted."""
        from cloudmodal.tls import websocket_ssl

        self.url = "ws" + url[4:] + path
        self.ssl = websocket_ssl(self.url, fingerprint)
        self.headers = {"authorization": f"Bearer {token}"}
        self.patience_s = patience_s
        self.ws: Any = None

    def call(self, body: Any) -> Any:
        import msgpack
        from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException
        from websockets.sync.client import connect

        data = msgpack.packb(body, use_bin_type=True)
        deadline = time.monotonic() + self.patience_s
        while True:
            try:
                if self.ws is None:
                    self.ws = connect(
                        self.url,
                        additional_headers=self.headers,
                        compression=None,
                        max_size=None,
                        open_timeout=5,
                        ssl=self.ssl,
                    ).__enter__()  # entered: the connection is ours to close (see close())
                self.ws.send(data)
                reply = msgpack.unpackb(self.ws.recv(timeout=75), raw=False)
                break
            except InvalidStatus as e:
                self.close()
                raise RuntimeError(
                    f"The control plane refused the sandbox host: HTTP {e.response.status_code}"
                ) from None
            except (OSError, TimeoutError, ConnectionClosed, WebSocketException) as e:
                self.close()
                from cloudmodal.tls import untrusted_error

                if time.monotonic() > deadline or untrusted_error(self.url, e) is not None:
                    raise
                time.sleep(0.2)
        if "ok" in reply:
            return reply["ok"]
        raise RuntimeError(f"The control plane refused the sandbox host's request: {reply}")

    def close(self) -> None:
        ws, self.ws = self.ws, None
        if ws is not None:
            with contextlib.suppress(Exception):
                ws.close()


class Host:
    def __init__(
        self, url: str, token: str, sandbox_id: str, spec: dict[str, Any], fingerprint: str | None = None
    ) -> None:
        self.sandbox_id = sandbox_id
        self.spec = spec
        base = f"/v1/sandboxes/{sandbox_id}/host"
        self.commands = HostSocket(url, token, base + "/commands", fingerprint=fingerprint)
        self.events = HostSocket(url, token, base + "/events", fingerprint=fingerprint)
        self.out: queue.Queue[list[Any] | None] = queue.Queue()
        self.reason = "exit"
        self.lock = threading.Lock()
        self.proc: subprocess.Popen[bytes] | None = None
        self.done = threading.Event()
        self.agent_gone = threading.Event()  # the agent's stdout closed: nothing runs in the sandbox any more

    def start(self) -> None:
        bwrap = shutil.which("bwrap") or "/usr/bin/bwrap"
        self.proc = subprocess.Popen(
            bwrap_argv(self.spec, bwrap=bwrap),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={"PATH": DEFAULT_PATH},
            close_fds=True,
        )
        if self.spec.get("argv"):
            assert self.proc.stdin is not None
            self.proc.stdin.write(main_command(self.spec))
            self.proc.stdin.flush()

    def kill(self, reason: str) -> None:
        """End the sandbox: kill its PID namespace's first process (the kernel then kills every process in the
        namespace), and bubblewrap. Killing bubblewrap alone is not enough: a sandbox killed while it starts may
        not have armed ``--die-with-parent`` yet. Repeated until the agent's pipe closes."""
        with self.lock:
            if self.reason == "exit":
                self.reason = reason
        if self.proc is None:
            return
        for _ in range(50):
            for pid in [*children(self.proc.pid), self.proc.pid]:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            if self.agent_gone.wait(0.1):
                return

    # -- threads ------------------------------------------------------------------------------------------
    def read_agent(self) -> None:
        """Frames from the agent, to the queue :meth:`send_events` empties."""
        assert self.proc is not None and self.proc.stdout is not None
        f = self.proc.stdout
        while True:
            head = f.read(HEADER.size)
            if len(head) < HEADER.size:
                break
            kind, proc, n = HEADER.unpack(head)
            payload = f.read(n) if n else b""
            self.out.put([proc, kind.decode(), payload])
        self.agent_gone.set()
        code = self.proc.wait()
        err = self.proc.stderr.read().decode(errors="replace")[-2000:] if self.proc.stderr else ""
        self.out.put([0, "done", json.dumps({"reason": self.reason, "code": code, "stderr": err}).encode()])
        self.out.put(None)

    def send_events(self) -> None:
        """The agent's output, batched: what has queued up while the previous message was sent goes in the
        next one. The control plane answers once it has room (flow control)."""
        finished = False
        while not finished:
            first = self.out.get()
            if first is None:
                break
            batch, size = [first], len(first[2])
            while size < BATCH_BYTES:
                try:
                    item = self.out.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    finished = True
                    break
                batch.append(item)
                size += len(item[2])
            self.events.call({"events": batch})
        self.done.set()

    def take_commands(self) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        after = 0
        stdin = self.proc.stdin
        while not self.done.is_set():
            try:
                reply = self.commands.call({"after": after})
            except Exception:
                if self.done.is_set():
                    return
                self.kill("error")  # the control plane is unreachable past its patience
                return
            for seq, op, proc, data in reply["commands"]:
                after = seq
                if op == "terminate":
                    self.kill("terminated")
                    continue
                if (
                    op == "S"
                ):  # the host completes an exec's spec: its workdir and environment are the image's
                    start = json.loads(data)
                    cwd = start.get("cwd") or self.spec.get("workdir") or "/root"
                    # the sandbox's own env and secrets (the container's), then the exec's
                    own = {**(self.spec.get("env") or {}), **(start.get("env") or {})}
                    env = sandbox_env(self.spec, self.spec.get("workdir") or "/root", own)
                    full = {"argv": start["argv"], "cwd": cwd, "env": env, **limits(self.spec)}
                    if start.get("timeout"):
                        full["timeout"] = float(start["timeout"])
                    data = json.dumps(full).encode()
                try:
                    stdin.write(HEADER.pack(op.encode(), proc, len(data)) + data)
                    stdin.flush()
                except (BrokenPipeError, ValueError, OSError):
                    pass  # the agent is gone: read_agent reports the end

    def watch_parent(self) -> None:
        while os.read(0, 4096):  # empty at EOF: the control plane closed our stdin or died
            pass
        self.commands.patience_s = self.events.patience_s = 0  # nobody is left to report to
        self.kill("terminated")

    def run(self) -> int:
        self.start()
        timeout = float(self.spec.get("timeout") or 300)
        timer = threading.Timer(timeout, self.kill, ("timeout",))
        timer.daemon = True
        timer.start()
        threads = [
            threading.Thread(target=f, daemon=True, name=f.__name__)
            for f in (self.read_agent, self.take_commands, self.watch_parent)
        ]
        for th in threads:
            th.start()
        try:
            self.send_events()
        except Exception:
            self.kill("error")
            return 1
        finally:
            timer.cancel()
            self.kill("terminated")  # nothing outlives the host
            self.commands.close()
            self.events.close()
        return 0


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    # imported before the configuration is read: a standby host (see svc_sandbox) has this done ahead of time
    import msgpack  # noqa: F401
    import websockets.exceptions  # noqa: F401
    import websockets.sync.client  # noqa: F401

    private_in_etc("/etc")

    line = sys.stdin.buffer.readline()
    if not line:
        return  # a standby no sandbox needed: its control plane has gone
    cfg = json.loads(line)
    from cloudmodal.tls import env_fingerprint

    # the control plane's TLS pin: in the line (its svc_sandbox), else this process's environment
    fingerprint = cfg.get("tls_fingerprint") or env_fingerprint()
    host = Host(cfg["url"], cfg["token"], cfg["sandbox_id"], cfg["spec"], fingerprint)
    del cfg, line
    sys.exit(host.run())


if __name__ == "__main__":
    main()
