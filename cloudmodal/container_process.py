"""A process in a sandboxed container (``Sandbox.exec``'s answer, and a sandbox's own command), as Modal's
``ContainerProcess``: ``stdin`` (write, write_eof, drain), ``stdout``/``stderr`` (iterate lines, ``read()``),
``wait()``, ``poll()``, ``returncode``.

Everything goes through the control plane (``/v1/sandboxes/{id}/io``, a WebSocket per stream, so that reading
stdout never waits behind reading stderr); the client never talks to the sandbox's host.

```python
p = sb.exec("python", "-c", "print(input().upper())")
p.stdin.write("hello\\n")
p.stdin.drain()
assert p.stdout.readline() == "HELLO\\n"
assert p.wait() == 0
```
"""

from __future__ import annotations

import functools
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from cloudmodal import exception as exc
from cloudmodal.dict import _athread, _Dual, blocking

__all__ = ["ContainerProcess", "StreamReader", "StreamWriter", "blocking", "static_blocking"]

POLL_S = 20.0  # one long poll's wait (the control plane answers sooner when there is output)


class static_blocking:  # noqa: N801 - used as a decorator
    """A blocking static method with an ``.aio`` twin (``Sandbox.create(...)`` /
    ``await Sandbox.create.aio(...)``), as :class:`cloudmodal.dict.blocking` is for methods."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        functools.update_wrapper(self, fn)  # type: ignore[arg-type]

    def __get__(self, obj: Any, cls: Any = None) -> Any:
        return _Dual(self.fn, _athread(self.fn))


class _Link:
    """One WebSocket to a sandbox's ``io`` route (each stream and the control calls have their own)."""

    def __init__(self, sandbox_id: str) -> None:
        from cloudmodal.client.session import current_session
        from cloudmodal.client.transport import Channel

        self.channel = Channel(current_session().transport, f"/v1/sandboxes/{sandbox_id}/io")
        self.lock = threading.Lock()

    def call(self, **body: Any) -> Any:
        with self.lock:
            return self.channel.call(body)

    def close(self) -> None:
        self.channel.close()


class StreamReader:
    """A process's stdout or stderr: iterate it for lines (``text=True``, the default) or chunks of bytes, or
    ``read()`` it to the end."""

    def __init__(self, sandbox_id: str, proc: int, fd: int, text: bool = True) -> None:
        self._sandbox_id = sandbox_id
        self._proc = proc
        self._fd = fd
        self._text = text
        self._link: _Link | None = None
        self._offset = 0
        self._eof = False
        self._pending = b""  # read but not yet handed out (a partial line)

    def _next_chunk(self) -> bytes:
        """The next bytes the process wrote (b"" at the end)."""
        if self._link is None:
            self._link = _Link(self._sandbox_id)
        while not self._eof:
            r = self._link.call(op="read", proc=self._proc, fd=self._fd, offset=self._offset, timeout=POLL_S)
            self._offset = r["offset"]
            if r["data"]:
                return bytes(r["data"])
            if r["eof"]:
                self._eof = True
        self._link.close()
        return b""

    def _decode(self, data: bytes) -> Any:
        return data.decode(errors="replace") if self._text else data

    @blocking
    def read(self) -> Any:
        """Everything until the process closes the stream."""
        parts = [self._pending]
        self._pending = b""
        while chunk := self._next_chunk():
            parts.append(chunk)
        return self._decode(b"".join(parts))

    @blocking
    def readline(self) -> Any:
        """The next line, with its newline (the last may have none; ``""`` at the end)."""
        while b"\n" not in self._pending:
            chunk = self._next_chunk()
            if not chunk:
                line, self._pending = self._pending, b""
                return self._decode(line)
            self._pending += chunk
        i = self._pending.index(b"\n") + 1
        line, self._pending = self._pending[:i], self._pending[i:]
        return self._decode(line)

    def __iter__(self) -> Iterator[Any]:
        while line := self.readline():
            yield line

    async def __aiter__(self) -> AsyncIterator[Any]:
        """``async for line in p.stdout``: each line read on a thread."""
        while line := await self.readline.aio():
            yield line


class StreamWriter:
    """A process's stdin: ``write`` buffers, ``drain`` sends what is buffered, ``write_eof`` closes the stream
    (at the next ``drain``)."""

    def __init__(self, link: _Link, proc: int) -> None:
        self._link = link
        self._proc = proc
        self._buf = bytearray()
        self._eof = False

    def write(self, data: bytes | bytearray | memoryview | str) -> None:
        if self._eof:
            raise exc.InvalidError("stdin is closed (write_eof was called).")
        self._buf += data.encode() if isinstance(data, str) else bytes(data)

    def write_eof(self) -> None:
        self._eof = True

    @blocking
    def drain(self) -> None:
        while self._buf:
            chunk = bytes(self._buf[: 1 << 20])
            del self._buf[: len(chunk)]
            self._link.call(op="stdin", proc=self._proc, data=chunk, eof=self._eof and not self._buf)
        if self._eof:
            self._link.call(op="stdin", proc=self._proc, eof=True)


class ContainerProcess:
    """A process in a sandbox: its streams and exit code."""

    def __init__(self, sandbox_id: str, proc: int, *, text: bool = True) -> None:
        self._sandbox_id = sandbox_id
        self._proc = proc
        self._link = _Link(sandbox_id)
        self._returncode: int | None = None
        self.stdin = StreamWriter(self._link, proc)
        self.stdout = StreamReader(sandbox_id, proc, 1, text)
        self.stderr = StreamReader(sandbox_id, proc, 2, text)

    @property
    def returncode(self) -> int | None:
        """The exit code once the process has exited (None before; minus the signal's number when one
        killed it), as ``poll()`` last saw it."""
        return self._returncode

    @blocking
    def poll(self) -> int | None:
        """The exit code if the process has exited, else None (does not wait)."""
        if self._returncode is None:
            self._returncode = self._link.call(op="poll", proc=self._proc)["returncode"]
        return self._returncode

    @blocking
    def wait(self) -> int:
        """Wait for the process to exit; its exit code."""
        while self._returncode is None:
            self._returncode = self._link.call(op="wait", proc=self._proc, timeout=POLL_S)["returncode"]
        self._link.close()  # its WebSocket: a later call opens another
        return self._returncode

    def __repr__(self) -> str:
        return f"ContainerProcess({self._sandbox_id}, {self._proc})"
