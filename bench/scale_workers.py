"""Simulated workers for ``bench/scale.py``: many light worker clients on one asyncio loop, each speaking the
real worker protocol to the control plane (see ``cloudmodal/worker/runtime.py``).

What is real: every message and its route, body and order, as ``Worker`` sends them, each worker with its own
token and its own connections:

- ``POST /v1/workers/{id}/register`` then ``POST .../ready`` (msgpack over HTTP/1.1, keep-alive);
- claims over a WebSocket to ``/v1/workers/{id}/claim``: ``{"max", "wait": 10, "outputs"}``, long-polled,
  ``max`` computed as the runtime does (capacity 1 plus a prefetch of ``min(500, 0.05 s / mean duration)``);
- outputs: a batch of one input's output rides with the next claim (the runtime's deferred output); of a larger
  batch, all but the last go in one ``POST .../outputs`` from a concurrent sender, the last with the next claim;
- ``POST .../heartbeat`` every ``heartbeat_s`` (from the registration's answer) with the inputs it holds;
- ``POST .../stopped`` when told to stop.

What is simulated: the function. An input "runs" for ``--work-ms`` (an ``asyncio.sleep``, 0 by default) and
its output is the input's own argument bytes, so the caller reads back ``((i,), {})`` for input ``i`` and checks
it. No user code is loaded, no logs are streamed, no thread per worker: the HTTP client is a few lines over an
asyncio stream instead of httpx, so that 250 workers fit in one process's CPU. Each claim reply is time-stamped
(``time.monotonic()``, system-wide on Linux) per input and written to ``--out`` at the end (msgpack).

Protocol on stdin/stdout with ``bench/scale.py``: prints ``CONNECTED`` once every worker has registered, is
ready and has sent its first claim; stops (every worker posts ``stopped``) when a line arrives on stdin.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
import time
from typing import Any

import msgpack

CLAIM_WAIT_S = 10.0
MAX_PREFETCH = 500


class Http:
    """One keep-alive HTTP/1.1 connection, one request at a time, msgpack bodies."""

    def __init__(self, host: str, port: int, token: str) -> None:
        self.host, self.port = host, port
        self.head = (
            f"Host: {host}:{port}\r\nAuthorization: Bearer {token}\r\nContent-Type: application/msgpack\r\n"
        )
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.lock = asyncio.Lock()

    async def post(self, path: str, body: Any) -> Any:
        data = msgpack.packb(body, use_bin_type=True)
        try:
            return await self._post(path, data)
        except BaseException:
            self.close()  # a request cut off midway leaves the connection unusable
            raise

    async def _post(self, path: str, data: bytes) -> Any:
        async with self.lock:
            if self.writer is None:
                self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
                sock = self.writer.get_extra_info("socket")
                if sock is not None:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            assert self.reader is not None
            self.writer.write(
                f"POST {path} HTTP/1.1\r\n{self.head}Content-Length: {len(data)}\r\n\r\n".encode() + data
            )
            status_line = await self.reader.readline()
            if not status_line:
                raise ConnectionError(f"connection closed on POST {path}")
            status = int(status_line.split()[1])
            length = 0
            ctype = b""
            while True:
                line = await self.reader.readline()
                if line in (b"\r\n", b""):
                    break
                k, _, v = line.partition(b":")
                k = k.strip().lower()
                if k == b"content-length":
                    length = int(v)
                elif k == b"content-type":
                    ctype = v.strip()
            raw = await self.reader.readexactly(length) if length else b""
        if status >= 400:
            raise RuntimeError(f"POST {path}: HTTP {status} {raw[:300]!r}")
        if not raw:
            return None
        return json.loads(raw) if ctype.startswith(b"application/json") else msgpack.unpackb(raw, raw=False)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


async def patiently(make: Any, timeout: float = 300.0) -> Any:
    """``await make()``, retried on connection errors and timeouts with the transport's backoff (50 ms doubling
    to 2 s) until ``timeout``: the runtime's ``Transport`` and ``Channel`` are as patient."""
    deadline = time.monotonic() + timeout
    delay = 0.05
    while True:
        try:
            return await make()
        except (OSError, TimeoutError, ConnectionError, asyncio.IncompleteReadError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)


