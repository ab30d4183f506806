"""A deployed function that keeps one cloud worker up (min_containers=1): its launch needs no call."""

import cloudmodal

app = cloudmodal.App("cloud-keep")


@app.function(gpu="H100:8", spot="never", min_containers=1)
def keep(x: int) -> int:
    return x
