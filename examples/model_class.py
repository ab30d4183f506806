"""A class with `@enter` (runs once per worker) and parameters.

cloudmodal run examples/model_class.py
"""

import os

import cloudmodal

app = cloudmodal.App("model-class")


@app.cls(scaledown_window=10)
class Model:
    scale: int = cloudmodal.parameter(default=2)

    @cloudmodal.enter()
    def load(self) -> None:
        # Expensive set-up (loading weights, warming caches) happens once per worker, not per input.
        self.weights = [self.scale] * 1000
        self.enter_calls = getattr(self, "enter_calls", 0) + 1
        print(f"loaded weights in worker {os.getpid()}")

    @cloudmodal.method()
    def predict(self, x: int) -> int:
        return x * self.weights[0]

    @cloudmodal.method()
    def stats(self) -> tuple[int, int]:
        return os.getpid(), self.enter_calls

    @cloudmodal.exit()
    def unload(self) -> None:
        print("unloading")


@app.local_entrypoint()
def main() -> None:
    doubler = Model()
    print("predict:", list(doubler.predict.map(range(5))))
    print("tripler:", Model(scale=3).predict.remote(5))
    stats = [doubler.stats.remote() for _ in range(4)]
    print("one @enter per worker:", all(calls == 1 for _pid, calls in stats))
