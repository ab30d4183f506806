"""A program written for Modal, with only its import line changed (`import modal` ->
`from cloudmodal.compat import modal`); run with `cloudmodal run modal_style.py`."""

# ruff: noqa: I001 - the compat import must come before the `modal.` ones, which an import sorter would reorder

import asyncio

from cloudmodal.compat import modal
from modal.exception import NotFoundError
from modal.functions import FunctionCall

app = modal.App("conformance-modal-style")


@app.function(retries=modal.Retries(max_retries=1, initial_delay=1.0))
def square(x: int) -> int:
    return x * x


@app.function()
def countdown(n: int):
    yield from range(n, 0, -1)


@app.cls()
class Counter:
    start: int = modal.parameter(default=0)

    @modal.enter()
    def setup(self) -> None:
        self.base = self.start * 10

    @modal.method()
    def add(self, x: int) -> int:
        return self.base + x


@app.local_entrypoint()
def main(n: int = 3) -> None:
    print("square", square.remote(7))
    print("starmap", list(square.starmap([(1,), (2,), (3,)])))
    print("countdown", list(countdown.remote_gen(n)))
    print("cls", Counter(start=2).add.remote(5))
    calls = [square.spawn(i) for i in range(4)]
    print("gather", FunctionCall.gather(*calls))
    print("from_id", FunctionCall.from_id(calls[-1].object_id).get())
    print("aio", asyncio.run(square.remote.aio(9)))
    with modal.Dict.ephemeral() as d:
        d["k"] = [1, 2]
        print("dict", d["k"], "k" in d)
    try:
        modal.Function.from_name("conformance-no-such-app", "f").remote()
    except NotFoundError:
        print("from_name: NotFoundError")
