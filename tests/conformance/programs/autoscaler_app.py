"""`cloudmodal deploy autoscaler_app.py`, then `python autoscaler_calls.py` changes its autoscaler at run time."""

import cloudmodal

app = cloudmodal.App("conformance-autoscaler")


@app.function(scaledown_window=60)
def hello(name: str) -> str:
    return f"hello {name}"


@app.cls()
class Greeter:
    greeting: str = cloudmodal.parameter(default="hi")

    @cloudmodal.method()
    def greet(self, name: str) -> str:
        return f"{self.greeting} {name}"
