import time

import cloudmodal

app = cloudmodal.App("sim-app")


@app.function(gpu=["A10", "L4"], spot="never")
def on_demand_fallback_list(x: int) -> int:
    return x


@app.function(gpu="A10", retries=cloudmodal.Retries(max_retries=2, initial_delay=0.1))
def spot_work(x: int) -> int:
    time.sleep(0.002)
    return x


@app.function(gpu="A10", scaledown_window=2)
def spot_or_not(x: int) -> int:
    return x


@app.function(gpu="A10", min_on_demand=1)
def floor_work(x: int) -> int:
    time.sleep(0.5)
    return x
