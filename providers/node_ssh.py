"""Running the system ``ssh`` client against one node: whom to log in as (:class:`SshTarget`, with its
cloudmodal-owned known_hosts file), the exact ``ssh`` command line (:func:`ssh_argv`), one local ``ssh``
process whose output goes to a file (:class:`SshProcess`), and what to do when a login fails
(:func:`ssh_hint`).

Host keys: ``StrictHostKeyChecking=accept-new`` into a cloudmodal-owned known_hosts file (0600, under
``CLOUDMODAL_HOME``), never the user's. Clouds recycle public addresses: give each node its own
``host_key_alias`` (e.g. its cluster name) so that a new node on an old address is not refused.
"""

from __future__ import annotations

import os
import subprocess
import threading
from collections.abc import Sequence
from dataclasses import KW_ONLY, dataclass
from pathlib import Path


@dataclass(frozen=True)
class SshTarget:
    """How to log in to one node.

    ``port``: 22 is ssh's default and is not passed, so a ``Port`` in ``ssh_config`` applies. ``ssh_config``:
    a user ssh_config file passed with ``-F`` (bastions, jump hosts; in tests it maps a cloud's fake
    address to a local sshd). ``known_hosts``: default ``<CLOUDMODAL_HOME>/ssh/known_hosts``.
    ``host_key_alias``: the name the node's host key is recorded under (default: the address).
    """

    host: str
    _: KW_ONLY
    key_path: Path
    port: int = 22
    user: str = "ubuntu"
    ssh_config: str | None = None
    known_hosts: Path | None = None
    host_key_alias: str | None = None

    def known_hosts_path(self) -> Path:
        """The known_hosts file, created private (0600, in a 0700 directory) if missing."""
        if self.known_hosts is not None:
            path = Path(self.known_hosts)
        else:
            from cloudmodal.config import home

            path = home() / "ssh" / "known_hosts"
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.close(fd)
        os.chmod(path, 0o600)
        return path


def ssh_argv(target: SshTarget, options: Sequence[str], command: str, args: Sequence[str] = ()) -> list[str]:
    """The ``ssh`` command line that runs ``command`` on ``target`` (non-interactive, no agent or X11
    forwarding, no connection sharing), with extra ``-o`` ``options`` and ``args`` before the host."""
    t = target
    argv = ["ssh"]
    if t.ssh_config:
        argv += ["-F", str(t.ssh_config)]
    argv += ["-i", str(t.key_path), "-l", t.user, "-T"]
    if t.port != 22:
        argv += ["-p", str(t.port)]
    opts = [
        "IdentitiesOnly=yes",
        "BatchMode=yes",
        "StrictHostKeyChecking=accept-new",
        f"UserKnownHostsFile={t.known_hosts_path()}",
        "GlobalKnownHostsFile=/dev/null",
        "ConnectTimeout=15",
        "ServerAliveInterval=15",
        "ServerAliveCountMax=4",
        "ControlMaster=no",
        "ControlPath=none",
        "ForwardAgent=no",
        "ForwardX11=no",
        "PermitLocalCommand=no",
        "LogLevel=ERROR",
        *options,
    ]
    if t.host_key_alias:
        opts.append(f"HostKeyAlias={t.host_key_alias}")
    for o in opts:
        argv += ["-o", o]
    return [*argv, *args, "--", t.host, command]


def _ssh_env() -> dict[str, str]:
    """The environment of the local ssh processes: only what ssh needs (no tokens of this process)."""
    keep = ("PATH", "HOME", "USER", "LOGNAME", "SSH_AUTH_SOCK", "LANG", "LC_ALL")
    return {k: v for k, v in os.environ.items() if k in keep}


class SshProcess:
    """One local ``ssh`` process: output (stdout and stderr) to a file, stdin fed by a thread."""

    def __init__(self, argv: list[str], out_path: Path, stdin_data: bytes | None) -> None:
        self.out_path = out_path
        with open(out_path, "wb") as out:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=_ssh_env(),
                start_new_session=True,  # not hit by the control plane's terminal's Ctrl-C
            )
        self._writer: threading.Thread | None = None
        if stdin_data is not None:
            self._writer = threading.Thread(
                target=self._feed, args=(stdin_data,), name="cloudmodal-ssh-stdin", daemon=True
            )
            self._writer.start()
        # else stdin stays open and empty: the remote `cat` of a tunnel session ends when it closes

    def _feed(self, data: bytes) -> None:
        stdin = self.proc.stdin
        assert stdin is not None
        try:
            stdin.write(data)
            stdin.flush()
        except (BrokenPipeError, OSError, ValueError):
            pass  # ssh exited (poll reports why)
        finally:
            try:
                stdin.close()
            except OSError:
                pass

    def output(self) -> str:
        try:
            return self.out_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def returncode(self) -> int | None:
        return self.proc.poll()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        if self.proc.stdin is not None:
            try:
                self.proc.stdin.close()
            except OSError:
                pass


def ssh_hint(output: str, target: SshTarget) -> str:
    """What to do about a failed ssh login, from ssh's own message."""
    who = f"{target.user}@{target.host}"
    if "Permission denied" in output:
        return (
            f"ssh could not log in as {who} with the key {target.key_path}: check that the node authorized "
            "its public key (the driver's ssh_public_key) for that user."
        )
    if "Host key verification failed" in output or "REMOTE HOST IDENTIFICATION HAS CHANGED" in output:
        return (
            f"{who} presented a host key other than the one recorded in {target.known_hosts_path()}: if the "
            "cloud reused the address for a new node, remove its line (ssh-keygen -R HOST -f FILE) or give "
            "each node its own host_key_alias."
        )
    if "remote port forwarding failed" in output:
        return (
            "the node refused the tunnel's port (already in use there, or AllowTcpForwarding is off in the "
            "node's sshd): pick another tunnel port, or allow TCP forwarding on the node."
        )
    return f"ssh to {who} failed: check the node's address, that sshd runs there and the ssh_config."
