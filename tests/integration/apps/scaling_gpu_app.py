import os
import time

import cloudmodal

app = cloudmodal.App("scaling-gpu")


@app.function(gpu="A10", min_containers=1, max_containers=3, buffer_containers=1, scaledown_window=2)
def gpu_work(x: float) -> float:
    time.sleep(x)
    return x


@app.function(gpu="A10", min_containers=1, max_containers=3, buffer_containers=1, scaledown_window=2)
def gated_work(gate: str) -> str:
    """Runs until the file ``gate`` exists: a test holds inputs in flight for as long as it checks the pool,
    instead of guessing how long the autoscaler takes to react."""
    deadline = time.monotonic() + 120  # a test that failed before opening the gate must not hang its workers
    while not os.path.exists(gate):
        if time.monotonic() > deadline:
            raise TimeoutError(f"the gate {gate} was never opened: the test should create it")
        time.sleep(0.01)
    return gate
