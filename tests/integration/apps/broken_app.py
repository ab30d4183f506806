import os

import cloudmodal

app = cloudmodal.App("broken-app")

if os.environ.get("CLOUDMODAL_IS_REMOTE") == "1":
    raise ImportError("this module cannot be imported inside a worker (a missing package, say)")


@app.function()
def f(x: int) -> int:
    return x
