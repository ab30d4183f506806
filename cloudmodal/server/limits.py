"""Limits at the control plane's HTTP edge: what a request may contain, and how much memory and time of the
server it may hold.

- **Values.** Constrained types for the request models (ids, names, file names, integers that fit the
  database's columns, finite floats) and the rules for path and query parameters, so that bad input is a 4xx
  naming the field before anything reaches the database.
- **Bodies.** msgpack bodies are unpacked with explicit limits (lengths, nesting, element count); the bytes
  buffered for bodies in flight share one process-wide :class:`BodyBudget`.
- **Time.** :func:`http_protocol` closes connections whose request headers do not arrive in time (uvicorn's
  protocol, below Starlette); a body that stalls is answered 408 where it is read
  (:mod:`cloudmodal.server.http_body`); both are set by :class:`EdgeLimits`.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from typing import Annotated, Any

import msgpack
from pydantic import AfterValidator, Field, StringConstraints, ValidationError

INT64_MAX = 2**63 - 1
INT32_MAX = 2**31 - 1  # PostgreSQL INTEGER columns (input index, generator index, pid, counters)

# -- ids and names ------------------------------------------------------------------------------------------
# Ids are made by ``cloudmodal.ids.new_id`` ("fc-" + 22 letters and digits); the pattern leaves room for other
# prefixes and separators but not for path tricks: no "/", no NUL, no leading dot ("." and ".." included).
ID_CHARS = r"[A-Za-z0-9_:-][A-Za-z0-9._:-]{0,127}"
ID_PATTERN = rf"^{ID_CHARS}$"
BLOB_ID_CHARS = r"bl-[0-9a-f]{40}"  # content address: sha256 prefix (see blobs.BlobStore)
BLOB_ID_PATTERN = rf"^{BLOB_ID_CHARS}$"
APP_NAME_PATTERN = r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}$"
# A function's name: "f", "Cls", "Cls(3f2a...)" for a parameterized instance; no control characters, no slashes.
NAME_PATTERN = r"^[^\x00-\x1f\x7f/\\]{1,256}$"
MODULE_PATTERN = r"^(?:[\w-]+(?:\.[\w-]+)*)?$"  # a dotted module path, or "" (parts may be script stems)
ENV_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]{0,255}$"
NO_NUL_PATTERN = r"^[^\x00]*$"

_ID_RE = re.compile(ID_CHARS)
_BLOB_ID_RE = re.compile(BLOB_ID_CHARS)

# What each pattern means, for error messages (pydantic would print the regular expression).
PATTERN_MEANING = {
    ID_PATTERN: "an id: 1-128 characters from A-Z a-z 0-9 . _ : -, not starting with '.'",
    BLOB_ID_PATTERN: "a blob id: 'bl-' and 40 lowercase hex digits, as POST /v1/blobs answers",
    APP_NAME_PATTERN: "an app name: 1-64 characters from A-Z a-z 0-9 . _ -, not starting with '.'",
    NAME_PATTERN: "a name: 1-256 characters, no control characters, '/' or '\\'",
    MODULE_PATTERN: "a dotted module path such as 'pkg.mod', or ''",
    ENV_NAME_PATTERN: "an environment variable name: letters, digits and '_', not starting with a digit",
    NO_NUL_PATTERN: "text without NUL characters",
}


def _plain_file_name(v: str) -> str:
    if v in (".", ".."):
        raise ValueError("must be a file name, not '.' or '..'")
    return v


Id = Annotated[str, StringConstraints(pattern=ID_PATTERN)]
BlobId = Annotated[str, StringConstraints(pattern=BLOB_ID_PATTERN)]
AppName = Annotated[str, StringConstraints(pattern=APP_NAME_PATTERN)]
Name = Annotated[str, StringConstraints(pattern=NAME_PATTERN)]
FileName = Annotated[
    str,
    StringConstraints(min_length=1, max_length=255, pattern=r"^[^\x00/\\]+$"),
    AfterValidator(_plain_file_name),
]
ModulePath = Annotated[str, StringConstraints(max_length=255, pattern=MODULE_PATTERN)]


def _identifier(v: str) -> str:
    if not v.isidentifier():
        raise ValueError("should be a method name (a Python identifier)")
    return v


# str.isidentifier, not a pattern: a Unicode identifier regex costs pydantic ~10 ms to compile per use, paid on
# every control plane's start (a cold `cloudmodal run` included)
MethodName = Annotated[str, StringConstraints(max_length=128), AfterValidator(_identifier)]
EnvName = Annotated[str, StringConstraints(pattern=ENV_NAME_PATTERN)]
# Texts without NUL (PostgreSQL text cannot hold it), by length.
ShortText = Annotated[str, StringConstraints(max_length=255, pattern=NO_NUL_PATTERN)]
Text = Annotated[str, StringConstraints(max_length=4096, pattern=NO_NUL_PATTERN)]
EnvValue = Annotated[str, StringConstraints(max_length=64 * 1024, pattern=NO_NUL_PATTERN)]
Int64 = Annotated[int, Field(ge=-INT64_MAX - 1, le=INT64_MAX)]
# A row id, or a cursor over them: INTEGER (32-bit) on PostgreSQL, which casts parameters to the column type.
RowId = Annotated[int, Field(ge=0, le=INT32_MAX)]
Int32 = Annotated[int, Field(ge=0, le=INT32_MAX)]
Seconds = Annotated[float, Field(ge=0, le=86400, allow_inf_nan=False)]
Timestamp = Annotated[float, Field(ge=0, le=1e11, allow_inf_nan=False)]  # Unix time
MAX_SPEC_DEPTH = 32


def bounded_depth(limit: int = MAX_SPEC_DEPTH) -> Any:
    """A validator refusing values nested deeper than ``limit`` (JSON columns and encoders recurse)."""

    def check(v: Any) -> Any:
        stack = [(v, 1)]
        while stack:
            item, depth = stack.pop()
            if depth > limit:
                raise ValueError(f"is nested more than {limit} levels deep")
            if isinstance(item, dict):
                stack.extend((x, depth + 1) for x in item.values())
            elif isinstance(item, list | tuple):
                stack.extend((x, depth + 1) for x in item)
        return v

    return AfterValidator(check)


# Query parameters with a conventional meaning across routes, bounded unless the handler declares its own
# bounds with ``Annotated[int, Field(ge=..., le=...)]``.
QUERY_BOUNDS: dict[str, tuple[float, float]] = {
    "limit": (1, 10_000),
    "after": (0, INT32_MAX),  # a row id (see RowId)
    "timeout": (0.0, 3600.0),
}
MAX_QUERY_STR = 256


def path_param_error(name: str, value: str) -> str | None:
    """Why ``value`` cannot be path parameter ``name`` (an id, a name, or a blob id), or None."""
    if name == "blob_id":
        if _BLOB_ID_RE.fullmatch(value):
            return None
        meaning = PATTERN_MEANING[BLOB_ID_PATTERN]
    else:
        if _ID_RE.fullmatch(value):
            return None
        meaning = PATTERN_MEANING[ID_PATTERN]
    return f"Invalid {name} {short(value)}: expected {meaning}."


def short(value: Any, limit: int = 60) -> str:
    """``repr(value)``, cut to ``limit`` characters: error messages never echo a huge input back."""
    r = repr(value)
    return r if len(r) <= limit else r[: limit - 5] + "...'" + f" ({len(value)} chars)"


def describe(e: ValidationError, limit: int = 5) -> str:
    """A validation error as ``field.path: problem; ...``, without the offending values."""
    parts = []
    for err in e.errors(include_url=False, include_input=False)[:limit]:
        loc = ".".join(str(x) for x in err["loc"]) or "body"
        msg = err["msg"]
        pattern = (err.get("ctx") or {}).get("pattern")
        if pattern in PATTERN_MEANING:
            msg = f"should be {PATTERN_MEANING[pattern]}"
        parts.append(f"{loc}: {msg}")
    more = e.error_count() - limit
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


# -- msgpack -------------------------------------------------------------------------------------------------
SMALL_BODY = 64 * 1024  # small bodies decode to little whatever they hold
MAX_CONTAINER_LEN = 100_000  # elements of one array or map
MAX_ITEMS = 500_000  # elements of all arrays and maps of one body: bounds what a body decodes to


class BodyError(ValueError):
    pass


def unpack(raw: bytes | bytearray | memoryview) -> Any:
    """A msgpack body, with limits: one msgpack byte can decode to a 56-byte empty list, so a large body is
    also limited in the number of elements it holds. Nesting is limited by msgpack itself (1,024 levels) and
    by the models; lengths declared in the body cannot exceed its size."""
    n = len(raw)
    limits: dict[str, Any] = dict(
        raw=False,
        max_str_len=n,
        max_bin_len=n,
        max_array_len=min(n, MAX_CONTAINER_LEN),
        max_map_len=min(n, MAX_CONTAINER_LEN),
        max_ext_len=0,  # the protocol has no extension types
    )
    if n <= SMALL_BODY:
        return msgpack.unpackb(raw, **limits)
    count = 0

    def counted(x: Any) -> Any:
        nonlocal count
        count += len(x) + 1
        if count > MAX_ITEMS:
            raise BodyError(f"the body holds more than {MAX_ITEMS} elements")
        return x

    return msgpack.unpackb(raw, list_hook=counted, object_hook=counted, **limits)


# -- memory --------------------------------------------------------------------------------------------------
class BodyBudget:
    """Bytes of request bodies the process holds at once (buffered, then decoded while their handler runs).

    A body takes its share before it is read (its declared length, or step by step for a chunked one) and gives
    it back when its request is answered, so N concurrent maximum-size bodies wait for each other instead of
    multiplying memory. A body larger than the whole budget may still run when no other body holds any. Used
    from the serving event loop only."""

    def __init__(self, capacity: int, wait_s: float) -> None:
        self.capacity = capacity
        self.wait_s = wait_s
        self.used = 0
        self._waiters: list[asyncio.Future[None]] = []

    def _fits(self, n: int, own: int) -> bool:
        return self.used + n <= self.capacity or self.used == own

    def try_take(self, n: int, own: int = 0) -> bool:
        """Take ``n`` bytes now if there is room; ``own``: what the caller holds already."""
        if self._fits(n, own):
            self.used += n
            return True
        return False

    async def take(self, n: int, own: int = 0) -> None:
        """Take ``n`` more bytes for a body already holding ``own``, waiting up to ``wait_s`` for room;
        TimeoutError when there is none."""
        if self.try_take(n, own):
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait_s
        while not self._fits(n, own):
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError
            fut: asyncio.Future[None] = loop.create_future()
            self._waiters.append(fut)
            try:
                async with asyncio.timeout(remaining):
                    await fut
            except TimeoutError:
                pass
            finally:
                if fut in self._waiters:
                    self._waiters.remove(fut)
        self.used += n

    def give(self, n: int) -> None:
        self.used -= n
        waiters, self._waiters = self._waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)


# -- settings ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EdgeLimits:
    """Time and memory limits for HTTP clients; each from its environment variable."""

    header_timeout_s: float = 15.0  # CLOUDMODAL_HEADER_TIMEOUT_S: request line and headers -> closed
    body_timeout_s: float = 30.0  # CLOUDMODAL_BODY_TIMEOUT_S: longest pause between parts of a body -> 408
    body_budget_bytes: int = 256 * 1024 * 1024  # CLOUDMODAL_BODY_BUDGET_BYTES: see BodyBudget
    budget_wait_s: float = 5.0  # CLOUDMODAL_BODY_BUDGET_WAIT_S: a body's wait for room in the budget -> 503
    max_header_bytes: int = 64 * 1024  # request line and headers -> 431

    @classmethod
    def from_env(cls) -> EdgeLimits:
        from cloudmodal.settings import settings

        s = settings()  # the ranges are checked there, with an error naming the variable
        return cls(
            header_timeout_s=s.header_timeout_s,
            body_timeout_s=s.body_timeout_s,
            body_budget_bytes=s.body_budget_bytes,
            budget_wait_s=s.body_budget_wait_s,
        )


# -- slow clients --------------------------------------------------------------------------------------------
def http_protocol(limits: EdgeLimits) -> Any:
    """uvicorn's httptools protocol, also closing a connection whose request line and headers do not arrive
    within ``limits.header_timeout_s`` of its first byte (or of the connection, for its first request), and
    answering 431 to headers over ``limits.max_header_bytes``; keep-alive between requests is unchanged.
    ``"auto"`` where httptools is missing (h11 bounds header size itself, but no header timeout then)."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:  # pragma: no cover - uvicorn[standard] brings httptools
        return "auto"

    class GuardedHttpProtocol(HttpToolsProtocol):
        header_timeout_s = limits.header_timeout_s
        max_header_bytes = limits.max_header_bytes

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._header_timer: asyncio.TimerHandle | None = None
            self._header_bytes = 0
            self._started = False  # a request has begun on this connection
            self._too_large = False

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._started = True
            self._header_bytes = 0
            if self._header_timer is None:
                self._arm()

        def on_url(self, url: bytes) -> None:
            self._count(len(url))
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._count(len(name) + len(value) + 4)
            super().on_header(name, value)

        def on_headers_complete(self) -> None:
            self._disarm()
            super().on_headers_complete()

        def _count(self, n: int) -> None:
            self._header_bytes += n
            if self._header_bytes > self.max_header_bytes:
                self._too_large = True
                raise BodyError("request headers too large")  # the parser answers it with send_400_response

        def send_400_response(self, msg: str) -> None:
            if not self._too_large:
                return super().send_400_response(msg)
            self._reply_and_close(431, f"Request line and headers are over {self.max_header_bytes} bytes.")

        def _arm(self) -> None:
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_timed_out)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_timed_out(self) -> None:
            self._header_timer = None
            if self.transport.is_closing():
                return
            if self.cycle is not None and not self.cycle.response_complete:
                # a pipelined request waiting behind a response in progress: give it time after that one
                self._arm()
                return
            if not self._started:
                self.transport.close()  # connected and never said anything
                return
            self._reply_and_close(
                408, f"Request headers did not arrive within {self.header_timeout_s:g} s; closing."
            )

        def _reply_and_close(self, status: int, msg: str) -> None:
            reason = {408: b"Request Timeout", 431: b"Request Header Fields Too Large"}[status]
            body = msg.encode()
            self.transport.write(
                b"HTTP/1.1 %d %s\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: %d\r\n"
                b"connection: close\r\n\r\n%s" % (status, reason, len(body), body)
            )
            self.transport.close()

    return GuardedHttpProtocol
