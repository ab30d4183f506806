import time

import cloudmodal

app = cloudmodal.App("scaling-gpu")


@app.function(gpu="A10", min_containers=1, max_containers=3, buffer_containers=1, scaledown_window=2)
def gpu_work(x: float) -> float:
    time.sleep(x)
    return x
