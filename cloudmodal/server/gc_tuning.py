"""Garbage collection for a process that is a control-plane server.

A control plane serving many workers keeps a large heap of long-lived objects (the libraries' own, each
worker's connection and parked claim) and makes many short-lived ones per request. CPython's cycle collector
at its defaults collects the youngest generation every 700 allocations and, in each full collection, scans
the whole heap: on ``bench/scale.py`` with 1,000 workers that was 22 full collections of up to 267 ms each,
5.3 s of collection in all, and those pauses were the tail of the put → claim latency. Here:

- what startup made is frozen (``gc.freeze``): it lives as long as the process, so no collection scans it;
- the youngest generation is collected every 10,000 allocations: a request's garbage is freed by reference
  counting, and the little that forms cycles waits a little longer;
- the survivors of a full collection are frozen too, so the next full collection scans only newer objects;
- once every ``thaw_s`` the frozen objects go back to the collector after a full collection, so that the next
  one reclaims cyclic garbage among them (a closed connection's objects, say): one long pause then, instead of
  one in every full collection.

Only for ``cloudmodal server start``: a control plane embedded in a user's program leaves that program's
collector alone.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from typing import Any

THRESHOLD0 = 10_000
THAW_S = 600.0


class ServerGC:
    def __init__(self, thaw_s: float = THAW_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.thaw_s = thaw_s
        self.clock = clock
        self.thawed_at = clock()
        self._saved: tuple[int, int, int] | None = None

    def install(self) -> None:
        if self._saved is not None:
            return
        self._saved = gc.get_threshold()
        gc.collect()
        gc.freeze()
        gc.set_threshold(THRESHOLD0, self._saved[1], self._saved[2])
        gc.callbacks.append(self._after_collection)

    def uninstall(self) -> None:
        """The collector as it was, with everything frozen returned to it."""
        if self._saved is None:
            return
        gc.callbacks.remove(self._after_collection)
        gc.set_threshold(*self._saved)
        gc.unfreeze()
        self._saved = None

    def _after_collection(self, phase: str, info: dict[str, Any]) -> None:
        if phase != "stop" or info.get("generation") != 2:
            return
        if self.clock() - self.thawed_at >= self.thaw_s:
            gc.unfreeze()  # the next full collection scans everything once
            self.thawed_at = self.clock()
        else:
            gc.freeze()


__all__ = ["ServerGC", "THAW_S", "THRESHOLD0"]
