"""Bootstrapping a worker on a cloud node over SSH, without blocking the control plane.

Once a driver (:mod:`cloudmodal.providers.nodes`) reports a node running with an address, the control plane
makes a :class:`NodeBootstrap` for it and calls :meth:`NodeBootstrap.poll` from its reconcile loop. Nothing
here waits: each step is the system ``ssh`` client started with :class:`subprocess.Popen`, its output going
to a local file that ``poll`` reads.

1. *Tunnel* (only when the node cannot reach the control plane, e.g. a laptop behind NAT): ``ssh -R
   127.0.0.1:<tunnel_port>:<control plane host>:<port>`` held open for as long as the worker runs, so the
   worker reaches the control plane at ``http://127.0.0.1:<tunnel_port>`` on the node. ``tunnel_port`` is
   chosen by the caller and stored with the worker, so that :meth:`NodeBootstrap.reattach` opens the same
   one after a control-plane restart.
2. *Setup*: one SSH session runs a fixed loader (``bash -c '...'``, no data in it) that reads, on the
   session's stdin: a bootstrap script, the worker's environment as ``KEY=VALUE`` lines, and a tarball of the
   local ``cloudmodal`` package. The script unpacks cloudmodal (cached per content hash), sets up the image
   with :func:`cloudmodal.image_render.setup_script` (cached per image hash: a second worker with the same
   image on the same node skips it), and starts the worker detached (``setsid``, stdio to a log file on the
   node), so it outlives the session.
3. *Started*: the SSH session has ended; the tunnel, if any, stays up (re-opened if it drops).

*Attached* (``attach=``, a sandbox's host): the process is started in the foreground of the setup session
instead of detached, and its first stdin line is ``attach`` plus the node's ``url`` of the control plane (its
token there, in no environment); the session's stdin stays open, so the process (which ends its sandbox when
its stdin closes) lives as long as this side holds the session: :meth:`NodeBootstrap.stop`, or this process
dying, ends it. ``poll`` says ``started`` once it runs and, in :attr:`BootstrapState.exited`, when it ended.

The app's own packages named by ``Image.add_local_python_source`` (found on this machine's Python path,
``source_path`` first) follow cloudmodal's tarball on stdin, are unpacked to ``~/.cloudmodal/src/<sha256>`` and
put on ``PYTHONPATH`` after cloudmodal.

Secrets: the worker's environment is read by bash's ``read`` builtin from stdin and handed to the worker with
``export`` (a builtin) in the subshell that ``exec``s it; its token alone goes on the worker's own stdin as one
JSON line (``CLOUDMODAL_CREDENTIALS=stdin``, as on the local provider), so that ``/proc/<pid>/environ`` never
holds it. It is never on a command line (local or on the node), in a file, in shell history (non-interactive
shells keep none) or in a log; the output shown in :attr:`BootstrapState.detail` has every secret value
replaced by ``***``.

Shipping cloudmodal: the control plane may be a dev checkout whose version is on no index, so the node
gets the very files this process imports — the ``cloudmodal`` package and the directories mapped into it
(``providers``, ``pricing``, ``infra``) — as a deterministic tarball unpacked to
``~/.cloudmodal/pkg/<sha256>`` and put on the worker's ``PYTHONPATH``. It is not installed into the image's
venv, so images are cached independently of cloudmodal's version and two workers of different control-plane
versions can share a node. cloudmodal's own dependencies (``importlib.metadata.requires``, without extras)
are installed into the venv by pip from the node's index (``install_dependencies``); a node whose Python
already has them (the test nodes) is bootstrapped with ``python=`` that interpreter and
``system_site_packages=True`` instead, so nothing is downloaded.

The pieces: :mod:`~cloudmodal.providers.node_ssh` (the ``ssh`` command line, its local process, host keys),
:mod:`~cloudmodal.providers.node_package` (the cloudmodal tarball shipped to the node) and
:mod:`~cloudmodal.providers.node_script` (the loader and the bootstrap script run there). This module is the
state machine that drives them.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

from cloudmodal import image_render
from cloudmodal.providers.base import DEFAULT_WORKER_ARGV
from cloudmodal.providers.node_package import (
    LocalSourceError,
    build_tarball,
    cloudmodal_requirements,
    local_source_modules,
    local_sources_tarball,
    package_roots,
    package_tarball,
)
from cloudmodal.providers.node_script import (
    BEGIN_LINE,
    IMAGE_LINE,
    LOADER,
    STARTED_LINE,
    TUNNEL_UP_LINE,
    bootstrap_script,
)
from cloudmodal.providers.node_ssh import SshProcess, SshTarget, ssh_argv, ssh_hint
from cloudmodal.providers.nodes import worker_key

Phase = Literal["tunnel", "setup", "started", "failed"]

SERVER_URL_ENV = "CLOUDMODAL_SERVER_URL"
WORKER_ID_ENV = "CLOUDMODAL_WORKER_ID"
TOKEN_ENV = "CLOUDMODAL_TOKEN"

# Environment names whose values are secrets: never shown, scrubbed from any output.
_SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|API_KEY|PRIVATE", re.IGNORECASE)
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

RETRY_S = 3.0  # between tries to reach a node that does not answer SSH yet, and tunnel re-opens
TAIL_CHARS = 4000  # how much of the output a failure's detail carries


@dataclass(frozen=True)
class BootstrapState:
    """Where a bootstrap is. ``detail``: on failure, what went wrong and the tail of the output (secrets
    scrubbed); else the latest line of progress. ``tunnel_up``: None when no tunnel is used.
    ``image_cached``: True when the image's setup was skipped (already done on this node)."""

    phase: Phase
    detail: str = ""
    tunnel_up: bool | None = None
    image_cached: bool | None = None
    worker_pid: int | None = None  # on the node
    log_path: str | None = None  # the worker's log on the node
    exited: int | None = None  # attached: the session (and the process it ran) ended with this code