class SimWorker:
    def __init__(self, pool: Pool, worker_id: str, token: str) -> None:
        self.pool = pool
        self.id = worker_id
        self.token = token
        self.base = f"/v1/workers/{worker_id}"
        self.http = Http(pool.host, pool.port, token)
        self.ws: Any = None
        self.held: set[int] = set()
        self.deferred: list[list[Any]] = []  # outputs for the next claim
        self.avg_duration = 0.05  # the runtime's starting estimate
        self.served = 0
        self.busy_s = 0.0
        self.heartbeat_s = 3.0
        self.sending: set[asyncio.Task[Any]] = set()

    async def register(self) -> None:
        defn = await patiently(
            lambda: self.http.post(
                f"{self.base}/register", {"pid": os.getpid(), "host": socket.gethostname()}
            )
        )
        self.heartbeat_s = float(defn.get("heartbeat_s", 3.0))
        await patiently(lambda: self.http.post(f"{self.base}/ready", {}))
        # as the runtime: heartbeats begin once the worker is ready, before its claim WebSocket opens
        self.pool.beats.append(asyncio.create_task(self.heartbeat_loop()))

    async def connect(self) -> None:
        from websockets.asyncio.client import connect

        self.ws = await patiently(
            lambda: connect(
                self.pool.ws_url + f"{self.base}/claim",
                additional_headers={"authorization": f"Bearer {self.token}"},
                compression=None,
                max_size=None,
                open_timeout=5,  # the runtime's Channel: 5 s, then retried with backoff
                user_agent_header="cloudmodal-client",
            )
        )

    def limit(self) -> int:
        return 1 + min(MAX_PREFETCH, int(0.05 / max(self.avg_duration, 1e-5)))

    async def claim_loop(self, first_sent: asyncio.Event) -> None:
        """Claims until stopped; a worker whose claims are refused (e.g. written off: 401) stops claiming,
        as a worker process would exit, and the error is reported."""
        try:
            await self._claim_loop(first_sent)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self.pool.errors.append(f"claim loop {self.id}: {e!r}")
        finally:
            first_sent.set()

    async def _claim_loop(self, first_sent: asyncio.Event) -> None:
        from websockets.exceptions import ConnectionClosed

        pool = self.pool
        work_s = pool.work_s
        while not pool.stopping:
            outputs, self.deferred = self.deferred, []
            msg = msgpack.packb(
                {"max": self.limit(), "wait": CLAIM_WAIT_S, "outputs": outputs}, use_bin_type=True
            )
            while True:
                try:
                    await self.ws.send(msg)
                    first_sent.set()
                    raw = await self.ws.recv()
                    break
                except (ConnectionClosed, OSError):
                    # the runtime's Channel reconnects and sends the claim again (claims are idempotent)
                    await self.connect()
            reply = msgpack.unpackb(raw, raw=False)
            t = time.monotonic()
            if "ok" not in reply:
                raise RuntimeError(f"claim refused: {reply}")
            for iid in (r[0] for r in outputs):
                self.held.discard(iid)
            rows = reply["ok"]["inputs"]
            if reply["ok"].get("drain"):
                return
            if not rows:
                continue
            rec = pool.claims
            for r in rows:
                rec.append((r[1], r[2], t))
                self.held.add(r[0])
            out: list[list[Any]] = []
            for r in rows:
                t0 = time.perf_counter()
                if work_s:
                    await asyncio.sleep(work_s)
                d = time.perf_counter() - t0
                self.avg_duration = 0.8 * self.avg_duration + 0.2 * d
                self.served += 1
                self.busy_s += d
                out.append([r[0], "success", r[4], None, -1, True])  # the output is the argument bytes
            self.deferred = out[-1:]
            if len(out) > 1:
                task = asyncio.create_task(self.send_outputs(out[:-1]))
                self.sending.add(task)
                task.add_done_callback(self.sending.discard)

    async def send_outputs(self, rows: list[list[Any]]) -> None:
        # the runtime's Transport re-sends on a broken connection (outputs are idempotent)
        await patiently(lambda: self.http.post(f"{self.base}/outputs", {"outputs": rows}))
        for r in rows:
            self.held.discard(r[0])

    async def heartbeat_loop(self) -> None:
        await asyncio.sleep(
            self.pool.rng_offset(self.heartbeat_s)
        )  # spread, as workers start at different times
        while not self.pool.stopping:
            held = sorted(self.held)
            served, busy_s = self.served, self.busy_s
            self.served, self.busy_s = 0, 0.0
            body = {
                "in_flight": len(held),
                "idle": not held,
                "held": held,
                "served": served,
                "busy_s": busy_s,
            }
            try:
                await patiently(lambda b=body: self.http.post(f"{self.base}/heartbeat", b), timeout=30)
            except Exception as e:  # the runtime carries on after a failed heartbeat
                self.pool.errors.append(f"heartbeat {self.id}: {e}")
            await asyncio.sleep(self.heartbeat_s)

    async def stop(self) -> None:
        if self.sending:
            await asyncio.gather(*self.sending, return_exceptions=True)
        if self.deferred:
            await self.send_outputs(self.deferred)
            self.deferred = []
        stopped = {"reason": "scale bench done", "crashed": False}
        await patiently(lambda: self.http.post(f"{self.base}/stopped", stopped), timeout=60)
        if self.ws is not None:
            await self.ws.close()
        self.http.close()


