"""Cold start, cloudmodal: a fresh process from launch to the first result of a trivial function.

cloudmodal run bench/apps/cold_cloudmodal.py     # the CLI: embedded control plane, one worker
python bench/apps/cold_cloudmodal.py             # a plain script: `with run_app(app): one.remote(1)`
"""

import cloudmodal

app = cloudmodal.App("bench-cold")


@app.function()
def one(x: int) -> int:
    return x


@app.local_entrypoint()
def main() -> None:
    print(f"FIRST_RESULT {one.remote(1)}", flush=True)


if __name__ == "__main__":
    from cloudmodal.client.session import run_app

    with run_app(app):
        print(f"FIRST_RESULT {one.remote(1)}", flush=True)
