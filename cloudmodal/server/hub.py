"""Wake-ups for long polls: a writer on any thread notifies a key; async waiters on the loop wake at once.

Within one control-plane process this turns polling into push. Several processes sharing one PostgreSQL
still work: waiters also wake on their own timeout and re-read the database.
"""

from __future__ import annotations

import asyncio
import threading
from collections import defaultdict
from collections.abc import Callable


class Hub:
    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiters: dict[str, set[asyncio.Event]] = defaultdict(set)
        self._lock = threading.Lock()
        self.closing = False  # the server is stopping: long polls answer now with what they have

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def notify(self, *keys: str) -> None:
        with self._lock:
            events = [e for k in keys for e in self._waiters.get(k, ())]
        self._wake(events)

    def _wake(self, events: list[asyncio.Event]) -> None:
        """Set ``events`` on the server's loop (from any thread)."""
        loop = self._loop
        if events and loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(_set_all, events)
            except RuntimeError:
                pass

    def later(self, delay_s: float, fn: Callable[..., object], *args: object) -> None:
        """Call ``fn(*args)`` on the server's loop in ``delay_s`` seconds (from any thread); nothing before the
        loop is bound or after it is closed."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(loop.call_later, max(0.0, delay_s), fn, *args)
        except RuntimeError:
            pass

    def watch(self, key: str, ev: asyncio.Event | None = None) -> asyncio.Event:
        """Register an event (new, or one already watching other keys) to be set when ``key`` is notified."""
        ev = ev or asyncio.Event()
        with self._lock:
            self._waiters[key].add(ev)
        return ev

    def close(self) -> None:
        """Wake every waiter for good: the server is stopping, and a long poll should not hold its shutdown
        (its client retries against the next server, or has gone away itself)."""
        self.closing = True
        with self._lock:
            events = [e for s in self._waiters.values() for e in s]
        self._wake(events)

    def unwatch(self, key: str, ev: asyncio.Event) -> None:
        with self._lock:
            s = self._waiters.get(key)
            if s is not None:
                s.discard(ev)
                if not s:
                    del self._waiters[key]


def _set_all(events: list[asyncio.Event]) -> None:
    for e in events:
        e.set()
