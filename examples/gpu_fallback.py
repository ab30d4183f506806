"""A GPU fallback list: the first type that can be had is used, cheapest offer first.

cloudmodal run examples/gpu_fallback.py                    # needs one of these GPUs locally or a cloud
cloudmodal run examples/gpu_fallback.py --gpu-fallback cpu # develop on a laptop without a GPU
cloudmodal offers H100 A100-80GB L40S                      # what each tier would cost on the clouds
"""

import os

import cloudmodal

app = cloudmodal.App("gpu-fallback")


@app.function(gpu=["H100", "A100-80GB", "L40S"], spot="allow", max_price_per_hour=6.0)
def which_gpu() -> str:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    try:
        import pynvml

        pynvml.nvmlInit()
        names = [
            pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(i))
            for i in range(pynvml.nvmlDeviceGetCount())
        ]
    except Exception:
        names = []
    return f"CUDA_VISIBLE_DEVICES={visible!r}, GPUs seen: {names or 'none (CPU fallback)'}"


@app.local_entrypoint()
def main() -> None:
    print(which_gpu.remote())
