"""Call mechanics shared by functions and class methods: one input, many inputs, results, generators."""

from __future__ import annotations

import collections
import os
import queue
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

from cloudmodal.exception import InvalidError
from cloudmodal.ids import new_id
from cloudmodal.serialization import deserialize, load_failure, serialize_args

INLINE_LIMIT = 2 * 1024 * 1024  # larger arguments go to the blob store
MAP_WINDOW = 50_000  # inputs in flight per map: the client's memory stays flat however long the map is
MAP_BATCH_MAX = 2000
MAP_BATCH_BYTES = 8 * 1024 * 1024
MAP_LINGER_S = 0.005  # how long a map's input batch waits for more inputs once none is ready
LONG_POLL_S = 50.0


_limit_seen: tuple[str | None, int] | None = None  # (the variable's text, the limit it gave)


def payload_limit() -> int:
    """The largest pickled argument this client sends: ``CLOUDMODAL_MAX_PAYLOAD_BYTES`` (default 1 GiB),
    read at each call. The settings are parsed again only when the variable's text changed: reading them
    scans the whole environment, a cost on every ``.remote()``."""
    global _limit_seen
    raw = os.environ.get("CLOUDMODAL_MAX_PAYLOAD_BYTES")
    seen = _limit_seen
    if seen is not None and seen[0] == raw:
        return seen[1]
    from cloudmodal.settings import settings

    limit = settings().max_payload_bytes
    _limit_seen = (raw, limit)
    return limit


def encode_input(
    session: Any, args: tuple[Any, ...], kwargs: dict[str, Any], limit: int | None = None
) -> tuple[bytes | None, str | None]:
    """``limit``: :func:`payload_limit`, read once by callers that encode many inputs."""
    data = serialize_args(args, kwargs)
    if limit is None:
        limit = payload_limit()
    if len(data) > limit:
        from cloudmodal.exception import RequestSizeError

        raise RequestSizeError(
            f"Arguments are {len(data)} bytes pickled; the limit is {limit} bytes. Put large data in a Volume or object store and pass its path."
        )
    if len(data) > INLINE_LIMIT:
        return None, session.upload_blob(data)
    return data, None


def decode_output(session: Any, status: str, data: bytes | None, blob: str | None) -> tuple[bool, Any]:
    """(ok, value-or-exception) of one output row."""
    if blob is not None:
        data = session.download_blob(blob)
    if status in ("success", "gen_item"):
        return True, deserialize(data, "result") if data is not None else None
    return False, load_failure(data) if data is not None else RuntimeError(
        f"input ended with status {status}"
    )


class OutputStream:
    """Reads a call's outputs with a cursor and long polls."""

    def __init__(self, session: Any, call_id: str, after: int = 0) -> None:
        self.session = session
        self.call_id = call_id
        self.cursor = after

    def poll(self, timeout: float, limit: int = 10000) -> list[list[Any]]:
        rows = self.session.transport.post(
            f"/v1/calls/{self.call_id}/outputs", {"after": self.cursor, "limit": limit, "timeout": timeout}
        )["outputs"]
        if rows:
            self.cursor = rows[-1][0]
        return rows


def call_one(
    session: Any,
    function_id: str,
    method: str | None,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    kind: str = "remote",
    wait: float = LONG_POLL_S,
) -> tuple[str, list[list[Any]]]:
    payload, blob = encode_input(session, args, kwargs)
    call_id = new_id("fc")
    # over this thread's WebSocket to the control plane: no HTTP request per call
    resp = session.transport.thread_channel("/v1/calls").call(
        {
            "call_id": call_id,
            "function_id": function_id,
            "kind": kind,
            "inputs": [[0, method, payload, blob]],
            "wait": wait,
        },
    )
    return call_id, resp.get("outputs") or []


def wait_final(
    session: Any, call_id: str, first: list[list[Any]], timeout: float | None = None, after: int = 0
) -> Any:
    """Wait for the final output of a single-input call and return its value (or raise its error)."""
    stream = OutputStream(session, call_id, after)
    rows = first
    if rows:
        stream.cursor = rows[-1][0]
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        for _id, _idx, gen_index, status, data, blob in rows:
            if gen_index == -1:
                ok, value = decode_output(session, status, data, blob)
                if ok:
                    return value
                raise value
        remaining = LONG_POLL_S if deadline is None else deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"Function call {call_id} did not finish within {timeout} s.")
        rows = stream.poll(min(remaining, LONG_POLL_S))