class NodeBootstrap:
    """Ship cloudmodal and an image to one node over SSH and start one worker there (see the module
    docstring). :meth:`start` and :meth:`poll` never block; :meth:`stop` kills only the local ssh processes.

    ``server_url``: the control plane as reachable from *this* machine. With ``tunnel_port``, the worker
    gets ``http://127.0.0.1:<tunnel_port>`` instead (same scheme and path), forwarded to ``server_url``'s
    host and port. ``env``: the worker's environment (``CLOUDMODAL_TOKEN``...), sent over stdin; the server
    URL (:attr:`node_server_url`) and worker id are set in it. ``state_dir``: where the local ssh output
    files go (a private temporary directory under it, removed by :meth:`stop`; default: the system's). ``image``: the recipe's wire form (``hash``, ``python_version``,
    ``layers``, ``env``). ``argv``: run by the image venv's Python. ``python``/``system_site_packages``:
    see :func:`cloudmodal.image_render.setup_script`. ``connect_timeout_s``: how long a node that does not
    answer SSH yet (still booting, key not yet installed) is retried, every ``retry_s`` (also the wait
    before re-opening a tunnel that dropped).
    """

    def __init__(
        self,
        target: SshTarget,
        *,
        worker_id: str,
        server_url: str,
        env: Mapping[str, str] | None = None,
        image: Mapping[str, Any] | None = None,
        argv: Sequence[str] = DEFAULT_WORKER_ARGV,
        tunnel_port: int | None = None,
        python: str | None = None,
        system_site_packages: bool = False,
        install_dependencies: bool = True,
        startup_check_s: float = 1.0,
        connect_timeout_s: float = 300.0,
        retry_s: float = RETRY_S,
        secret_env: Iterable[str] = (TOKEN_ENV,),
        state_dir: str | os.PathLike[str] | None = None,
        attach: Mapping[str, Any] | None = None,
        source_path: Sequence[str] = (),
    ) -> None:
        self.target = target
        self.worker_id = worker_id
        self.server_url = server_url
        self.tunnel_port = tunnel_port
        self.env = dict(env or {})
        self.image = dict(image or {})
        self.argv = tuple(argv)
        self.python = python
        self.system_site_packages = system_site_packages
        self.install_dependencies = install_dependencies
        self.startup_check_s = startup_check_s
        self.connect_timeout_s = connect_timeout_s
        self.retry_s = retry_s
        self.state_dir = Path(state_dir) if state_dir is not None else None
        # attached: the process runs in the foreground of the setup session, ``attach`` (plus ``url``: the
        # control plane as the node reaches it) its first stdin line, the session held open until stop()
        self.attach = dict(attach) if attach is not None else None
        self.source_path = [*source_path, *sys.path]  # where add_local_python_source's modules are found
        for k in self.env:
            if not _ENV_NAME.match(k):
                raise ValueError(f"{k!r} is not a valid environment variable name for the worker.")
            if "\0" in self.env[k]:
                raise ValueError(
                    f"The worker's {k} contains a NUL byte, which no environment value can hold."
                )
        self._secrets = [
            v for k, v in self.env.items() if (k in set(secret_env) or _SECRET_NAME.search(k)) and len(v) >= 4
        ]
        if self.attach is not None and len(str(self.attach.get("token") or "")) >= 4:
            self._secrets.append(str(self.attach["token"]))
        parts = urlsplit(server_url)
        if tunnel_port is not None and (not parts.hostname or not parts.scheme):
            raise ValueError(f"server_url {server_url!r} has no scheme or host (e.g. http://127.0.0.1:8000).")
        self._lock = threading.RLock()
        self._dir: Path | None = None
        self._tunnel: SshProcess | None = None
        self._setup: SshProcess | None = None
        self._runs = 0
        self._phase: Phase | None = None
        self._reattach = False
        self._detail = ""
        self._deadline = 0.0
        self._retry_at: float | None = None  # setup: when to try again (node not answering SSH yet)
        self._tunnel_retry_at: float | None = None
        self._tunnel_seen_up = False
        self._image_cached: bool | None = None
        self._pid: int | None = None
        self._log: str | None = None
        self._exited: int | None = None

    # -- public ------------------------------------------------------------------------------------------

    @property
    def node_server_url(self) -> str:
        """The control plane's URL as the worker on the node uses it: through the tunnel when there is one,
        else ``env``'s ``CLOUDMODAL_SERVER_URL`` if given (the nodes' way to the control plane), else
        ``server_url``."""
        if self.tunnel_port is None:
            return self.env.get(SERVER_URL_ENV) or self.server_url
        p = urlsplit(self.server_url)
        return urlunsplit((p.scheme, f"127.0.0.1:{self.tunnel_port}", p.path, p.query, p.fragment))

    def start(self) -> None:
        """Begin (non-blocking): open the tunnel if one is used, else the setup session."""
        with self._lock:
            if self._phase is not None:
                return
            self._deadline = time.monotonic() + self.connect_timeout_s
            if self.tunnel_port is not None:
                self._phase = "tunnel"
                self._open_tunnel()
            else:
                self._phase = "setup"
                self._open_setup()

    def reattach(self) -> None:
        """After a control-plane restart: re-open only the tunnel to an already-bootstrapped node, on the
        same node-side port (non-blocking; :meth:`poll` says ``started`` once it is up). Without a tunnel
        there is nothing to re-open and the state is ``started`` at once."""
        with self._lock:
            if self._phase is not None:
                return
            self._reattach = True
            self._deadline = time.monotonic() + self.connect_timeout_s
            if self.tunnel_port is None:
                self._phase = "started"
                return
            self._phase = "tunnel"
            self._open_tunnel()

    def poll(self) -> BootstrapState:
        """Where the bootstrap is now (non-blocking). Call it from the reconcile loop; after ``started`` it
        keeps the tunnel up, re-opening it when it drops."""
        with self._lock:
            now = time.monotonic()
            if self._phase is None:
                return BootstrapState("setup", "not started", tunnel_up=self._tunnel_state())
            if self._phase == "tunnel":
                self._poll_tunnel_opening(now)
            if self._phase == "setup":
                self._poll_setup(now)
            if self._phase == "started":
                self._keep_tunnel(now)
                if self.attach is not None and self._setup is not None and self._exited is None:
                    self._exited = self._setup.returncode()
            return BootstrapState(
                self._phase,
                self._detail,
                tunnel_up=self._tunnel_state(),
                image_cached=self._image_cached,
                worker_pid=self._pid,
                log_path=self._log,
                exited=self._exited,
            )

    def stop(self) -> None:
        """Kill the local ssh processes (the tunnel drops; the worker on the node is left alone). Idempotent."""
        with self._lock:
            for p in (self._setup, self._tunnel):
                if p is not None:
                    p.kill()
            self._setup = self._tunnel = None
            if self._dir is not None:
                shutil.rmtree(self._dir, ignore_errors=True)
                self._dir = None
            if self._phase in ("tunnel", "setup"):
                self._phase = "failed"
                self._detail = "stopped before the worker started"

    def local_pids(self) -> list[int]:
        """The pids of this bootstrap's live local ssh processes (for tests and diagnostics)."""
        with self._lock:
            return [
                p.proc.pid for p in (self._setup, self._tunnel) if p is not None and p.returncode() is None
            ]

    # -- internals ---------------------------------------------------------------------------------------

    def _workdir(self) -> Path:
        if self._dir is None:
            if self.state_dir is not None:
                self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            prefix = f"ssh-{worker_key(self.worker_id)}-"
            self._dir = Path(tempfile.mkdtemp(prefix=prefix, dir=self.state_dir))  # 0700
        return self._dir

    def _out(self, kind: str) -> Path:
        self._runs += 1
        return self._workdir() / f"{kind}-{self._runs}.log"

    def _ssh_argv(self, options: Sequence[str], command: str, args: Sequence[str] = ()) -> list[str]:
        return ssh_argv(self.target, options, command, args)

    def _forward_spec(self) -> str:
        p = urlsplit(self.server_url)
        host = p.hostname or "127.0.0.1"
        port = p.port or (443 if p.scheme == "https" else 80)
        if ":" in host:
            host = f"[{host}]"
        return f"127.0.0.1:{self.tunnel_port}:{host}:{port}"

    def _open_tunnel(self) -> None:
        # The session's command prints a line once it runs: sshd handles the forward request (sent first)
        # before it runs the command, and ExitOnForwardFailure makes ssh exit if the forward was refused,
        # so the line means the node's port is listening. `cat` ends when our stdin closes (we died).
        argv = self._ssh_argv(
            ["ExitOnForwardFailure=yes"],
            f"echo '{TUNNEL_UP_LINE}'; exec cat >/dev/null",
            ["-R", self._forward_spec()],
        )
        self._tunnel = SshProcess(argv, self._out("tunnel"), None)
        self._tunnel_seen_up = False

    def _open_setup(self) -> None:
        try:
            payload = self._payload()
        except LocalSourceError as e:
            self._fail(str(e), "")
            return
        argv = self._ssh_argv(["ClearAllForwardings=yes"], LOADER)
        if self.attach is None:
            self._setup = SshProcess(argv, self._out("setup"), payload)
            return
        # attached: the payload ends with the process's configuration line, and stdin stays open after it
        proc = SshProcess(argv, self._out("setup"), None)
        self._setup = proc
        threading.Thread(
            target=_feed_open, args=(proc, payload), name="cloudmodal-ssh-attach", daemon=True
        ).start()

    def _payload(self) -> bytes:
        image = self.image
        image_hash = str(image.get("hash") or "none")
        py_version = str(image.get("python_version") or "3.11")
        layers = list(image.get("layers") or [])
        deps = cloudmodal_requirements() if self.install_dependencies else []
        setup = image_render.setup_script(
            py_version,
            image_hash,
            layers,
            python=self.python,
            system_site_packages=self.system_site_packages,
            requirements=deps,
        )
        tarball, sha = package_tarball()
        sources = local_sources_tarball(local_source_modules(image), self.source_path)
        src, src_sha = sources if sources is not None else (b"", None)
        workdirs = [layer["path"] for layer in layers if layer.get("op") == "workdir"]
        script = bootstrap_script(
            image_hash=image_hash,
            setup=setup,
            deps=deps,
            python_for_deps=self.python is not None,
            pkg_sha=sha,
            pkg_size=len(tarball),
            key=worker_key(self.worker_id),
            argv=self.argv,
            image_env=dict(image.get("env") or {}),
            workdir=workdirs[-1] if workdirs else None,
            startup_check_s=self.startup_check_s,
            src_sha=src_sha,
            src_size=len(src),
            attached=self.attach is not None,
        ).encode()
        env = {**self.env, SERVER_URL_ENV: self.node_server_url, WORKER_ID_ENV: self.worker_id}
        env_lines = "".join(f"{k}={base64.b64encode(v.encode()).decode()}\n" for k, v in env.items()).encode()
        payload = b"%d\n" % len(script) + script + env_lines + b"\n" + tarball + src
        if self.attach is not None:
            payload += json.dumps({"url": self.node_server_url, **self.attach}).encode() + b"\n"
        return payload

    def _scrub(self, text: str) -> str:
        for s in self._secrets:
            text = text.replace(s, "***")
        return text

    def _tail(self, text: str) -> str:
        text = self._scrub(text).strip()
        return text[-TAIL_CHARS:]

    def _fail(self, summary: str, output: str) -> None:
        self._phase = "failed"
        tail = self._tail(output)
        self._detail = f"{summary}\n--- output (tail) ---\n{tail}" if tail else summary
        for p in (self._setup, self._tunnel):
            if p is not None:
                p.kill()

    def _tunnel_state(self) -> bool | None:
        if self.tunnel_port is None:
            return None
        t = self._tunnel
        return t is not None and t.returncode() is None and self._tunnel_seen_up

    def _check_tunnel_up(self) -> bool:
        t = self._tunnel
        if t is not None and not self._tunnel_seen_up and TUNNEL_UP_LINE in t.output():
            self._tunnel_seen_up = True
        return self._tunnel_seen_up and t is not None and t.returncode() is None

    def _poll_tunnel_opening(self, now: float) -> None:
        t = self._tunnel
        if t is None:  # waiting to retry
            if self._tunnel_retry_at is not None and now >= self._tunnel_retry_at:
                self._tunnel_retry_at = None
                self._open_tunnel()
            return
        if self._check_tunnel_up():
            self._detail = f"tunnel up: node 127.0.0.1:{self.tunnel_port} -> {self._forward_spec()}"
            if self._reattach:
                self._phase = "started"
            else:
                self._phase = "setup"
                self._open_setup()
            return
        rc = t.returncode()
        if rc is None:
            self._detail = "opening the tunnel"
            return
        out = t.output()
        forward_refused = "remote port forwarding failed" in out
        # A node that is still booting refuses or drops SSH (255): try again until the deadline. A refused
        # forward on a fresh bootstrap is a real conflict; after a restart the old session may still hold
        # the port for a while, so reattach keeps trying.
        if rc == 255 and now < self._deadline and (not forward_refused or self._reattach):
            self._tunnel = None
            self._tunnel_retry_at = now + self.retry_s
            self._detail = "waiting for the node's SSH: " + (self._tail(out).splitlines() or [""])[-1]
            return
        self._fail(f"The tunnel to the node failed (ssh exited with {rc}). {ssh_hint(out, self.target)}", out)

    def _poll_setup(self, now: float) -> None:
        if self.tunnel_port is not None:
            self._keep_tunnel(now)
        s = self._setup
        if s is None:
            if self._retry_at is not None and now >= self._retry_at:
                self._retry_at = None
                self._open_setup()
            return
        rc = s.returncode()
        out = s.output()
        m = STARTED_LINE.search(out)
        if self.attach is not None and m:  # running in the session, which stays open while it runs
            self._phase = "started"
            self._exited = rc
            self._pid, self._log = int(m.group(1)), m.group(2).strip()
            img = IMAGE_LINE.search(out)
            self._image_cached = None if img is None else img.group(1) == "cached"
            self._detail = f"started on the node, attached to its SSH session (log {self._log})"
            return
        if rc is None:
            lines = self._scrub(out).strip().splitlines()
            self._detail = lines[-1] if lines else "connecting"
            return
        if rc == 0 and m:
            self._phase = "started"
            self._pid, self._log = int(m.group(1)), m.group(2).strip()
            img = IMAGE_LINE.search(out)
            self._image_cached = None if img is None else img.group(1) == "cached"
            self._detail = f"worker started on the node (pid {self._pid}, log {self._log})"
            self._setup = None
            return
        if BEGIN_LINE not in out and rc == 255 and now < self._deadline:
            self._setup = None
            self._retry_at = now + self.retry_s
            self._detail = "waiting for the node's SSH: " + (self._tail(out).splitlines() or [""])[-1]
            return
        if BEGIN_LINE not in out:
            summary = f"Could not run the bootstrap on the node (ssh exited with {rc}). {ssh_hint(out, self.target)}"
        elif rc == 3:
            summary = (
                f"The image's setup failed on the node (exit {rc}): fix the failing step of the image "
                "recipe (its output is below)."
            )
        elif rc == 4:
            summary = "The worker exited as soon as it started on the node: its log's end is below."
        else:
            summary = f"The node bootstrap failed (exit {rc}); its output is below."
        self._fail(summary, out)

    def _keep_tunnel(self, now: float) -> None:
        """Re-open a dropped tunnel (after start: the worker needs it for as long as it runs)."""
        if self.tunnel_port is None:
            return
        t = self._tunnel
        if t is not None:
            self._check_tunnel_up()
            if t.returncode() is None:
                return
            self._tunnel = None
            self._tunnel_retry_at = now + self.retry_s
            return
        if self._tunnel_retry_at is None or now >= self._tunnel_retry_at:
            self._tunnel_retry_at = None
            self._open_tunnel()


def _feed_open(proc: SshProcess, data: bytes) -> None:
    """Write ``data`` to an attached session's stdin and leave it open (closed by :meth:`SshProcess.kill`)."""
    stdin = proc.proc.stdin
    assert stdin is not None
    try:
        stdin.write(data)
        stdin.flush()
    except (BrokenPipeError, OSError, ValueError):
        pass  # ssh exited (poll reports why)


__all__ = [
    "RETRY_S",
    "SERVER_URL_ENV",
    "TAIL_CHARS",
    "TOKEN_ENV",
    "WORKER_ID_ENV",
    "BootstrapState",
    "NodeBootstrap",
    "Phase",
    "SshTarget",
    "build_tarball",
    "cloudmodal_requirements",
    "package_roots",
    "package_tarball",
]
