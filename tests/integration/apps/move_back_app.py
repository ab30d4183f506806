"""One always-on A10 function for the move-back-to-spot test (tests/integration/test_fallback_walk.py)."""

import cloudmodal

app = cloudmodal.App("move-back")


@app.function(gpu="A10", min_containers=1, scaledown_window=60)
def steady(x: int) -> int:
    return x