def iter_generator(session: Any, call_id: str, first: list[list[Any]]) -> Iterator[Any]:
    stream = OutputStream(session, call_id)
    rows = first
    if rows:
        stream.cursor = rows[-1][0]
    buffered: dict[int, Any] = {}
    next_index = 0
    final: tuple[bool, Any] | None = None
    while True:
        for _id, _idx, gen_index, status, data, blob in rows:
            if gen_index >= 0:
                if gen_index >= next_index:
                    buffered[gen_index] = (status, data, blob)
            else:
                final = decode_output(session, status, data, blob)
        while next_index in buffered:
            status, data, blob = buffered.pop(next_index)
            next_index += 1
            ok, value = decode_output(session, status, data, blob)
            yield value
        if final is not None and not buffered:
            if not final[0]:
                raise final[1]
            return
        rows = stream.poll(LONG_POLL_S)


def run_map(
    session: Any,
    function_id: str,
    method: str | None,
    arg_tuples: Iterable[tuple[Any, ...]],
    kwargs: dict[str, Any],
    *,
    order_outputs: bool = True,
    return_exceptions: bool = False,
    kind: str = "map",
    progress: Any = None,
) -> Iterator[Any]:
    """Stream inputs in batches from a feeder thread, results back with long polls, in bounded memory."""
    call_id = new_id("fc")
    session.transport.post("/v1/calls", {"call_id": call_id, "function_id": function_id, "kind": kind})
    state = _FeedState()
    feeder = threading.Thread(
        target=_feed,
        args=(session, call_id, function_id, method, arg_tuples, kwargs, state),
        name="map-feeder",
        daemon=True,
    )
    feeder.start()
    stream = OutputStream(session, call_id)
    received = 0
    next_idx = 0
    buffered: dict[int, tuple[bool, Any]] = {}
    try:
        while True:
            if state.error is not None:
                raise state.error
            if state.total is not None and received >= state.total:
                return
            rows = stream.poll(1.0 if state.total is None else LONG_POLL_S)
            for _id, idx, gen_index, status, data, blob in rows:
                if gen_index != -1:
                    continue
                received += 1
                with state.cond:
                    state.received = received
                    state.cond.notify_all()
                if progress is not None:
                    progress(received, state.total)
                result = decode_output(session, status, data, blob)
                if order_outputs:
                    buffered[idx] = result
                    while next_idx in buffered:
                        ok, value = buffered.pop(next_idx)
                        next_idx += 1
                        yield _result(ok, value, return_exceptions)
                else:
                    yield _result(result[0], result[1], return_exceptions)
    except BaseException:  # an error, Ctrl-C, or the caller abandoning the generator (GeneratorExit)
        state.abort = True
        try:
            session.transport.post(f"/v1/calls/{call_id}/cancel", reconnect_timeout=5.0)
        except Exception:
            pass
        raise
    finally:
        with state.cond:
            state.cond.notify_all()


def _result(ok: bool, value: Any, return_exceptions: bool) -> Any:
    if ok or return_exceptions:
        return value
    raise value


class _FeedState:
    """Shared by a map's feeder thread and its reader. ``window`` caps the inputs sent but not yet read back
    (None: no cap, for ``spawn_map``, whose results nobody reads here)."""

    def __init__(self, window: int | None = MAP_WINDOW) -> None:
        self.window = window
        self.cond = threading.Condition()
        self.sent = 0
        self.received = 0
        self.total: int | None = None
        self.error: BaseException | None = None
        self.abort = False


class _Ready:
    """A map's inputs, pickled by its producer thread and waiting to be sent: at most one batch's worth
    (``MAP_BATCH_MAX`` inputs or ``MAP_BATCH_BYTES``) ahead of the sender, so the client's memory stays flat."""

    def __init__(self, state: _FeedState) -> None:
        self.state = state
        self.cond = threading.Condition()
        self.items: collections.deque[tuple[list[Any], int]] = collections.deque()
        self.bytes = 0
        self.ended = False
        self.count = 0  # inputs produced
        self.error: BaseException | None = None

    def put(self, item: list[Any], size: int) -> bool:
        """False once the map was abandoned."""
        with self.cond:
            while (
                len(self.items) >= MAP_BATCH_MAX or self.bytes >= MAP_BATCH_BYTES
            ) and not self.state.abort:
                self.cond.wait(0.5)
            if self.state.abort:
                return False
            self.items.append((item, size))
            self.bytes += size
            self.count += 1
            self.cond.notify_all()
            return True

    def end(self, error: BaseException | None = None) -> None:
        with self.cond:
            self.ended = True
            self.error = error
            self.cond.notify_all()

    def take(self, limit: int) -> tuple[list[list[Any]], bool]:
        """The next batch: waits for a first input, then up to ``MAP_LINGER_S`` for more until ``limit``
        inputs or ``MAP_BATCH_BYTES`` are ready. Also whether the producer is done (nothing more will come)."""
        with self.cond:
            while not self.items and not self.ended and not self.state.abort:
                self.cond.wait(0.5)
            deadline = time.monotonic() + MAP_LINGER_S
            while len(self.items) < limit and self.bytes < MAP_BATCH_BYTES and not self.ended:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.state.abort:
                    break
                self.cond.wait(remaining)
            batch: list[list[Any]] = []
            size = 0
            while self.items and len(batch) < limit and (not batch or size < MAP_BATCH_BYTES):
                item, n = self.items.popleft()
                batch.append(item)
                size += n
            self.bytes -= size
            self.cond.notify_all()
            return batch, self.ended and not self.items


