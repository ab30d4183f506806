"""The web tunnel's wire protocol: how the control plane hands HTTP requests and WebSockets to a web worker
over the one WebSocket the worker dialled (``/v1/workers/{id}/web``), so that a worker behind NAT serves as
one on this machine does.

Each WebSocket message is one msgpack-encoded frame, a list whose first item is its kind and second the
stream (one request, or one client WebSocket) it belongs to. Streams are numbered by the control plane.

Control plane → worker::

    [REQUEST, sid, target, scope, body, more]   a request: its ASGI scope (wire form), the first body part
    [DATA, sid, body, more]                     more of the request body
    [CANCEL, sid]                               the client went away: stop the handler

Worker → control plane::

    [RESPONSE, sid, status, headers, body, more]  the response's start and its first body part
    [DATA, sid, body, more]                       more of the response body
    [ERROR, sid, message]                         the handler failed before answering
    [WS_ACCEPT, sid, subprotocol, headers]        the app accepted a WebSocket
    [DRAINING, 0]                                 the worker stops: send it no new requests

Both ways: ``[CREDIT, sid, n]`` (n body bytes were consumed: the sender may send n more),
``[WS_MESSAGE, sid, data]`` and ``[WS_CLOSE, sid, code, reason]``.

Frames sent in one turn of a side's event loop travel together, as one message holding a list of frames
(:class:`Outbox`): under load one WebSocket message (one system call, one frame header, one mask) carries
many requests' frames, and a lone frame still leaves in the turn it was sent.

Flow control is per stream and per direction, as HTTP/2 does it: a sender has at most :data:`WINDOW` bytes
of body (or WebSocket messages) that the other side has not consumed yet, and waits for credit beyond that.
A 100 MB upload therefore crosses with at most a window of it in the control plane's memory, however slowly
the worker's app reads it, and a slow client never makes the worker buffer a whole response.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import msgpack

REQUEST = 1
DATA = 2
CREDIT = 3
CANCEL = 4
WS_MESSAGE = 5
WS_CLOSE = 6
RESPONSE = 7
WS_ACCEPT = 8
ERROR = 9
DRAINING = 10

WINDOW = 1 << 20  # unconsumed bytes a sender may have in flight on one stream, each way
CHUNK = 256 * 1024  # the largest body part one frame carries

# Hop-by-hop headers (RFC 9110 7.6.1) are the proxy's own; they are never forwarded either way.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)


class StreamClosed(Exception):
    """The stream ended (its tunnel broke, or the other side cancelled it) while something waited on it."""


class Window:
    """One direction of one stream's flow control: :meth:`take` before sending ``n`` bytes, :meth:`give`
    when the peer says it consumed them."""

    __slots__ = ("_closed", "_event", "size", "unacked")

    def __init__(self, size: int = WINDOW) -> None:
        self.size = size
        self.unacked = 0
        self._event: asyncio.Event | None = None
        self._closed = False

    async def take(self, n: int) -> None:
        while self.unacked >= self.size and not self._closed:
            if self._event is None:
                self._event = asyncio.Event()
            self._event.clear()
            await self._event.wait()
        if self._closed:
            raise StreamClosed
        self.unacked += n

    def give(self, n: int) -> None:
        self.unacked = max(0, self.unacked - n)
        if self._event is not None and self.unacked < self.size:
            self._event.set()

    def close(self) -> None:
        self._closed = True
        if self._event is not None:
            self._event.set()


def wire_headers(headers: Any) -> list[list[bytes]]:
    """ASGI headers without the hop-by-hop ones, as msgpack carries them."""
    return [[k, v] for k, v in headers if k.lower() not in HOP_BY_HOP]


def chunks(body: bytes) -> list[bytes]:
    """``body`` in parts of at most :data:`CHUNK` bytes (one empty part for an empty body)."""
    if len(body) <= CHUNK:
        return [body]
    return [body[i : i + CHUNK] for i in range(0, len(body), CHUNK)]


OUTBOX_HIGH_WATER = 4 << 20  # bytes of frames queued before a sender waits for the writer
# A message's body bytes, at most (a lone larger frame goes alone): packing and framing one message of several
# MiB costs ten times more per byte than messages of a few hundred KiB (large buffers' allocation)
MESSAGE_BYTES = 256 * 1024


def _batches(queued: list[tuple[list[Any], int]]) -> Iterator[list[list[Any]]]:
    batch: list[list[Any]] = []
    size = 0
    for frame, n in queued:
        if batch and size + n > MESSAGE_BYTES:
            yield batch
            batch, size = [], 0
        batch.append(frame)
        size += n
    if batch:
        yield batch


def frames_of(message: bytes) -> Iterator[list[Any]]:
    """The frames of one WebSocket message: a frame (``[kind, ...]``) or a list of frames."""
    obj = msgpack.unpackb(message, raw=False)
    if obj and isinstance(obj[0], list):
        yield from obj
    else:
        yield obj


class Outbox:
    """One WebSocket's sending side: :meth:`send` queues a frame, and one writer task sends what queued up
    during a turn of the event loop as one message, in order. ``write`` is the socket's send coroutine; when it
    fails, the outbox is closed and ``on_close`` is called."""

    def __init__(
        self, write: Callable[[bytes], Awaitable[None]], on_close: Callable[[], None] | None = None
    ) -> None:
        self._write = write
        self._on_close = on_close
        self._frames: list[tuple[list[Any], int]] = []  # (frame, its body's bytes)
        self._bytes = 0
        self._wake = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self.closed = False
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def send(self, frame: list[Any]) -> None:
        if self.closed:
            raise StreamClosed
        size = sum(len(x) for x in frame if isinstance(x, bytes | str))
        self._frames.append((frame, size))
        self._bytes += size
        self._wake.set()
        if self._bytes > OUTBOX_HIGH_WATER:
            self._room.clear()
            await self._room.wait()
            if self.closed:
                raise StreamClosed

    async def _run(self) -> None:
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                queued, self._frames, self._bytes = self._frames, [], 0
                self._room.set()
                for batch in _batches(queued):
                    await self._write(
                        msgpack.packb(batch[0] if len(batch) == 1 else batch, use_bin_type=True)
                    )
        except asyncio.CancelledError:
            raise
        except Exception:
            pass
        finally:
            self.closed = True
            self._room.set()
            if self._on_close is not None:
                self._on_close()

    def close(self) -> None:
        self.closed = True
        self._task.cancel()
