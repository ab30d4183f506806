"""``cloudmodal.Queue``: a distributed FIFO queue with partitions, Modal's ``modal.queue.Queue`` API on the
control plane's database.

```python
q = cloudmodal.Queue.from_name("jobs", create_if_missing=True)
q.put({"job": 1})
q.put_many([2, 3], partition="fast")
job = q.get(timeout=10)  # queue.Empty after 10 s without an item
batch = q.get_many(100, partition="fast", block=False)
```

Values are pickled with cloudpickle on the client; the control plane stores bytes. Each value is handed to
exactly one ``get``; within a partition, values come out in the order they went in. Blocking ``get``/``put``
long-poll the control plane (up to 50 s a request, repeated for longer timeouts); ``queue.Empty`` and
``queue.Full`` are the standard library's, as in Modal.

Limits (Modal's): a queue has at most 100,000 partitions; a partition holds at most 5,000 items and 64 MiB;
an item pickles to at most 1 MiB; a partition key is 1-64 characters; a partition's items are deleted
``partition_ttl`` seconds (default and most: 24 h) after its last put. A put that does not fit stores nothing
of itself and raises (``queue.Full`` when other items fill the partition, ``RequestSizeError`` or
``InvalidError`` for what could never fit); nothing already stored is lost.

Each put and get is one transaction, and happens once even when it is sent again: a request whose answer was
lost with its connection (the control plane restarted after committing it) is retried by the client's transport
with the id it was first sent with, and the control plane answers what it recorded for that id (a put stores
its values once; a get returns the values it took, and they are handed to no one else). The recorded answers
are kept 10 minutes, longer than the client keeps retrying one request.
"""

from __future__ import annotations

import queue as _stdlib_queue
import time
from collections.abc import Iterator
from typing import Any

from cloudmodal.dict import _dumps, _StoredObject, blocking, iterating, request_id
from cloudmodal.exception import InvalidError, RequestSizeError

MAX_PARTITIONS = 100_000
MAX_PARTITION_ITEMS = 5_000
MAX_PARTITION_BYTES = 64 * 1024 * 1024
MAX_QUEUE_ITEM = 1024 * 1024
MAX_TTL_S = 86400.0
DEFAULT_TTL_S = 86400
MAX_POLL_S = 50.0  # the longest one request waits on the control plane
PEEK_PAGE = 1000

Empty = _stdlib_queue.Empty
Full = _stdlib_queue.Full


def _loads(data: bytes) -> Any:
    from cloudmodal.serialization import deserialize

    return deserialize(data, "queue item")


