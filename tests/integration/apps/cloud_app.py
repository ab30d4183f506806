"""Functions the clouds' end-to-end tests run on cloud nodes (stand-ins reached over SSH)."""

import os
import time

import cloudmodal

app = cloudmodal.App("cloud-app")


@app.function(gpu=["H100:8", "A100-80GB:8"], spot="never")
def where(x: int) -> dict:
    """Which worker ran ``x``, and that it ran with the node's environment (not the control plane's)."""
    return {"x2": x * 2, "worker": os.environ.get("CLOUDMODAL_WORKER_ID"), "pid": os.getpid()}


@app.function(gpu="H100:8", spot="require", max_containers=1, timeout=120)
def slow_spot(x: int) -> int:
    time.sleep(0.5)
    return x


@app.function(gpu="H100:8", spot="never", scaledown_window=2)
def brief(x: int) -> int:
    return x + 1


@app.function(gpu="H100:8", spot="never", max_containers=3)
def wide(x: int) -> int:
    time.sleep(0.3)
    return x


@app.function(gpu="H100:8", spot="never")
@cloudmodal.fastapi_endpoint()
def web_where() -> dict:
    """A web endpoint on a cloud node: its worker reaches the control plane only through its tunnel."""
    return {"worker": os.environ.get("CLOUDMODAL_WORKER_ID")}
