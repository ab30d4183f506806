"""Issue 9, point 5: inline secret values sat in clear text in the database (and its WAL), and the database,
WAL, SHM and ``server.log`` were mode 644. A real ``cloudmodal server start`` (in the background, as users run
it: it writes its log to the state dir) with a state dir of its own runs a function declaring
``Secret.from_dict({"TOKENX": <random value>})``; then every file under the state dir is read: none may contain
the value, and no file or directory may carry group or other permission bits.

Negative control: the function sees the value in its environment (it returns its digest, never the value,
since results are stored too), so the secret did reach the run and would be found if it were stored."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import sec_tenant
from security_support import as_client, until

from cloudmodal.client.session import run_app


def _cli(home: Path, *args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, CLOUDMODAL_HOME=str(home), CLOUDMODAL_PROVIDERS="local")
    for k in ("CLOUDMODAL_SERVER_URL", "CLOUDMODAL_TOKEN", "CLOUDMODAL_DATABASE_URL"):
        env.pop(k, None)
    return subprocess.run(
        [sys.executable, "-m", "cloudmodal.cli.main", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def _start(home: Path) -> dict[str, object]:
    r = _cli(home, "server", "start", "--port", "0")
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads((home / "server.json").read_text())


def _stop(home: Path, info: dict[str, object]) -> None:
    r = _cli(home, "server", "stop")
    pid = int(str(info["pid"]))
    if not until(lambda: not _alive(pid), 30):
        os.kill(pid, signal.SIGKILL)
    assert r.returncode == 0, r.stdout + r.stderr


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie of the CLI's detached child is not ours to reap; its state says it is gone
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def _exposures(root: Path, value: bytes) -> tuple[list[str], list[str]]:
    """(files containing ``value``, files and directories with group/other permission bits) under ``root``."""
    holding, loose = [], []
    for dirpath, _dirnames, filenames in os.walk(root):
        for p in [Path(dirpath), *(Path(dirpath, f) for f in filenames)]:  # each directory once, as dirpath
            try:
                st = p.lstat()
            except FileNotFoundError:  # gone meanwhile (a temporary file)
                continue
            if stat.S_ISLNK(st.st_mode):
                continue
            if stat.S_IMODE(st.st_mode) & 0o077:
                loose.append(f"{p} {stat.filemode(st.st_mode)}")
            if stat.S_ISREG(st.st_mode):
                try:
                    if value in p.read_bytes():
                        holding.append(str(p))
                except (FileNotFoundError, PermissionError):
                    continue
    return holding, sorted(set(loose))


def test_no_secret_value_and_no_readable_file_in_the_state_dir(tmp_path: Path) -> None:
    home = tmp_path / "state"  # made by `server start` itself, as ~/.cloudmodal would be
    value = sec_tenant.SECRET_VALUE.encode()
    info = _start(home)
    try:
        with as_client(str(info["url"]), str(info["token"])), run_app(sec_tenant.app, show_logs=False):
            seen = sec_tenant.secret_digest.remote()
            running = _exposures(home, value)  # while it runs: SQLite's WAL and SHM exist now
    finally:
        _stop(home, info)
    stopped = _exposures(home, value)
    assert seen == hashlib.sha256(value).hexdigest(), "the function did not see its secret"
    assert (home / "server.log").exists(), "expected the background server's log in the state dir"
    assert running == ([], []), f"secret in {running[0]}; readable by others: {running[1]}"
    assert stopped == ([], []), f"after the run: secret in {stopped[0]}; readable by others: {stopped[1]}"
