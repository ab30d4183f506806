"""The web tunnel's framing (cloudmodal/_web_tunnel.py): frames sent in one turn of the event loop leave as one
message, in order; large bodies are never packed together past MESSAGE_BYTES; a message decodes to its frames
whichever form it has; flow-control windows block at their size and wake on credit."""

from __future__ import annotations

import asyncio

import msgpack
import pytest

from cloudmodal import _web_tunnel as wt


def test_frames_of_reads_a_frame_or_a_list_of_frames() -> None:
    one = [wt.DATA, 3, b"x", False]
    assert list(wt.frames_of(msgpack.packb(one))) == [one]
    many = [[wt.CREDIT, 1, 10], [wt.DATA, 2, b"", True]]
    assert list(wt.frames_of(msgpack.packb(many))) == many


def test_batches_stop_at_the_message_size() -> None:
    big = wt.MESSAGE_BYTES // 2 + 1
    queued = [([wt.DATA, i, b"", True], big) for i in range(3)] + [([wt.CREDIT, 9, 1], 0)]
    batches = list(wt._batches(queued))
    assert [[f[1] for f in b] for b in batches] == [[0], [1], [2, 9]]
    alone = [([wt.DATA, 1, b"", False], wt.MESSAGE_BYTES * 3)]
    assert len(list(wt._batches(alone))) == 1  # a frame larger than the limit goes alone


def test_an_outbox_sends_one_turns_frames_as_one_message_in_order() -> None:
    async def go() -> list[bytes]:
        written: list[bytes] = []

        async def write(data: bytes) -> None:
            written.append(data)

        box = wt.Outbox(write)
        for i in range(3):
            await box.send([wt.CREDIT, i, 1])
        for _ in range(3):
            await asyncio.sleep(0)
        await box.send([wt.CREDIT, 9, 1])  # a later turn: a message of its own
        for _ in range(3):
            await asyncio.sleep(0)
        box.close()
        return written

    written = asyncio.run(go())
    assert [[f[1] for f in wt.frames_of(m)] for m in written] == [[0, 1, 2], [9]]


def test_an_outbox_whose_socket_failed_refuses_frames() -> None:
    async def go() -> None:
        closed: list[bool] = []

        async def write(data: bytes) -> None:
            raise ConnectionResetError

        box = wt.Outbox(write, on_close=lambda: closed.append(True))
        await box.send([wt.CREDIT, 1, 1])
        for _ in range(3):
            await asyncio.sleep(0)
        assert box.closed and closed == [True]
        with pytest.raises(wt.StreamClosed):
            await box.send([wt.CREDIT, 2, 1])

    asyncio.run(go())


def test_a_window_blocks_at_its_size_and_wakes_on_credit() -> None:
    async def go() -> None:
        w = wt.Window(10)
        await w.take(10)
        blocked = asyncio.ensure_future(w.take(1))
        await asyncio.sleep(0)
        assert not blocked.done()
        w.give(5)
        await asyncio.wait_for(blocked, 5)
        w.close()
        w2 = wt.Window(1)
        await w2.take(1)
        waiting = asyncio.ensure_future(w2.take(1))
        await asyncio.sleep(0)
        w2.close()
        with pytest.raises(wt.StreamClosed):
            await waiting

    asyncio.run(go())
