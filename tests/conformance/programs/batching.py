"""`cloudmodal run batching.py`: dynamic batching, input concurrency, for_each and an ephemeral Queue
passed to a function, in the style of Modal's guides ("Dynamic batching", "Input concurrency", "Dicts and
Queues")."""

import asyncio

import cloudmodal

app = cloudmodal.App("conformance-batching")


@app.function()
@cloudmodal.batched(max_batch_size=4, wait_ms=500)
def double(xs: list[int]) -> list[int]:
    return [2 * x for x in xs]


@app.function()
@cloudmodal.concurrent(max_inputs=8)
async def slow_echo(x: int) -> int:
    await asyncio.sleep(0.2)
    return x


@app.function()
def produce(q: cloudmodal.Queue, n: int) -> None:
    for i in range(n):
        q.put(i * i, partition="squares")


@app.local_entrypoint()
def main() -> None:
    print("batched", list(double.map(range(10))))
    print("batched remote", double.remote(21))
    print("concurrent", sorted(slow_echo.map(range(8))))
    double.for_each(range(3))
    print("for_each done")
    with cloudmodal.Queue.ephemeral() as q:
        produce.remote(q, 4)
        print("queue len", q.len(partition="squares"))
        print("queue items", q.get_many(4, partition="squares"))
        print("queue empty", q.get(block=False, partition="squares"))
