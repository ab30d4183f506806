"""Functions for the fallback-walk tests (tests/integration/test_fallback_walk.py) on the sim cloud."""

import time

import cloudmodal

app = cloudmodal.App("fallback-walk")


# The request: H100 first, A100-80GB if H100 cannot be had. One worker from the start, so the test can
# wait (with a deadline) for the pool to reach the second tier before it maps.
@app.function(gpu=["H100", "A100-80GB"], min_containers=1, retries=cloudmodal.Retries(max_retries=2))
def square(x: int) -> int:
    time.sleep(0.01)
    return x * x
