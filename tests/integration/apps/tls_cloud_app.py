"""A class on a cloud node whose worker dials a TLS control plane (test_tls_cloud): one method for inputs and
one web endpoint, so one worker (one node, one bootstrap) shows both."""

import os

import cloudmodal

app = cloudmodal.App("tls-cloud-app")


def _seen() -> dict:
    from cloudmodal.worker import runtime

    creds = runtime.credentials()
    return {
        "worker": os.environ.get("CLOUDMODAL_WORKER_ID"),
        "url": creds.url if creds is not None else None,  # the control plane as this worker dials it
        "pin": os.environ.get("CLOUDMODAL_TLS_FINGERPRINT"),  # what the bootstrap handed the worker
    }


@app.cls(gpu="H100:8", spot="never", max_containers=1, scaledown_window=60)
class Probe:
    @cloudmodal.method()
    def where(self, x: int) -> dict:
        return {"x2": x * 2, **_seen()}

    @cloudmodal.fastapi_endpoint()
    def web(self) -> dict:
        return _seen()
