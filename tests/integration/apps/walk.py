"""A one-function app whose live worker gives the route-access walk a real worker identity."""

from __future__ import annotations

import cloudmodal

app = cloudmodal.App("walk")


@app.function(min_containers=1)
def echo(x: int) -> int:
    return x
