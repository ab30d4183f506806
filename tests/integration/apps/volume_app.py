"""Functions that mount one volume at the same path, each in its own worker: imported by
tests/integration/test_volumes.py and by the real worker processes."""

from __future__ import annotations

import os
from pathlib import Path

import cloudmodal

MOUNT = "/mnt/cloudmodal-test-volume"

app = cloudmodal.App("volume-app")
vol = cloudmodal.Volume.from_name("volume-app-data", create_if_missing=True)


@app.function(volumes={MOUNT: vol})
def write(name: str, text: str, commit: bool = True) -> list[str]:
    """Write a file under the mount (and commit it): the names the mount holds then."""
    Path(MOUNT, name).write_text(text)
    if commit:
        vol.commit()
    return sorted(os.listdir(MOUNT))


# One container that stays up between calls, so a test can tell what reload() brought in.
@app.function(volumes={MOUNT: vol}, max_containers=1, scaledown_window=300)
def peek(name: str, reload: bool) -> str | None:
    """The file's text as this container's mount shows it (after ``vol.reload()`` when asked), or None."""
    if reload:
        vol.reload()
    p = Path(MOUNT, name)
    return p.read_text() if p.exists() else None


@app.function(volumes={MOUNT: vol})
def how_mounted() -> dict[str, object]:
    """What the mount path is in this container: a bind mount (a directory) or a symbolic link."""
    return {"is_link": os.path.islink(MOUNT), "is_dir": os.path.isdir(MOUNT), "pid": os.getpid()}


@app.function(volumes={MOUNT: vol})
def reload_with_a_file_open(name: str) -> str:
    """``vol.reload()`` while this container holds a file of the mount open: the error's class name."""
    with open(Path(MOUNT, name)):
        try:
            vol.reload()
        except Exception as e:
            return type(e).__name__
    return "reloaded"


@app.function(volumes={MOUNT: vol})
def write_and_wait_for_a_background_commit(name: str, text: str, timeout: float) -> bool:
    """Write a file without committing, then wait (this container alive) until the volume has it."""
    import time

    Path(MOUNT, name).write_text(text)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(e.path == name for e in vol.listdir("/")):
            return True
        time.sleep(0.2)
    return False
