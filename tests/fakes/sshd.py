"""A stand-in cloud node: a real OpenSSH ``sshd`` on 127.0.0.1, started by the test with its own config.

It logs in the current user (no account to create) with a generated key pair, gives the sessions a ``HOME``
of their own in a temporary directory (``SetEnv HOME=...``: the node's ``~/.cloudmodal`` never touches the
real one), allows TCP forwarding (reverse tunnels), and comes with an ``ssh_config`` that maps a fake cloud
address (``54.*``) to it, as a user's ssh_config would map a node behind a bastion.

    with stand_in_node(tmp_path) as node:
        target = node.target()            # a providers.node_bootstrap.SshTarget for the fake address
        ...

Needs Debian's ``openssh-server`` (``apt-get install -y openssh-server``); :func:`sshd_missing` says why it
cannot run, for a ``pytest.skip``.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.ports import reserved_port

FAKE_ADDRESS = "54.0.0.10"  # what the "cloud" reports as the node's public IP
START_TRIES = 5  # sshd started on another port when its port was in use after all


def sshd_path() -> str | None:
    """The sshd binary (sshd must be started by its absolute path)."""
    found = shutil.which("sshd") or shutil.which("sshd", path="/usr/sbin:/usr/local/sbin:/sbin")
    return os.path.abspath(found) if found else None


def sshd_missing() -> str | None:
    """None when a stand-in node can run here, else why not (and the fix)."""
    if sshd_path() is None:
        return "sshd is not installed: apt-get install -y openssh-server (Debian's package; CI installs it)"
    for tool in ("ssh", "ssh-keygen"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed: apt-get install -y openssh-client"
    return None


@dataclass
class StandInNode:
    """A running stand-in node."""

    host: str  # where sshd really listens (127.0.0.1)
    port: int
    user: str
    key_path: Path  # the client's private key (its .pub is authorized)
    public_key: str
    ssh_config: Path  # maps FAKE_ADDRESS (and 54.*) to host:port
    fake_address: str
    home: Path  # $HOME of the node's sessions
    known_hosts: Path  # a known_hosts file for clients (empty at start)
    log_path: Path  # sshd's own log
    proc: subprocess.Popen[bytes]

    def target(self, **kw: Any) -> Any:
        """An ``SshTarget`` reaching this node through its fake address and ``ssh_config``."""
        from cloudmodal.providers.node_ssh import SshTarget

        kw.setdefault("key_path", self.key_path)
        kw.setdefault("user", self.user)
        kw.setdefault("ssh_config", str(self.ssh_config))
        kw.setdefault("known_hosts", self.known_hosts)
        return SshTarget(self.fake_address, **kw)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@contextlib.contextmanager
def stand_in_node(directory: Path, *, fake_address: str = FAKE_ADDRESS) -> Iterator[StandInNode]:
    """Start an sshd in ``directory`` (config, keys, home, log) and stop it at the end. Sessions still open
    (tunnels) are not killed by stopping the listener: the tests stop their own ssh clients."""
    sshd = sshd_path()
    if sshd is None:
        raise RuntimeError(sshd_missing() or "sshd is missing")
    directory.mkdir(parents=True, exist_ok=True)
    home = directory / "home"
    home.mkdir(exist_ok=True)
    for name in ("host_key", "client_key"):
        subprocess.run(
            [
                "ssh-keygen",
                "-q",
                "-t",
                "ed25519",
                "-N",
                "",
                "-C",
                f"cloudmodal-test-{name}",
                "-f",
                str(directory / name),
            ],
            check=True,
        )
    public_key = (directory / "client_key.pub").read_text().strip()
    authorized = directory / "authorized_keys"
    authorized.write_text(public_key + "\n")
    authorized.chmod(0o600)
    with contextlib.suppress(OSError):
        Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # sshd's privilege-separation directory
    config = directory / "sshd_config"
    ssh_config = directory / "ssh_config"
    known_hosts = directory / "known_hosts"
    log_path = directory / "sshd.log"
    log_path.write_bytes(b"")  # this start's output only (every try's, appended)
    proc: subprocess.Popen[bytes] | None = None
    try:
        for _ in range(START_TRIES):
            # a reserved port (tests/ports.py): nothing else on the machine is handed it before sshd binds it
            port = reserved_port()
            _write_configs(config, ssh_config, port, directory, authorized, home, fake_address)
            subprocess.run([sshd, "-t", "-f", str(config)], check=True)
            start = log_path.stat().st_size if log_path.exists() else 0
            with open(log_path, "ab") as log:
                proc = subprocess.Popen(
                    [sshd, "-D", "-e", "-f", str(config)], stdout=log, stderr=subprocess.STDOUT
                )
            if _listening(proc, port, log_path, start):
                break
        else:
            raise RuntimeError(f"sshd found its port in use {START_TRIES} times: {_tail(log_path)}")
        yield StandInNode(
            host="127.0.0.1",
            port=port,
            user=getpass.getuser(),
            key_path=directory / "client_key",
            public_key=public_key,
            ssh_config=ssh_config,
            fake_address=fake_address,
            home=home,
            known_hosts=known_hosts,
            log_path=log_path,
            proc=proc,
        )
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        _kill_processes_under(home)


def _write_configs(
    config: Path,
    ssh_config: Path,
    port: int,
    directory: Path,
    authorized: Path,
    home: Path,
    fake_address: str,
) -> None:
    """sshd's config (listening on 127.0.0.1:``port``) and the clients' ssh_config mapping the fake address."""
    config.write_text(
        "\n".join(
            [
                f"Port {port}",
                "ListenAddress 127.0.0.1",
                f"HostKey {directory / 'host_key'}",
                f"PidFile {directory / 'sshd.pid'}",
                f"AuthorizedKeysFile {authorized}",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "PubkeyAuthentication yes",
                "PermitRootLogin prohibit-password",
                "UsePAM no",
                "StrictModes no",
                "AllowTcpForwarding yes",
                "PrintMotd no",
                "MaxStartups 50",
                "MaxSessions 50",
                f"SetEnv HOME={home}",
                "LogLevel VERBOSE",
                "",
            ]
        )
    )
    ssh_config.write_text(f"Host 54.* {fake_address}\n  HostName 127.0.0.1\n  Port {port}\n")


def _tail(log_path: Path) -> str:
    return log_path.read_text(errors="replace")[-2000:] if log_path.exists() else ""


def _listening(proc: subprocess.Popen[bytes], port: int, log_path: Path, start: int) -> bool:
    """True once this sshd listens on ``port`` (it says so in its output from byte ``start`` of the log: a
    connection alone could reach whoever else holds the port) and accepts a connection there; False if it
    exited because the port was in use; raises if it exited otherwise or never listens."""
    deadline = time.monotonic() + 60
    while True:
        said = log_path.read_bytes()[start:].decode(errors="replace")
        if proc.poll() is not None:
            said = log_path.read_bytes()[start:].decode(errors="replace")  # all it wrote before it exited
            if "Address already in use" in said:
                return False
            raise RuntimeError(f"sshd exited with {proc.returncode}: {said[-2000:]}")
        if f"Server listening on 127.0.0.1 port {port}." in said:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        if time.monotonic() > deadline:
            raise RuntimeError(f"sshd did not listen on 127.0.0.1:{port} within 60 s: {_tail(log_path)}")
        time.sleep(0.05)


def _kill_processes_under(home: Path) -> None:
    """The node is gone, so is what ran on it: the worker the bootstrap started detached (its own session,
    under the node's home) would otherwise outlive the test."""
    prefix = str(home) + os.sep
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv0 = (entry / "cmdline").read_bytes().split(b"\0", 1)[0].decode()
        except OSError:
            continue
        if argv0.startswith(prefix):
            with contextlib.suppress(OSError):
                os.kill(int(entry.name), signal.SIGKILL)
