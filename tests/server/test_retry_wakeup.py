"""A retry's backoff ends with nobody writing anything: the queue says when each function's requeued inputs
become claimable, and the hub calls back on the server's loop then, so waiting workers claim them at once instead
of at their next periodic re-read."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from cloudmodal.server.db import Database
from cloudmodal.server.hub import Hub
from cloudmodal.server.queue import FunctionPolicy, InputQueue, OutputItem
from cloudmodal.spec import RetryPolicy


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    lp = asyncio.new_event_loop()
    t = threading.Thread(target=lp.run_forever, daemon=True)
    t.start()
    try:
        yield lp
    finally:
        lp.call_soon_threadsafe(lp.stop)
        t.join(5)
        lp.close()


def test_later_calls_back_on_the_loop(loop: asyncio.AbstractEventLoop) -> None:
    hub = Hub()
    hub.bind(loop)
    done = threading.Event()
    on: list[bool] = []

    def fn(x: int) -> None:
        on.append(x == 7 and threading.current_thread() is not threading.main_thread())
        done.set()

    hub.later(0.01, fn, 7)
    assert done.wait(10), "the callback never ran"
    assert on == [True]


def test_later_before_the_loop_is_bound_or_after_it_closed_does_nothing() -> None:
    hub = Hub()
    hub.later(0.0, pytest.fail, "ran without a loop")
    lp = asyncio.new_event_loop()
    lp.close()
    hub.bind(lp)
    hub.later(0.0, pytest.fail, "ran on a closed loop")


def test_a_requeued_failure_says_when_it_becomes_claimable(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'q.db'}")
    try:
        retries = RetryPolicy(max_retries=2, initial_delay=3.0, backoff_coefficient=2.0)
        q = InputQueue(db, lambda fid: FunctionPolicy(retries=retries if fid == "fu-retry" else None))
        q.put("fc-1", "fu-retry", [(0, None, b"a", None)])
        q.put("fc-2", "fu-plain", [(0, None, b"b", None)])
        (a,) = q.claim("fu-retry", "ta-1", 1, 30.0, now=100.0)
        (b,) = q.claim("fu-plain", "ta-2", 1, 30.0, now=100.0)
        _, _, retry_at = q.complete_rows("ta-1", [OutputItem(a.input_id, "failure", b"x")], now=200.0)
        assert retry_at == {"fu-retry": 203.0}  # the first retry's delay after the failure was recorded
        _, _, retry_at = q.complete_rows("ta-2", [OutputItem(b.input_id, "failure", b"x")], now=200.0)
        assert retry_at == {}  # no retries left to wait for: a final error, nothing to wake anyone for
    finally:
        db.dispose()
