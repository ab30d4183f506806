"""`cloudmodal deploy deployed.py`, then `python lookup_deployed.py` finds it by name."""

import cloudmodal

app = cloudmodal.App("conformance-deployed")


@app.function()
def triple(x: int) -> int:
    return 3 * x
