"""Workers hammering one Dict and one Queue at once (tests/integration/test_dict_queue.py): imported by the
test and by the real worker processes."""

from __future__ import annotations

import os
import time

import cloudmodal
from cloudmodal.dict import Dict
from cloudmodal.queue import Queue

app = cloudmodal.App("kv")

WORKERS = 8
KEYS = 40  # distinct keys each worker writes
RACES = 20  # keys every worker tries to put with skip_if_exists=True
ITEMS = 60  # queue items each worker produces, in order, into a partition of its own and the default one


def _until(cond, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up waiting for {what}")
        time.sleep(0.05)


# single_use_containers: a worker claims one input, never prefetching a second that would wait behind the
# first (which waits for all WORKERS to run at once)
@app.function(max_containers=WORKERS, single_use_containers=True, timeout=300)
def hammer(args: tuple[str, str, int]) -> dict:
    """One of WORKERS concurrent workers: waits until all of them run (each in a process of its own), then
    writes distinct keys, races on shared ones, produces items and consumes items until every producer is
    done and the queue is empty. Returns what it saw, for the test to check."""
    dict_name, queue_name, me = args
    d = Dict.from_name(dict_name)
    q = Queue.from_name(queue_name)
    d[f"arrived-{me}"] = os.getpid()
    _until(lambda: all(f"arrived-{i}" in d for i in range(WORKERS)), "every worker to arrive")

    for j in range(KEYS // 2):
        d.put(f"w{me}-{j}", (me, j))
    d.update({f"w{me}-{j}": (me, j) for j in range(KEYS // 2, KEYS)})
    won = [r for r in range(RACES) if d.put(f"race-{r}", me, skip_if_exists=True)]

    consumed: list[tuple[str, int, int]] = []

    def consume(partition: str | None) -> None:
        for v in q.get_many(7, block=False, partition=partition):
            consumed.append((partition or "", v[0], v[1]))

    for j in range(ITEMS):
        q.put((me, j), partition=f"p{me}")
        q.put((me, j))
        if j % 10 == 9:
            consume(None)
            consume(f"p{(me + 1) % WORKERS}")
    d[f"produced-{me}"] = True

    def drained() -> bool:
        for p in [None] + [f"p{i}" for i in range(WORKERS)]:
            consume(p)
        producers_done = all(f"produced-{i}" in d for i in range(WORKERS))
        return producers_done and q.len(total=True) == 0

    _until(drained, "every item to be consumed")
    return {"worker": me, "pid": os.getpid(), "won": won, "consumed": consumed}


@app.function(timeout=120)
def through_handles(d: Dict, q: Queue) -> int:
    """Handles passed as arguments work in a worker, as does an ephemeral dict it makes and deletes itself."""
    d["from-worker"] = q.get(timeout=30)
    q.put("reply")
    with Dict.ephemeral() as mine:
        mine["x"] = 41
        return mine["x"] + 1