def _produce(
    session: Any,
    method: str | None,
    arg_tuples: Iterable[tuple[Any, ...]],
    kwargs: dict[str, Any],
    ready: _Ready,
) -> None:
    """Iterate a map's arguments and pickle them (in a thread of their own: a slow producer never holds back
    inputs that are ready to go)."""
    try:
        size_limit = payload_limit()
        for idx, args in enumerate(arg_tuples):
            payload, blob = encode_input(session, tuple(args), kwargs, size_limit)
            if not ready.put([idx, method, payload, blob], len(payload) if payload else 64):
                break
    except BaseException as e:  # surfaces in the consumer
        ready.end(e)
    else:
        ready.end()


def _feed(
    session: Any,
    call_id: str,
    function_id: str,
    method: str | None,
    arg_tuples: Iterable[tuple[Any, ...]],
    kwargs: dict[str, Any],
    state: _FeedState,
) -> None:
    """Send a map's inputs in batches: a batch goes once it is full (64 inputs at first, then twice as many
    each time up to ``MAP_BATCH_MAX``, or ``MAP_BATCH_BYTES``) or once no more input has come for
    ``MAP_LINGER_S``. A slow producer's inputs are sent as they come instead of waiting for a batch to fill;
    a fast producer's pile up while a batch is in flight and go in the next one."""
    ready = _Ready(state)
    producer = threading.Thread(
        target=_produce, args=(session, method, arg_tuples, kwargs, ready), name="map-producer", daemon=True
    )
    producer.start()
    batch_limit = 64  # small first batch: workers start on it while the rest is pickled
    try:
        while not state.abort:
            batch, done = ready.take(batch_limit)
            if batch:
                if state.window is not None:
                    with state.cond:
                        while state.sent - state.received >= state.window and not state.abort:
                            state.cond.wait(0.5)
                session.transport.post(
                    f"/v1/calls/{call_id}/inputs", {"function_id": function_id, "inputs": batch}
                )
                state.sent += len(batch)
                batch_limit = min(batch_limit * 2, MAP_BATCH_MAX)
            if done:
                if ready.error is not None:
                    raise ready.error
                state.total = ready.count
                return
    except BaseException as e:  # surfaces in the consumer
        state.abort = True  # the producer stops too
        state.error = e


def spawn_many(
    session: Any,
    function_id: str,
    method: str | None,
    arg_tuples: Iterable[tuple[Any, ...]],
    kwargs: dict[str, Any],
) -> str:
    call_id = new_id("fc")
    session.transport.post("/v1/calls", {"call_id": call_id, "function_id": function_id, "kind": "spawn_map"})
    # No window: nobody reads these results here, so nothing would ever open one; the inputs are streamed in
    # batches all the same, so the client's memory stays flat.
    state = _FeedState(window=None)
    _feed(session, call_id, function_id, method, arg_tuples, kwargs, state)
    if state.error is not None:
        raise state.error
    return call_id


def check_not_generator(is_generator: bool, name: str, api: str) -> None:
    if is_generator and api != "remote_gen":
        raise InvalidError(
            f"{name} is a generator function: call it with `.remote_gen(...)`, not `.{api}(...)`."
        )
    if not is_generator and api == "remote_gen":
        raise InvalidError(f"{name} is not a generator function: call it with `.remote(...)`.")


def async_iter(sync_iter_factory: Any) -> Any:
    """Run a blocking iterator in a thread and expose it as an async iterator (for ``.map.aio``)."""
    import asyncio

    async def agen() -> Any:
        q: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=1024)
        done = object()

        def pump() -> None:
            try:
                for item in sync_iter_factory():
                    q.put(("item", item))
                q.put(("done", done))
            except BaseException as e:
                q.put(("error", e))

        t = threading.Thread(target=pump, daemon=True)
        t.start()
        while True:
            kind, value = await asyncio.to_thread(q.get)
            if kind == "item":
                yield value
            elif kind == "error":
                raise value
            else:
                return

    return agen()
