"""`cloudmodal run surface.py`: the smaller parts of Modal's Function / FunctionCall / Cls / Secret surface, in
the style of Modal's reference pages: with_concurrency and with_batching variants (functions and classes),
experimental_spawn_map with FunctionCall.get(index=) and .iter(), Function.from_id, get(timeout=0),
map(order_outputs=False, return_exceptions=True), for_each(ignore_exceptions=True), a remote exception
re-raised as its own type, and Secret.from_local_environ / Secret.from_dotenv."""

import os
import threading

import cloudmodal

app = cloudmodal.App("conformance-surface")

_barriers: dict[int, threading.Barrier] = {}


def _meet(parties: int, timeout: float) -> bool:
    """Wait until `parties` inputs are in this container at once (True), or `timeout` s (False)."""
    barrier = _barriers.setdefault(parties, threading.Barrier(parties))
    try:
        barrier.wait(timeout)
        return True
    except threading.BrokenBarrierError:
        return False


@app.function()
def square(x: int) -> int:
    if x < 0:
        raise ValueError(f"negative: {x}")
    return x * x


@app.function(
    # at module level, as Modal's documentation writes them: the worker imports this module again, where
    # neither the variable nor the .env file is, and must not fail
    secrets=[
        cloudmodal.Secret.from_local_environ(["CONFORMANCE_LOCAL"]),
        cloudmodal.Secret.from_dotenv(__file__, filename="surface.env"),
    ]
)
def env_of(key: str) -> str:
    return os.environ.get(key, "<unset>")


@app.function(max_containers=1)
def meet(parties: int, timeout: float) -> bool:
    return _meet(parties, timeout)


@app.function(max_containers=1)
def batch_sizes(xs: list[int]) -> list[int]:
    return [len(xs)] * len(xs)


@app.cls(max_containers=1)
class Room:
    parties: int = cloudmodal.parameter(default=3)

    @cloudmodal.method()
    def enter(self, timeout: float) -> bool:
        return _meet(self.parties, timeout)


@app.cls(max_containers=1)
class Scaler:
    factor: int = cloudmodal.parameter(default=10)

    @cloudmodal.method()
    def scale(self, xs: list[int]) -> list[int]:
        return [x * self.factor for x in xs]


@app.local_entrypoint()
def main() -> None:
    # with_concurrency: 4 inputs meet at once in the one container max_containers allows
    print("with_concurrency", sorted(meet.with_concurrency(max_inputs=4).map([4] * 4, [120] * 4)))
    print("cls with_concurrency", sorted(Room.with_concurrency(max_inputs=3)(parties=3).enter.map([120] * 3)))
    # with_batching: the function gets lists; callers pass single items
    sizes = list(batch_sizes.with_batching(max_batch_size=4, wait_ms=3000).map(range(4)))
    print("with_batching lists", all(isinstance(s, int) and 1 <= s <= 4 for s in sizes), len(sizes))
    print(
        "cls with_batching",
        list(Scaler.with_batching(max_batch_size=8, wait_ms=500)(factor=3).scale.map([1, 2, 3])),
    )
    # experimental_spawn_map: one FunctionCall holding every input
    fc = square.experimental_spawn_map(range(5))
    print("spawn_map inputs", fc.num_inputs(), "index 3 ->", fc.get(index=3), "iter", list(fc.iter()))
    print("iter range", list(cloudmodal.FunctionCall.from_id(fc.object_id).iter(start=1, end=3)))
    # Function.from_id
    print("from_id", cloudmodal.Function.from_id(square.object_id).remote(4))
    # get(timeout=0) polls: the builtin TimeoutError while the input waits. Without a concurrency variant `meet`
    # runs one input at a time, so two inputs never meet (the negative control of the lines above)
    alone = [meet.spawn(2, 3.0), meet.spawn(2, 3.0)]
    try:
        alone[0].get(timeout=0)
        print("poll: done already")
    except TimeoutError:
        print("poll: TimeoutError")
    print("without concurrency", cloudmodal.FunctionCall.gather(*alone))
    try:
        batch_sizes.remote(3)  # the function itself is not batched: it gets the int
    except TypeError:
        print("without batching TypeError")
    try:
        square.remote(-1)
    except ValueError as e:
        print("remote error ValueError", e)
    results = list(square.map([3, -2, 1], order_outputs=False, return_exceptions=True))
    print(
        "unordered",
        sorted(r for r in results if isinstance(r, int)),
        [type(r).__name__ for r in results if not isinstance(r, int)],
    )
    square.for_each([1, -1], ignore_exceptions=True)
    print("for_each ignored errors")
    # Secret.from_local_environ / from_dotenv reach the function's environment
    print("secrets", list(env_of.map(["CONFORMANCE_LOCAL", "CONFORMANCE_DOTENV"])))