class Pool:
    def __init__(self, url: str, workers: list[list[str]], work_ms: float) -> None:
        hostport = url.split("://", 1)[1]
        self.host, port = hostport.rsplit(":", 1)
        self.port = int(port)
        self.ws_url = "ws://" + hostport
        self.work_s = work_ms / 1000.0
        self.workers = [SimWorker(self, wid, tok) for wid, tok in workers]
        self.claims: list[tuple[str, int, float]] = []
        self.errors: list[str] = []
        self.stopping = False
        self.beats: list[asyncio.Task[None]] = []
        self._n = 0

    def rng_offset(self, span: float) -> float:
        self._n += 1
        return span * ((self._n * 0.618034) % 1.0)

    async def run(self) -> None:
        sem = asyncio.Semaphore(20)  # connect in waves: a real fleet does not arrive in one instant

        firsts = [asyncio.Event() for _ in self.workers]
        loops: list[asyncio.Task[None]] = []
        beats = self.beats

        async def register(w: SimWorker) -> None:
            async with sem:
                await w.register()

        async def connect(w: SimWorker, first: asyncio.Event) -> None:
            async with sem:
                await w.connect()
            # claims begin once this worker is connected, not once all are
            loops.append(asyncio.create_task(w.claim_loop(first)))

        # Every worker registers (and heartbeats) first, then opens its claim socket: the control plane writes
        # off a worker row that has not registered within its start-up grace (120 s), however loaded it is.
        await asyncio.gather(*(register(w) for w in self.workers))
        await asyncio.gather(*(connect(w, e) for w, e in zip(self.workers, firsts, strict=True)))
        await asyncio.gather(*(e.wait() for e in firsts))
        print("CONNECTED", flush=True)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, sys.stdin.readline)
        self.stopping = True
        for t in loops + beats:
            t.cancel()
        await asyncio.gather(*loops, *beats, return_exceptions=True)
        results = await asyncio.gather(*(w.stop() for w in self.workers), return_exceptions=True)
        self.errors += [f"stop: {r!r}" for r in results if isinstance(r, BaseException)]


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--info", required=True)
    p.add_argument("--first", type=int, required=True)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--work-ms", type=float, default=0.0)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    with open(a.info) as f:
        info = json.load(f)
    pool = Pool(info["url"], info["workers"][a.first : a.first + a.count], a.work_ms)
    try:
        import uvloop

        uvloop.run(pool.run())
    except ImportError:
        asyncio.run(pool.run())
    with open(a.out, "wb") as f:
        f.write(msgpack.packb({"claims": pool.claims, "errors": pool.errors[:50]}, use_bin_type=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
