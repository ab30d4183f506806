"""`.map`, `.starmap`, `.spawn` and `FunctionCall.get`.

cloudmodal run examples/map_and_spawn.py
"""

import time

import cloudmodal

app = cloudmodal.App("map-and-spawn")


@app.function()
def slow_add(a: int, b: int) -> int:
    time.sleep(0.2)
    return a + b


@app.function()
def might_fail(x: int) -> int:
    if x % 4 == 0:
        raise ValueError(f"{x} is divisible by 4")
    return x


@app.local_entrypoint()
def main() -> None:
    print("starmap:", list(slow_add.starmap([(1, 2), (3, 4), (5, 6)])))
    call = slow_add.spawn(20, 22)
    print("spawned", call.object_id, "->", call.get(timeout=60))
    results = list(might_fail.map(range(8), return_exceptions=True))
    print("with return_exceptions:", [r if isinstance(r, int) else type(r).__name__ for r in results])
    for x in might_fail.map(range(1, 4), order_outputs=False):
        print("as completed:", x)
