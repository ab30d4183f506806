"""Request bodies at the control plane's HTTP edge: read within their caps, their time and the process-wide
:class:`~cloudmodal.server.limits.BodyBudget`, then validated against the route's msgpack model.

- :func:`read_body`: a whole body into one buffer (413 over the cap, from Content-Length before a byte is
  read; 408 when the client stalls; 503 with Retry-After when the budget has no room in time).
- :class:`BodyStream`: a raw body handed to its handler as it arrives (blob uploads).
- :func:`validate`: msgpack bytes into the route's pydantic model (400 naming the fields).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TypeVar

from pydantic import BaseModel, ValidationError
from starlette.datastructures import Headers
from starlette.requests import ClientDisconnect
from starlette.types import Message, Receive

from cloudmodal import exception as exc
from cloudmodal.server.http_errors import HTTPError
from cloudmodal.server.limits import SMALL_BODY, BodyBudget, describe, short, unpack

M = TypeVar("M", bound=BaseModel)


def validate(raw: bytes | bytearray | memoryview, model: type[M]) -> M:
    """A msgpack body into its model; an empty body is ``{}``. 400 for malformed msgpack (also one nested
    too deep or declaring more than it holds) and for values the model refuses, naming the fields."""
    try:
        data = unpack(raw) if raw else {}
    except Exception as e:  # malformed msgpack: ExtraData, FormatError, StackError, ValueError, ...
        raise exc.InvalidError(
            f"Bad request body: not valid msgpack for this route ({type(e).__name__}: {short(str(e), 200)})."
        ) from None
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise exc.InvalidError(f"Bad request body: {describe(e)}") from None


def check_length(headers: Headers, limit: int) -> int | None:
    """The request's Content-Length (None when chunked); 413 before reading a body declared over ``limit``."""
    value = headers.get("content-length")
    if value is None:
        return None
    try:
        declared = int(value)
    except ValueError:
        raise HTTPError(400, "Content-Length is not a number.") from None
    if declared > limit:
        raise exc.RequestSizeError(f"Request body of {declared} bytes is over the {limit} byte limit.")
    return declared


async def receive_within(receive: Receive, idle_s: float) -> Message:
    """The next part of a request body; 408 (closing the connection) when none comes within ``idle_s``,
    :class:`~starlette.requests.ClientDisconnect` when the client has gone."""
    try:
        async with asyncio.timeout(idle_s):
            message = await receive()
    except TimeoutError:
        raise HTTPError(
            408, f"The request body stalled: nothing arrived for {idle_s:g} s.", {"connection": "close"}
        ) from None
    if message["type"] == "http.disconnect":
        raise ClientDisconnect
    return message


class BodyStream:
    """A raw request body as it arrives: ``async for chunk in body``. At most ``limit`` bytes (413 beyond);
    a pause longer than ``idle_s`` between parts answers 408."""

    def __init__(self, receive: Receive, limit: int, idle_s: float) -> None:
        self._receive = receive
        self.limit = limit
        self.idle_s = idle_s
        self.size = 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        more = True
        while more:
            message = await receive_within(self._receive, self.idle_s)
            chunk = message.get("body", b"")
            self.size += len(chunk)
            if self.size > self.limit:
                raise exc.RequestSizeError(f"Request body over the {self.limit} byte limit.")
            more = message.get("more_body", False)
            if chunk:
                yield chunk


async def _take(budget: BodyBudget, n: int, own: int = 0) -> None:
    try:
        await budget.take(n, own)
    except TimeoutError:
        raise HTTPError(
            503,
            "The control plane is receiving too many large request bodies at once; retry in a moment.",
            {"retry-after": "1"},
        ) from None


async def read_body(
    receive: Receive, headers: Headers, limit: int, budget: BodyBudget, idle_s: float
) -> tuple[bytes | bytearray, int]:
    """The request's body, at most ``limit`` bytes, and the bytes of ``budget`` it took (the caller gives
    them back once the request is answered). One buffer, sized from Content-Length where there is one; the
    whole body in one message (small bodies) is used as it comes."""
    declared = check_length(headers, limit)
    held = 0
    try:
        if declared is not None and declared > SMALL_BODY:
            await _take(budget, declared)
            held = declared
        buf: bytearray | None = None
        size = 0
        more = True
        while more:
            message = await receive_within(receive, idle_s)
            chunk = message.get("body", b"")
            more = message.get("more_body", False)
            if buf is None and not more:
                if len(chunk) > limit:
                    raise exc.RequestSizeError(f"Request body over the {limit} byte limit.")
                return chunk, held
            end = size + len(chunk)
            if end > limit:
                raise exc.RequestSizeError(f"Request body over the {limit} byte limit.")
            if end > held and end > SMALL_BODY:  # a chunked body growing: take its share as it grows
                step = min(max(end, 2 * held), limit) - held
                await _take(budget, step, held)
                held += step
            if buf is None:
                buf = bytearray(declared) if declared is not None else bytearray()
            if declared is not None:
                buf[size:end] = chunk
            else:
                buf += chunk
            size = end
        return (buf if buf is not None else b""), held
    except BaseException:
        if held:
            budget.give(held)
        raise
