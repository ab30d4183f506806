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
        self.loaded_in = os.getpid()
        print(f"loaded weights in worker {self.loaded_in}")

    @cloudmodal.method()
    def predict(self, x: int) -> int:
        return x * self.weights[0]

    @cloudmodal.method()
    def worker_pid(self) -> int:
        return self.loaded_in

    @cloudmodal.exit()
    def unload(self) -> None:
        print("unloading")


@app.local_entrypoint()
def main() -> None:
    doubler = Model()
    print("predict:", list(doubler.predict.map(range(5))))
    print("tripler:", Model(scale=3).predict.remote(5))
    print("one @enter per worker:", doubler.worker_pid.remote() == doubler.worker_pid.remote())
