"""A read-only mount where the worker cannot bind-mount (not root, no CAP_SYS_ADMIN): the mount path is a
symbolic link to a working copy whose write bits are off, so the user's writes fail with ``PermissionError``;
``reload()`` still brings in others' commits, and the copy stays unwritable after it. Run in a child process
that gives up root first (``setuid``), as such a worker runs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the probe drops from root to another user")

PROBE = r"""
import os, sys
from pathlib import Path
from cloudmodal.volumes import FileHead, LocalStore, VolumeData
import cloudmodal.volumes.working_copy
import cloudmodal.exception
from cloudmodal.worker.volumes import Mount, _make_visible, _set_writable

os.setgid(65534)
os.setuid(65534)  # every capability goes with root: no mount namespace, and file modes apply
root = Path(sys.argv[1])
data = VolumeData(LocalStore(root / "store"), FileHead(root / "head.json"))
(root / "src").write_bytes(b"one")
with data.batch() as b:
    b.put_file(root / "src", "/d/a.txt")
copy = data.working_copy(root / "wc", read_only=True)
target = str(root / "mnt" / "data")
how = _make_visible(copy.directory, target, True)
m = Mount(target, "v", "vo-x", data, copy, how, read_only=True)

def attempt(fn):
    try:
        fn()
    except OSError as e:
        return type(e).__name__
    return "allowed"

print(how)
print(Path(target, "d", "a.txt").read_text())
print(attempt(lambda: Path(target, "d", "a.txt").write_text("x")))
print(attempt(lambda: Path(target, "d", "new.txt").write_text("x")))
print(attempt(lambda: Path(target, "top.txt").write_text("x")))
(root / "src").write_bytes(b"two")
with data.batch() as b:
    b.put_file(root / "src", "/d/a.txt")
    b.put_file(root / "src", "/d/b.txt")
m.reload()
print(Path(target, "d", "a.txt").read_text(), Path(target, "d", "b.txt").read_text())
print(attempt(lambda: Path(target, "d", "b.txt").write_text("x")))
print(attempt(lambda: Path(target, "d", "new.txt").write_text("x")))
try:
    m.commit()
except cloudmodal.exception.InvalidError as e:
    print("commit refused:", e)
"""


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="cloudmodal-ro-link-"))
    os.chmod(d, 0o777)  # the probe runs as another user
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_a_read_only_link_refuses_writes_and_still_reloads(shared_dir: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(shared_dir)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[:9] == [
        "symlink",
        "one",
        "PermissionError",  # change a file
        "PermissionError",  # add a file
        "PermissionError",  # add a file at the top
        "two two",  # reload brought both in
        "PermissionError",  # and the reloaded files are read-only too
        "PermissionError",
        out.stdout.splitlines()[8],
    ]
    assert out.stdout.splitlines()[8].startswith("commit refused: The volume 'v' is mounted read-only")
