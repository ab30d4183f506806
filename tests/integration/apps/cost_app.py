"""Functions the cost tests run on the simulated cloud (tests/integration/test_cost.py)."""

import cloudmodal

app = cloudmodal.App("cost-app", tags={"team": "research"})


@app.function(gpu="A10", scaledown_window=2)
def spot_then_on_demand(x: int) -> int:
    return x


capped = cloudmodal.App("capped-app", budget=cloudmodal.Budget(max_total=5.0, period="month"))


@capped.function(gpu="A10", scaledown_window=2, spot="never")
def under_budget(x: int) -> int:
    return x
