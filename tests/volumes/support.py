"""What the volume tests share: a backend handle (store URL + environment) and helpers for committer
processes (tests/volumes/child.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cloudmodal.volumes import FileHead, ObjectStore, VolumeData, open_store

CHILD = Path(__file__).resolve().parent / "child.py"


@dataclass
class Backend:
    name: str
    url: str  # this test's store (a fresh prefix)
    env: dict[str, str]  # what a process needs to reach it (added to os.environ)
    tmp: Path

    def store(self) -> ObjectStore:
        return open_store(self.url, env={**os.environ, **self.env})

    def volume(
        self, *, part_size: int = 64 * 1024, cache: bool = False, head: str = "head.json"
    ) -> VolumeData:
        cache_dir = self.tmp / f"cache-{uuid.uuid4().hex[:6]}" if cache else None
        return VolumeData(self.store(), FileHead(self.tmp / head), cache_dir=cache_dir, part_size=part_size)

    def spawn(self, **args: Any) -> subprocess.Popen[str]:
        """A committer process (tests/volumes/child.py) on this test's volume."""
        full = {"store": self.url, "head": str(self.tmp / "head.json"), **args}
        return subprocess.Popen(
            [sys.executable, str(CHILD), json.dumps(full)],
            env={**os.environ, **self.env},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )


def finish(proc: subprocess.Popen[str], timeout: float = 60) -> dict[str, Any]:
    """Wait for a committer and return what it printed; fails with its stderr when it failed."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"committer did not finish in {timeout} s; stderr:\n{err}") from None
    assert proc.returncode == 0, f"committer failed ({proc.returncode}):\n{err}"
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def kill(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
