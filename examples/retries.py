"""Retries with backoff: a flaky function succeeds on its third attempt.

cloudmodal run examples/retries.py
"""

import cloudmodal

app = cloudmodal.App("retries")


@app.function(retries=cloudmodal.Retries(max_retries=3, backoff_coefficient=2.0, initial_delay=0.1))
def flaky(path: str) -> str:
    # Count attempts in a file, so every retry (possibly on another worker) sees the previous ones.
    with open(path, "a+") as f:
        f.seek(0)
        n = len(f.read()) + 1
        f.write("x")
    if n < 3:
        raise RuntimeError(f"attempt {n} failed")
    return f"succeeded on attempt {n}"


@app.local_entrypoint()
def main() -> None:
    import tempfile

    path = tempfile.mktemp(prefix="cloudmodal-retries-")
    print(flaky.remote(path))
