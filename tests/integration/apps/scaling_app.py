import time

import cloudmodal

app = cloudmodal.App("scaling")


@app.function(min_containers=1, max_containers=3, buffer_containers=1, scaledown_window=2)
def work(x: float) -> float:
    time.sleep(x)
    return x
