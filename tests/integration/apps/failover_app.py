"""The app of the replica failover test: squares, where inputs from ``k`` on wait for a gate file (so that
they are held by workers, mid-run, when the test kills a control plane, and finish only after)."""

from __future__ import annotations

import os
import time

import cloudmodal

app = cloudmodal.App("failover")

GATE_TIMEOUT_S = 180.0


@app.function(max_containers=2)
def gated_square(x: int, gate: str, k: int) -> int:
    if x >= k:
        deadline = time.monotonic() + GATE_TIMEOUT_S
        while not os.path.exists(gate):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the gate {gate} never opened")
            time.sleep(0.02)
    return x * x
