"""Group commit: requests from many clients written together, one transaction per batch.

The requests on every input's path from the workers (outputs, claims, heartbeats) are each a few small
statements. On PostgreSQL what they cost the control plane is per statement and per transaction (round trips,
the driver's Python, a pool checkout), hardly per row: with a thousand workers, a transaction per request
spends the control plane's one Python core on overhead. Here requests that arrive while a batch is being
written wait and are written together in the next one, with one statement per kind of work for the whole
batch. No timer is involved: a request that finds the writer idle is written at once, alone, and batches grow
only as fast as requests arrive while the previous batch commits.

A batch that fails is written again one request at a time, so one request's error (or a deadlock with another
writer) is that request's alone.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Generic, TypeVar

log = logging.getLogger("cloudmodal.server")

Op = TypeVar("Op")
Result = TypeVar("Result")

MAX_BATCH = 1000  # requests in one transaction: bounds its size and how long it holds its locks


class GroupCommit(Generic[Op, Result]):
    """Batches ``Op``s for ``apply``, which writes a batch in one transaction and returns each op's result
    in order. ``apply`` raises only when nothing of the batch was committed."""

    def __init__(
        self,
        apply: Callable[[Sequence[Op]], list[Result]],
        *,
        max_batch: int = MAX_BATCH,
        name: str = "cp-commit",
    ) -> None:
        self._apply = apply
        self._max = max_batch
        self._name = name
        self._cv = threading.Condition()
        self._pending: list[tuple[Op, Future[Result]]] = []
        self._thread: threading.Thread | None = None
        self._closed = False
        # statistics (tests and benchmarks read them)
        self.batches = 0
        self.ops = 0

    def submit(self, op: Op) -> Future[Result]:
        fut: Future[Result] = Future()
        with self._cv:
            if self._closed:
                raise RuntimeError("The control plane is stopping.")
            self._pending.append((op, fut))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
            self._cv.notify()
        return fut

    async def run(self, op: Op) -> Result:
        """Submit ``op`` and wait for its result without blocking the event loop."""
        return await asyncio.wrap_future(self.submit(op))

    def close(self) -> None:
        """Write what is pending, then stop the writer thread."""
        with self._cv:
            self._closed = True
            self._cv.notify()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=30)

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._pending and not self._closed:
                    self._cv.wait()
                if not self._pending:
                    return
                batch, self._pending = self._pending[: self._max], self._pending[self._max :]
            # a waiter that gave up (its request was cancelled) before its turn is not written
            live = [(op, fut) for op, fut in batch if fut.set_running_or_notify_cancel()]
            if live:
                self._write(live)

    def _write(self, batch: list[tuple[Op, Future[Result]]]) -> None:
        self.batches += 1
        self.ops += len(batch)
        try:
            results = self._apply([op for op, _ in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"{len(results)} results for a batch of {len(batch)}")
        except BaseException as e:
            if len(batch) == 1:
                batch[0][1].set_exception(e)
                return
            log.debug("a batch of %d failed (%s); writing them one at a time", len(batch), e)
            for item in batch:
                self._write([item])
            return
        for (_, fut), result in zip(batch, results, strict=True):
            fut.set_result(result)


__all__ = ["GroupCommit", "MAX_BATCH"]
