"""Volumes end to end through real worker processes, on SQLite and PostgreSQL: a function that mounts a volume
writes files and commits; another function, in another worker that mounted the volume before, sees them
after ``reload()`` (and not before); a container's uncommitted changes are committed when it exits; the
client reads what the workers wrote."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import volume_app as m

from cloudmodal.client.session import run_app
from cloudmodal.server.app import ServerHandle
from cloudmodal.volume import Volume

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 and os.access(os.path.dirname(m.MOUNT), os.W_OK) is False,
    reason=f"the workers can neither bind-mount nor link at {m.MOUNT} (not root, parent not writable)",
)


# The bind mounts leave their mount point on the host (an empty directory). It is not removed after the
# module: this module's other parameter may run at the same time in another pytest process, and removing
# the directory under its workers' bind mounts makes the path vanish for them (ENOENT) — as it would for
# any worker if something removed a live mount point.


@pytest.fixture(scope="module")
def running(control_plane: ServerHandle) -> Iterator[ServerHandle]:
    # volumes= is refused as inert by cloudmodal.client.unsupported until the lead lifts it; run anyway
    os.environ["CLOUDMODAL_ALLOW_INERT"] = "1"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with run_app(m.app, show_logs=False):
                yield control_plane
    finally:
        os.environ.pop("CLOUDMODAL_ALLOW_INERT", None)


def _eventually(what: str, fn: Callable[[], Any], timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = fn()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


# First: it runs the app on its own, before the module's running app starts.
def test_uncommitted_changes_are_committed_when_the_container_exits(control_plane: ServerHandle) -> None:
    os.environ["CLOUDMODAL_ALLOW_INERT"] = "1"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with run_app(m.app, show_logs=False):
                assert "exit.txt" in m.write.remote("exit.txt", "on exit", commit=False)
    finally:
        os.environ.pop("CLOUDMODAL_ALLOW_INERT", None)

    # the app stopped: its containers drain, and each commits its mounts as it exits
    def committed() -> bool:
        names = {e.path for e in m.vol.listdir("/")}
        return "exit.txt" in names

    _eventually("the exiting container's commit", committed)
    assert b"".join(m.vol.read_file("/exit.txt")) == b"on exit"


def test_a_commit_in_one_worker_reaches_another_after_reload(running: ServerHandle) -> None:
    # The reader's container starts first and mounts the volume as it is (no a.txt yet).
    assert m.peek.remote("a.txt", reload=False) is None
    assert "a.txt" in m.write.remote("a.txt", "hello")
    # The reader's mount does not change under it ...
    assert m.peek.remote("a.txt", reload=False) is None
    # ... until it reloads.
    assert m.peek.remote("a.txt", reload=True) == "hello"
    # The client reads the committed file straight from the store.
    assert b"".join(m.vol.read_file("/a.txt")) == b"hello"
    assert "a.txt" in [e.path for e in Volume.from_name("volume-app-data").listdir("/")]


def test_a_running_container_commits_in_the_background(running: ServerHandle) -> None:
    # the function itself waits, its container alive: only the background commit can publish the file
    assert m.write_and_wait_for_a_background_commit.remote("bg.txt", "background", timeout=60)
    assert b"".join(m.vol.read_file("/bg.txt")) == b"background"


def test_reload_is_refused_while_a_file_under_the_mount_is_open(running: ServerHandle) -> None:
    m.write.remote("open.txt", "x")
    assert m.reload_with_a_file_open.remote("open.txt") == "VolumeBusyError"


def test_the_mount_is_a_private_bind_mount(running: ServerHandle) -> None:
    got = m.how_mounted.remote()
    if os.geteuid() == 0:
        assert got == {"is_link": False, "is_dir": True, "pid": got["pid"]}
        # the bind mount is the worker's own: this process sees at most the empty mount point
        assert not os.path.isdir(m.MOUNT) or os.listdir(m.MOUNT) == []
    else:
        assert got["is_link"]


FALLBACK_PROBE = """
import os, sys
from pathlib import Path
from cloudmodal.worker.volumes import MountError, _make_visible

root = Path(sys.argv[1])
src = root / "copy"
src.mkdir()
(src / "f.txt").write_text("in the copy")
print(_make_visible(src, str(root / "mnt" / "data")))
print((root / "mnt" / "data" / "f.txt").read_text())
try:
    _make_visible(src, "/proc/cloudmodal-volume-probe")
except MountError as e:
    print("refused:", e)
"""


@pytest.mark.skipif(
    shutil.which("setpriv") is None, reason="needs util-linux's setpriv to drop CAP_SYS_ADMIN"
)
def test_without_mount_privileges_a_link_stands_in_or_the_error_names_the_fix(tmp_path: Path) -> None:
    """A worker that may not make a mount namespace (no CAP_SYS_ADMIN) links the mount path to its working
    copy where it can create it, and otherwise fails with what to do."""
    out = subprocess.run(
        [
            "setpriv",
            "--bounding-set=-sys_admin",
            "--inh-caps=-sys_admin",
            sys.executable,
            "-c",
            FALLBACK_PROBE,
        ]
        + [str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[:2] == ["symlink", "in the copy"]
    assert os.path.islink(tmp_path / "mnt" / "data")
    assert lines[2].startswith("refused: Cannot mount the volume at '/proc/cloudmodal-volume-probe'")
    assert "Run the workers as root" in lines[2] and "a path that does not exist yet" in lines[2]
