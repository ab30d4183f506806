"""A worker whose control plane is gone keeps retrying for ``worker_reconnect_s`` (the control plane may be
restarting); told to stop (SIGTERM: a drain, a preemption notice, a node shutting down), it gives up within
its grace instead and exits on its own."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from cloudmodal.worker.runtime import TERM_GRACE_S
from tests.ports import reserved_port

HANG_GUARD_S = 120.0  # far under the 600 s of patience the worker is given, far over its grace


def _closed_port() -> int:
    return reserved_port()  # nothing listens on it (nor takes it: not an ephemeral port)


def _catches_sigterm(pid: int) -> bool:
    """Whether the process has installed a SIGTERM handler (its SigCgt mask in /proc)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) >> (signal.SIGTERM - 1) & 1)
    return False


def test_a_worker_retrying_a_dead_control_plane_exits_on_sigterm_within_its_grace(tmp_path) -> None:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("CLOUDMODAL_") or k == "CLOUDMODAL_HOME"
    } | {
        "CLOUDMODAL_SERVER_URL": f"http://127.0.0.1:{_closed_port()}",
        "CLOUDMODAL_WORKER_ID": "wk-orphan",
        "CLOUDMODAL_TOKEN": "cm_orphan",
        "CLOUDMODAL_WORKER_RECONNECT_S": "600",
        "CLOUDMODAL_HOME": str(tmp_path),
    }
    p = subprocess.Popen(
        [sys.executable, "-m", "cloudmodal.worker"],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + HANG_GUARD_S
        while not _catches_sigterm(p.pid):
            assert p.poll() is None, p.stderr.read().decode() if p.stderr else ""
            assert time.monotonic() < deadline, "the worker never installed its SIGTERM handler"
            time.sleep(0.05)
        p.send_signal(signal.SIGTERM)
        code = p.wait(timeout=HANG_GUARD_S)
        # it exited by itself (the handler ran and its retries ended), not killed by the signal
        assert code >= 0, f"killed by signal {-code}"
        err = p.stderr.read().decode() if p.stderr else ""
        assert "Could not reach the control plane" in err, err[-2000:]
        assert TERM_GRACE_S < HANG_GUARD_S
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
