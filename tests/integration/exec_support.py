"""What the `cloudmodal container exec` tests share: a `cat` session echoing line by line, and reading a PTY."""

from __future__ import annotations

import os
import select
import subprocess
import time


def assert_cat_echoes(argv: list[str], env: dict[str, str], what: str) -> None:
    """Run ``argv`` (an exec of ``cat`` without a PTY): each line written comes back before the next is written,
    and EOF on its stdin ends it with 0."""
    p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert p.stdin is not None and p.stdout is not None
    try:
        for i in range(3):
            line = f"line {i} {what}\n".encode()
            p.stdin.write(line)
            p.stdin.flush()
            assert p.stdout.readline() == line  # echoed before the next line is written
        p.stdin.close()  # EOF: cat exits 0
        assert p.wait(60) == 0
    finally:
        if p.poll() is None:
            p.kill()


def read_until(fd: int, pattern: bytes, timeout: float = 60.0) -> bytes:
    """What ``fd`` (a PTY's master) gives until ``pattern`` shows; an AssertionError with the end of it if it
    does not within ``timeout`` (a bound on a wait, not a timing)."""
    seen = b""
    deadline = time.monotonic() + timeout
    while pattern not in seen and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
    assert pattern in seen, seen[-500:]
    return seen
