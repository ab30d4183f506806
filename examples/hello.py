"""The first app: one function, called once and mapped over a range.

cloudmodal run examples/hello.py            # embedded control plane, workers on this machine
cloudmodal run examples/hello.py --n 1000
"""

import platform

import cloudmodal

app = cloudmodal.App("hello")


@app.function()
def square(x: int) -> int:
    if x == 3:
        print(f"worker on {platform.node()} squaring {x}")
    return x * x


@app.local_entrypoint()
def main(n: int = 100) -> None:
    print("square.remote(7) =", square.remote(7))
    total = sum(square.map(range(n)))
    print(f"sum of squares below {n} = {total}")
    assert total == sum(i * i for i in range(n))
