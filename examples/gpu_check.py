"""Device check: a ``gpu="H100"`` function placed on this machine's GPU, and what the worker sees.

cloudmodal run examples/gpu_check.py               # on a host with an H100
cloudmodal run examples/gpu_check.py --gpu H200    # name the GPU the host has

The entrypoint prints the control plane's view (the GPUs the local provider detected) and the worker's view
(``CUDA_VISIBLE_DEVICES``, the devices NVML and PyTorch see, a bf16 matrix product on the device). A GPU the
host lacks fails with the cheapest cloud offers for it instead.
"""

import os
import time

import cloudmodal

app = cloudmodal.App("gpu-check")


def _worker_view() -> dict:
    view: dict = {"pid": os.getpid(), "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES")}
    try:
        import pynvml

        pynvml.nvmlInit()
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        view["nvml"] = [
            f"{pynvml.nvmlDeviceGetName(h)} ({pynvml.nvmlDeviceGetMemoryInfo(h).total // 2**20} MiB)"
            for h in handles
        ]
    except Exception as exc:  # no driver: say so rather than fail the check
        view["nvml"] = f"unavailable: {exc}"
    try:
        import torch
    except ImportError:
        view["torch"] = "not installed in the worker's environment"
        return view
    view["torch.cuda.device_count"] = torch.cuda.device_count()
    if torch.cuda.is_available():
        view["torch.cuda.get_device_name"] = torch.cuda.get_device_name(0)
        a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
        for _ in range(3):
            a @ b
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(10):
            a @ b
        torch.cuda.synchronize()
        view["bf16 8192^3 matmul TFLOP/s"] = round(10 * 2 * 8192**3 / (time.perf_counter() - t0) / 1e12)
    return view


@app.function(gpu="H100")
def on_gpu() -> dict:
    return _worker_view()


@app.local_entrypoint()
def main(gpu: str = "H100") -> None:
    from cloudmodal.providers.gpu import detect_gpus

    print("control plane detected:", [f"{d.index}: {d.raw_name} -> {d.name}" for d in detect_gpus()])
    fn = on_gpu if gpu == "H100" else on_gpu.with_options(gpu=gpu)
    for key, value in fn.remote().items():
        print(f"worker sees {key}: {value}")
