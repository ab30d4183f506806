"""An app exercising every call path; imported by the tests and by the real worker processes."""

from __future__ import annotations

import asyncio
import os
import threading
import time

import cloudmodal

app = cloudmodal.App("basic")


@app.function()
def square(x: int) -> int:
    return x * x


@app.function()
def add(a: int, b: int = 0) -> int:
    return a + b


@app.function()
def echo_bytes(data: bytes) -> bytes:
    return data


@app.function()
def fail(x: int) -> int:
    raise ValueError(f"bad input {x}")


@app.function()
def countdown(n: int):
    yield from range(n)


@app.function()
async def async_double(x: int) -> int:
    await asyncio.sleep(0.01)
    return 2 * x


@app.function()
@cloudmodal.concurrent(max_inputs=20)
def concurrent_sleep(x: int) -> tuple[int, float, float]:
    start = time.time()
    time.sleep(0.5)
    return os.getpid(), start, time.time()


@app.function()
@cloudmodal.concurrent(max_inputs=20)
async def concurrent_async_sleep(x: int) -> tuple[int, float, float]:
    start = time.time()
    await asyncio.sleep(0.5)
    return os.getpid(), start, time.time()


@app.function()
@cloudmodal.batched(max_batch_size=8, wait_ms=500)
def batched_len(xs: list[int]) -> list[int]:
    return [len(xs)] * len(xs)


@app.function(retries=cloudmodal.Retries(max_retries=3, backoff_coefficient=2.0, initial_delay=0.2))
def flaky(path: str, succeed_on: int) -> int:
    with open(path, "a+") as f:
        f.seek(0)
        n = len(f.read()) + 1
        f.write("x")
    if n < succeed_on:
        raise RuntimeError(f"attempt {n} failed")
    return n


# Delays above the claim handler's 1 s re-read: an input requeued without backoff is found by that re-read,
# so shorter delays would leave gaps no test could tell from no backoff at all.
@app.function(retries=cloudmodal.Retries(max_retries=2, backoff_coefficient=2.0, initial_delay=1.5))
def flaky_stamped(path: str, succeed_on: int) -> list[float]:
    """Like ``flaky``, but each attempt appends its start time (one line) and success returns them all: the
    gaps between attempts, which the backoff keeps at least ``initial_delay * backoff_coefficient**(n-1)``."""
    start = time.time()
    with open(path, "a+") as f:
        f.write(f"{start!r}\n")
        f.seek(0)
        starts = [float(line) for line in f.read().split()]
    if len(starts) < succeed_on:
        raise RuntimeError(f"attempt {len(starts)} failed")
    return starts


@app.function(timeout=2)
def sleepy(seconds: float) -> str:
    time.sleep(seconds)
    return "woke"


@app.function(timeout=60)
def nap(seconds: float) -> str:
    """sleepy without its short timeout: for a call that must still be running a moment later and then
    finish (on a busy machine a stall would push sleepy past its 2 s)."""
    time.sleep(seconds)
    return "woke"


@app.function(timeout=2)
async def async_sleepy(seconds: float) -> str:
    await asyncio.sleep(seconds)
    return "woke"


@app.function()
def crash(x: int) -> int:
    os._exit(17)


@app.function()
def unpicklable_result(x: int) -> object:
    return threading.Lock()


@app.function()
def pid_of(x: int) -> int:
    time.sleep(0.001)
    return os.getpid()


@app.function()
def slow_identity(x: int) -> int:
    time.sleep(0.002)
    return x


@app.function()
def nested(x: int) -> int:
    return square.remote(x) + 1


@app.function()
def printer(msg: str) -> str:
    print(f"log line: {msg}")
    return msg


@app.cls()
class Counter:
    start: int = cloudmodal.parameter(default=0)

    @cloudmodal.enter()
    def setup(self) -> None:
        self.enters = getattr(self, "enters", 0) + 1
        self.value = self.start

    @cloudmodal.method()
    def incr(self, by: int = 1) -> tuple[int, int, int]:
        self.value += by
        return os.getpid(), self.enters, self.value

    @cloudmodal.method()
    def gen(self, n: int):
        yield from range(self.start, self.start + n)
