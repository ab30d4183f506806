"""The cloudmodal side of ``bench/runtime.py``'s warm scenarios: a no-op, a 10 ms sleep run with
``@concurrent``, and an echo for large payloads."""

import time

import cloudmodal

app = cloudmodal.App("bench-runtime")


@app.function()
def noop(x):
    return x


@app.function()
@cloudmodal.concurrent(max_inputs=100)
def sleep10(x):
    time.sleep(0.01)
    return x


@app.function()
def echo(b):
    return b
