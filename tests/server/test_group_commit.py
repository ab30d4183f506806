"""GroupCommit: requests that arrive while a batch is written go together in the next one, each gets its own
result (or its own error), cancelled ones are not written, and close() writes what is pending first.

No test here measures time: a first batch held open by an Event makes the later requests queue up."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future

import pytest

from cloudmodal.server.group_commit import GroupCommit

WAIT = 10.0  # generous bound for a future that must complete (a hang fails instead of blocking the run)


class Recorder:
    """An ``apply`` that records every batch, answers ``op * 10``, and, while ``hold`` is armed, keeps the
    first batch open until ``release`` is set (``started`` says it is open)."""

    def __init__(self, hold: bool = True, fail: Callable[[int], bool] | None = None) -> None:
        self.batches: list[list[int]] = []
        self.started = threading.Event()
        self.release = threading.Event()
        self.hold = hold
        self.fail = fail
        self.threads: set[str] = set()

    def __call__(self, ops: Sequence[int]) -> list[int]:
        self.batches.append(list(ops))
        self.threads.add(threading.current_thread().name)
        if self.hold:
            self.hold = False
            self.started.set()
            assert self.release.wait(WAIT), "the test never released the first batch"
        if self.fail is not None and any(self.fail(op) for op in ops):
            raise ValueError(f"poisoned batch {list(ops)}")
        return [op * 10 for op in ops]


def _held(gc: GroupCommit[int, int], rec: Recorder, first: int = 0) -> Future[int]:
    """Submit ``first`` and wait until its batch is being written (and held open)."""
    fut = gc.submit(first)
    assert rec.started.wait(WAIT), "the writer never started the first batch"
    return fut


def _writer_alive(name: str) -> bool:
    return any(t.name == name and t.is_alive() for t in threading.enumerate())


def test_requests_arriving_during_a_write_go_together_in_the_next_batch() -> None:
    rec = Recorder()
    gc: GroupCommit[int, int] = GroupCommit(rec, name="gc-test-batch")
    try:
        first = _held(gc, rec)
        later = {op: gc.submit(op) for op in (1, 2, 3, 4, 5)}
        rec.release.set()
        assert first.result(WAIT) == 0
        # each future gets its own op's result (not a neighbour's: results are matched in order)
        assert {op: f.result(WAIT) for op, f in later.items()} == {1: 10, 2: 20, 3: 30, 4: 40, 5: 50}
        assert rec.batches == [[0], [1, 2, 3, 4, 5]]  # one write for all five, in submission order
        assert (gc.batches, gc.ops) == (2, 6)
        assert rec.threads == {"gc-test-batch"}  # written by the named writer thread, not the callers
    finally:
        gc.close()


def test_a_batch_holds_at_most_max_batch_requests() -> None:
    rec = Recorder()
    gc: GroupCommit[int, int] = GroupCommit(rec, max_batch=2, name="gc-test-max")
    try:
        _held(gc, rec)
        futs = [gc.submit(op) for op in (1, 2, 3, 4, 5)]
        rec.release.set()
        assert [f.result(WAIT) for f in futs] == [10, 20, 30, 40, 50]
        assert rec.batches == [[0], [1, 2], [3, 4], [5]]
    finally:
        gc.close()


def test_an_idle_writer_writes_a_request_at_once_alone() -> None:
    rec = Recorder(hold=False)
    gc: GroupCommit[int, int] = GroupCommit(rec, name="gc-test-idle")
    try:
        assert gc.submit(7).result(WAIT) == 70
        assert gc.submit(8).result(WAIT) == 80
        assert rec.batches == [[7], [8]]
    finally:
        gc.close()


def test_a_failing_batch_is_written_again_one_request_at_a_time() -> None:
    rec = Recorder(fail=lambda op: op == 13)
    gc: GroupCommit[int, int] = GroupCommit(rec, name="gc-test-poison")
    try:
        _held(gc, rec)
        good1, bad, good2 = gc.submit(1), gc.submit(13), gc.submit(2)
        rec.release.set()
        assert good1.result(WAIT) == 10
        assert good2.result(WAIT) == 20
        with pytest.raises(ValueError, match="poisoned"):
            bad.result(WAIT)
        # the batch of three failed, then each was written alone: only the poisoned one failed
        assert rec.batches == [[0], [1, 13, 2], [1], [13], [2]]
        # and the writer goes on after an error
        assert gc.submit(3).result(WAIT) == 30
    finally:
        gc.close()


def test_a_request_alone_that_fails_gets_its_error_once() -> None:
    rec = Recorder(hold=False, fail=lambda op: op < 0)
    gc: GroupCommit[int, int] = GroupCommit(rec, name="gc-test-alone")
    try:
        with pytest.raises(ValueError):
            gc.submit(-1).result(WAIT)
        assert rec.batches == [[-1]]  # a batch of one is not written again
        assert gc.submit(4).result(WAIT) == 40
    finally:
        gc.close()


def test_a_request_cancelled_before_its_batch_is_taken_is_not_written() -> None:
    rec = Recorder()
    gc: GroupCommit[int, int] = GroupCommit(rec, name="gc-test-cancel")
    try:
        _held(gc, rec)
        a, b, c = gc.submit(1), gc.submit(2), gc.submit(3)
        assert b.cancel()
        rec.release.set()
        assert (a.result(WAIT), c.result(WAIT)) == (10, 30)
        assert b.cancelled()
        assert rec.batches == [[0], [1, 3]]
        assert gc.ops == 3
    finally:
        gc.close()


def test_a_batch_of_only_cancelled_requests_writes_nothing() -> None:
    rec = Recorder()
    gc: GroupCommit[int, int] = GroupCommit(rec, name="gc-test-allcancel")
    try:
        _held(gc, rec)
        futs = [gc.submit(op) for op in (1, 2)]
        assert all(f.cancel() for f in futs)
        rec.release.set()
        assert gc.submit(3).result(WAIT) == 30
        assert rec.batches == [[0], [3]]
        assert gc.batches == 2
    finally:
        gc.close()


def test_close_writes_what_is_pending_then_the_writer_stops() -> None:
    rec = Recorder()
    name = "gc-test-close"
    gc: GroupCommit[int, int] = GroupCommit(rec, name=name)
    first = _held(gc, rec)
    pending = [gc.submit(op) for op in (1, 2, 3)]
    calling = threading.Event()

    def close() -> None:
        calling.set()
        gc.close()

    closer = threading.Thread(target=close)
    closer.start()
    assert calling.wait(WAIT)
    # close() has been called once submit refuses (probes accepted before that are pending too)
    for _ in range(1000):
        try:
            pending.append(gc.submit(100))
        except RuntimeError:
            break
        time.sleep(0.001)  # let the closer run (not a timing assertion)
    else:
        rec.release.set()
        pytest.fail("submit still accepts requests after close()")
    assert not first.done()  # the first batch is still held: what follows was pending at close()
    rec.release.set()
    closer.join(WAIT)
    assert not closer.is_alive(), "close() did not return"
    assert first.result(0) == 0
    assert [f.result(0) for f in pending[:3]] == [10, 20, 30]  # done by the time close() returned
    assert all(f.result(0) == 1000 for f in pending[3:])
    assert not _writer_alive(name)
    with pytest.raises(RuntimeError):
        gc.submit(4)
    gc.close()  # again: nothing to do


def test_close_before_any_request_then_submit_refuses() -> None:
    gc: GroupCommit[int, int] = GroupCommit(Recorder(hold=False), name="gc-test-unused")
    gc.close()
    with pytest.raises(RuntimeError):
        gc.submit(1)


def test_close_from_the_writer_thread_does_not_wait_for_itself() -> None:
    """The writer calling close() (e.g. from inside ``apply``) must not join itself, and still drains."""
    box: list[GroupCommit[int, int]] = []
    rec = Recorder()

    def apply(ops: Sequence[int]) -> list[int]:
        out = rec(ops)
        if ops == [0]:
            box[0].close()
        return out

    name = "gc-test-selfclose"
    gc: GroupCommit[int, int] = GroupCommit(apply, name=name)
    box.append(gc)
    first = _held(gc, rec)
    later = [gc.submit(op) for op in (1, 2)]
    rec.release.set()
    assert first.result(WAIT) == 0
    assert [f.result(WAIT) for f in later] == [10, 20]
    gc.close()
    assert not _writer_alive(name)


def test_run_awaits_the_result_without_blocking_the_event_loop() -> None:
    gate = threading.Event()
    seen: list[list[int]] = []

    def apply(ops: Sequence[int]) -> list[int]:
        seen.append(list(ops))
        # the loop sets the gate after run() was awaited: a run() that blocked the loop would never let it
        if not gate.wait(WAIT):
            raise TimeoutError("the event loop was blocked")
        return [op + 1 for op in ops]

    gc: GroupCommit[int, int] = GroupCommit(apply, name="gc-test-async")

    async def main() -> list[int]:
        task = asyncio.ensure_future(gc.run(1))
        await asyncio.sleep(0)  # the task submits, and waits
        gate.set()
        first = await task
        rest = await asyncio.gather(*(gc.run(op) for op in (2, 3, 4)))
        return [first, *rest]

    try:
        assert asyncio.run(main()) == [2, 3, 4, 5]
        assert sorted(op for b in seen for op in b) == [1, 2, 3, 4]
    finally:
        gc.close()


def test_a_cancelled_awaiter_s_request_is_not_written() -> None:
    rec = Recorder()
    gc: GroupCommit[int, int] = GroupCommit(rec, name="gc-test-async-cancel")

    async def main() -> tuple[int, int]:
        first = asyncio.ensure_future(gc.run(0))
        while not rec.started.is_set():  # the writer holds the first batch (no time measured: a yield)
            await asyncio.sleep(0.001)
        gone = asyncio.ensure_future(gc.run(2))
        kept = asyncio.ensure_future(gc.run(3))
        await asyncio.sleep(0)  # both submitted
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone
        rec.release.set()
        return await first, await kept

    try:
        assert asyncio.run(main()) == (0, 30)
        assert rec.batches == [[0], [3]]
    finally:
        gc.close()