class Queue(_StoredObject):
    """A distributed queue (see the module's docstring for partitions, blocking and limits)."""

    _label = "Queue"
    _route = "/v1/queues"
    _prefix = "qu"

    @staticmethod
    def validate_partition_key(partition: str | None) -> bytes:
        """The partition key as sent (``b""`` for the default partition); InvalidError unless 1-64 chars."""
        if partition is None:
            return b""
        if not isinstance(partition, str) or not 1 <= len(partition) <= 64:
            raise InvalidError(
                f"Invalid partition key {partition!r}: a partition key is a string of 1 to 64 characters "
                "(or None for the default partition)."
            )
        return partition.encode()

    @staticmethod
    def _partition(partition: str | None) -> str:
        Queue.validate_partition_key(partition)
        return partition or ""

    # -- put ------------------------------------------------------------------------------------------------
    def _put(
        self,
        values: list[Any],
        block: bool,
        timeout: float | None,
        partition: str | None,
        partition_ttl: int,
    ) -> None:
        part = self._partition(partition)
        data = [_dumps(v) for v in values]
        for d in data:
            if len(d) > MAX_QUEUE_ITEM:
                raise RequestSizeError(
                    f"A queue item pickles to {len(d):,} bytes, over the limit of {MAX_QUEUE_ITEM:,} (1 MiB). "
                    "Store large data in a Volume or a Dict and put a reference in the queue. Nothing was stored."
                )
        if len(data) > MAX_PARTITION_ITEMS:
            raise InvalidError(
                f"put_many of {len(data):,} values: a partition holds at most {MAX_PARTITION_ITEMS:,} items. "
                "Put them in smaller batches as consumers take them, or over several partitions. "
                "Nothing was stored."
            )
        if sum(len(d) for d in data) > MAX_PARTITION_BYTES:
            raise RequestSizeError(
                f"put_many of {sum(len(d) for d in data):,} bytes: a partition holds at most "
                f"{MAX_PARTITION_BYTES:,} bytes (64 MiB). Put smaller batches. Nothing was stored."
            )
        if not data:
            return
        deadline = None if timeout is None else time.monotonic() + max(timeout, 0.0)
        # one id for the whole call: a request that stored nothing (the partition was full) records nothing,
        # so the next one may reuse it; once one stored the values, the call ends
        rid = request_id()
        while True:
            wait = _wait(block, deadline)
            r = self._call(
                "put",
                {
                    "values": data,
                    "partition": part,
                    "partition_ttl": partition_ttl,
                    "timeout": wait,
                    "request_id": rid,
                },
            )
            if r.get("full") is None:
                return
            if not block or (deadline is not None and time.monotonic() >= deadline):
                raise Full(r["full"])

    @blocking
    def put(
        self,
        v: Any,
        block: bool = True,
        timeout: float | None = None,
        *,
        partition: str | None = None,
        partition_ttl: int = DEFAULT_TTL_S,
    ) -> None:
        """Add ``v`` to the end of the partition. When the partition is full: with ``block``, wait for space
        (up to ``timeout`` seconds, then ``queue.Full``); without, ``queue.Full`` at once."""
        self._put([v], block, timeout, partition, partition_ttl)

    @blocking
    def put_many(
        self,
        vs: list[Any],
        block: bool = True,
        timeout: float | None = None,
        *,
        partition: str | None = None,
        partition_ttl: int = DEFAULT_TTL_S,
    ) -> None:
        """Add ``vs`` to the end of the partition in one transaction: all of them or, when they do not fit,
        none (as :meth:`put` for blocking)."""
        self._put(list(vs), block, timeout, partition, partition_ttl)

    # -- get ------------------------------------------------------------------------------------------------
    def _get(self, n: int, block: bool, timeout: float | None, partition: str | None) -> list[Any] | None:
        """Up to ``n`` values; None when a non-blocking get found none; queue.Empty when a blocking one
        timed out."""
        part = self._partition(partition)
        deadline = None if timeout is None else time.monotonic() + max(timeout, 0.0)
        rid = request_id()  # as in _put: an empty answer is not recorded, so one id serves the whole call
        while True:
            r = self._call(
                "get", {"n": n, "partition": part, "timeout": _wait(block, deadline), "request_id": rid}
            )
            if r["values"]:
                return [_loads(v) for v in r["values"]]
            if not block:
                return None
            if deadline is not None and time.monotonic() >= deadline:
                raise Empty()

    @blocking
    def get(self, block: bool = True, timeout: float | None = None, *, partition: str | None = None) -> Any:
        """Remove and return the value at the front of the partition. With ``block``, wait for one (up to
        ``timeout`` seconds, then ``queue.Empty``); without, None when the partition is empty."""
        got = self._get(1, block, timeout, partition)
        return None if got is None else got[0]

    @blocking
    def get_many(
        self, n_values: int, block: bool = True, timeout: float | None = None, *, partition: str | None = None
    ) -> list[Any]:
        """Remove and return up to ``n_values`` values from the front of the partition (at least one when
        blocking: up to ``timeout`` seconds, then ``queue.Empty``; ``[]`` when not blocking and empty)."""
        if not isinstance(n_values, int) or n_values < 1:
            raise InvalidError(f"n_values must be a positive integer, not {n_values!r}.")
        got = self._get(min(n_values, MAX_PARTITION_ITEMS), block, timeout, partition)
        return [] if got is None else got

    # -- inspection -----------------------------------------------------------------------------------------
    @blocking
    def len(self, *, partition: str | None = None, total: bool = False) -> int:
        """Items in the partition, or (``total=True``) in every partition."""
        if partition is not None and total:
            raise InvalidError("Pass either partition= or total=True to Queue.len, not both.")
        return int(self._call("len", {"partition": self._partition(partition), "total": total})["len"])

    @blocking
    def clear(self, *, partition: str | None = None, all: bool = False) -> None:  # noqa: A002 - Modal's name
        """Remove every item of the partition, or (``all=True``) of every partition."""
        if partition is not None and all:
            raise InvalidError("Pass either partition= or all=True to Queue.clear, not both.")
        self._call("clear", {"partition": self._partition(partition), "all": all})

    def _peek(self, part: str, after: int, limit: int, wait: float) -> list[list[Any]]:
        r = self._call("peek", {"partition": part, "after": after, "limit": limit, "timeout": wait})
        items: list[list[Any]] = r["items"]
        return items

    @iterating
    def iterate(self, *, partition: str | None = None, item_poll_timeout: float = 0.0) -> Iterator[Any]:
        """The partition's values in order, without removing them; once it has no more, waits up to
        ``item_poll_timeout`` seconds for another, then ends."""
        part = self._partition(partition)

        def gen() -> Iterator[Any]:
            after = 0
            while True:
                items = self._peek(part, after, PEEK_PAGE, 0.0)
                if not items and item_poll_timeout > 0:
                    deadline = time.monotonic() + item_poll_timeout
                    while not items and time.monotonic() < deadline:
                        wait = min(MAX_POLL_S, max(0.0, deadline - time.monotonic()))
                        items = self._peek(part, after, PEEK_PAGE, wait)
                if not items:
                    return
                for i, v in items:
                    after = i
                    yield _loads(v)

        return gen()


def _wait(block: bool, deadline: float | None) -> float:
    """How long the next request may wait on the control plane."""
    if not block:
        return 0.0
    if deadline is None:
        return MAX_POLL_S
    return max(0.0, min(MAX_POLL_S, deadline - time.monotonic()))


__all__ = ["Empty", "Full", "Queue"]
