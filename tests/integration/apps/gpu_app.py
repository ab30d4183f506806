import os

import cloudmodal

app = cloudmodal.App("gpu-app")


@app.function(gpu=["H100", "A100-80GB:2"])
def on_gpu(x: int) -> tuple[int, str]:
    return x * 2, os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>")
