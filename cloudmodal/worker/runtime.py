"""The worker's main loop: claim input batches, run them with the declared concurrency, post outputs,
heartbeat, stream logs, enforce timeouts, and drain cleanly on SIGTERM or when told to."""

from __future__ import annotations

import asyncio
import collections
import inspect
import io
import json
import os
import signal
import socket
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cloudmodal import _context
from cloudmodal.client.transport import Transport
from cloudmodal.exception import InputCancellation
from cloudmodal.serialization import deserialize, failure_payload, serialize, timeout_payload
from cloudmodal.spec import FunctionSpec

if TYPE_CHECKING:
    from cloudmodal.worker.snapshot import Restored

INLINE_LIMIT = 2 * 1024 * 1024
TERM_GRACE_S = 10.0  # after SIGTERM, how long requests to the control plane keep retrying
CLAIM_WAIT_S = 10.0
MAX_PREFETCH = 500


@dataclass
class Work:
    input_id: int
    call_id: str
    idx: int
    method: str | None
    args: bytes | None
    args_blob: str | None
    attempt: int
    started_at: float = 0.0
    future: Any = None
    cancelled: bool = False
    outputs_sent: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


class _LogTee(io.TextIOBase):
    """Replaces sys.stdout/sys.stderr: lines go to the control plane (tagged with the current call) and to
    the original stream (the provider's log file)."""

    def __init__(self, worker: Worker, stream_name: str, original: Any) -> None:
        self.worker = worker
        self.stream_name = stream_name
        self.original = original
        self._buf: dict[int, str] = {}

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        try:
            self.original.write(s)
        except Exception:
            pass
        tid = threading.get_ident()
        buf = self._buf.get(tid, "") + s
        *lines, rest = buf.split("\n")
        self._buf[tid] = rest
        call_id = _context.current_call_id.get() or getattr(self.worker._tls, "call_id", None)
        for line in lines:
            self.worker.log(self.stream_name, line, call_id)
        return len(s)

    def flush(self) -> None:
        try:
            self.original.flush()
        except Exception:
            pass


class Worker:
    def __init__(
        self, url: str, token: str | None, worker_id: str, reconnect_timeout: float | None = None
    ) -> None:
        """``reconnect_timeout``: how long to keep trying to reach a control plane that went away
        (default ``CLOUDMODAL_WORKER_RECONNECT_S``)."""
        if reconnect_timeout is None:
            from cloudmodal.settings import settings

            reconnect_timeout = settings().worker_reconnect_s
        self.worker_id = worker_id
        self._token = token  # also the web tunnel's (cloudmodal.worker.web); never in the user's environment
        from cloudmodal.tls import env_fingerprint

        # an https:// control plane's certificate is the one CLOUDMODAL_TLS_FINGERPRINT names (set by it)
        self.t = Transport(url, token, reconnect_timeout=reconnect_timeout, fingerprint=env_fingerprint())
        self.base = f"/v1/workers/{worker_id}"
        self.claims = self.t.channel(f"{self.base}/claim")  # the main loop's claims, over a WebSocket
        self._tls = threading.local()
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self.local_queue: collections.deque[Work] = collections.deque()
        self.running: dict[int, Work] = {}
        self.outbox: list[list[Any]] = []
        self._out_cond = threading.Condition()
        self._sending = False  # the sender thread has a batch in flight
        self._main = threading.current_thread()
        self._defer_outputs = False  # the main loop will send them with its next claim
        self._logs: list[list[Any]] = []
        self._logs_lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self.draining = threading.Event()
        self.stopped = threading.Event()
        self.avg_duration = 0.05
        self.last_activity = time.time()
        self.instance: Any = None
        self.exit_code = 0
        self._claimed_pending: set[int] = set()  # claimed, between the claim reply and starting
        self._served = 0  # inputs finished since the last heartbeat, and the seconds they ran
        self._busy_s = 0.0

    # -- set-up -------------------------------------------------------------------------------------------
    def setup(self, restored: Restored | None = None) -> None:
        """``restored``: this process is a fork of the function's snapshot (see cloudmodal.worker.snapshot),
        with the user's code loaded and its ``@enter(snap=True)`` hooks run."""
        defn = self.t.post(f"{self.base}/register", {"pid": os.getpid(), "host": socket.gethostname()})
        self.defn = defn
        from cloudmodal.worker import snapshot

        if restored is not None and not restored.matches(defn):
            restored = None  # a snapshot of an older version of the function: take a new one
        if restored is None and snapshot.wanted(defn):
            # This container starts again as a fork of the function's snapshot, under this same identity.
            snapshot.hand_off(self.t, self.worker_id, self._token, defn)
            os._exit(0)
        self.spec = FunctionSpec.from_wire(defn["spec"])
        self.lease_s = float(defn.get("lease_s", 30.0))
        self.heartbeat_s = float(defn.get("heartbeat_s", 3.0))
        for k, v in (defn.get("inline_env") or {}).items():
            os.environ[k] = v
        if self.spec.has_mounts:  # on this (main) thread, before the user's code is imported
            from cloudmodal.worker.volumes import mount_volumes

            mount_volumes(self.t, self.spec)
        sys.stdout = _LogTee(self, "stdout", sys.__stdout__)
        sys.stderr = _LogTee(self, "stderr", sys.__stderr__)
        threading.Thread(target=self._log_loop, name="logs", daemon=True).start()
        if restored is not None:
            kind, target = restored.kind, restored.target
            self.kind = kind
            if kind == "cls":
                from cloudmodal.partial_function import run_lifecycle_hooks

                self.instance = restored.instance
                run_lifecycle_hooks(self.instance, "enter_post_snapshot")
                self.fn = None
            else:
                self.fn = target
        else:
            from cloudmodal.worker.loader import load_target

            kind, target, params = load_target(self.t, defn)
            self.kind = kind
            if kind == "cls":
                from cloudmodal.partial_function import instantiate, run_lifecycle_hooks

                self.instance = instantiate(target, **params)
                run_lifecycle_hooks(self.instance, "enter")
                self.fn = None
            else:
                self.fn = target
        self.capacity = self.spec.concurrency.max_inputs if self.spec.concurrency else 1
        self.batching = self.spec.batching
        self.loop: asyncio.AbstractEventLoop | None = None
        if self._any_async():
            self.loop = asyncio.new_event_loop()
            threading.Thread(target=self.loop.run_forever, name="asyncio", daemon=True).start()
        self.pool = ThreadPoolExecutor(max_workers=max(1, self.capacity), thread_name_prefix="input")
        self.web: Any = None
        if self.spec.web is not None or self.spec.web_methods:
            from cloudmodal.worker.web import WebServer, build_apps

            # the user's app factories run here, on the main thread, as @enter hooks do
            apps = build_apps(self.spec, self.fn, self.instance)
            self.web = WebServer(self.t.url, self._token, self.worker_id, apps)
            self.web.start()
        self.t.post(f"{self.base}/ready")

    def _any_async(self) -> bool:
        if self.kind == "cls":
            return bool(self.spec.async_methods)
        return inspect.iscoroutinefunction(self.fn) or inspect.isasyncgenfunction(self.fn)

    def _callable(self, method: str | None) -> Any:
        if self.kind == "cls":
            if not method:
                raise RuntimeError("a class input without a method name")
            return getattr(self.instance, method)
        return self.fn

    # -- threads ------------------------------------------------------------------------------------------
    def log(self, stream: str, text: str, call_id: str | None) -> None:
        with self._logs_lock:
            self._logs.append([time.time(), stream, text, call_id])

    def _log_loop(self) -> None:
        while True:
            time.sleep(0.1)
            self.flush_logs()
            if self.stopped.is_set():
                return

    def flush_logs(self) -> None:
        with self._flush_lock:  # one batch in flight at a time: lines reach the control plane in order
            with self._logs_lock:
                lines, self._logs = self._logs, []
            for part in batches(lines, lambda x: len(x[2])):
                try:
                    self.t.post(f"{self.base}/logs", {"lines": part})
                except Exception:
                    pass

    def _heartbeat_loop(self) -> None:
        while not self.stopped.wait(self.heartbeat_s):
            with self._lock:
                held = [w.input_id for w in self.running.values()] + [w.input_id for w in self.local_queue]
                held += list(self._claimed_pending)
                served, busy_s = self._served, self._busy_s
                self._served, self._busy_s = 0, 0.0
            requests = self.web.in_flight if getattr(self, "web", None) is not None else 0
            body = {
                "in_flight": len(held) + requests,
                "idle": not held and not requests,
                "held": held,
                "served": served,
                "busy_s": busy_s,
            }
            try:
                r = self.t.post(f"{self.base}/heartbeat", body)
            except Exception:
                continue
            if r.get("drain"):
                self.draining.set()
                with self._cond:
                    self._cond.notify_all()
            for iid in r.get("cancel") or ():
                self._cancel(iid)

    def _cancel(self, input_id: int) -> None:
        with self._lock:
            w = self.running.get(input_id)
            if w is None:
                for q in self.local_queue:
                    if q.input_id == input_id:
                        q.cancelled = True
                return
            w.cancelled = True
            task = w.extra.get("task")
        if task is not None and self.loop is not None:
            self.loop.call_soon_threadsafe(task.cancel)

    def _sender_loop(self) -> None:
        while True:
            with self._out_cond:
                while not self.outbox and not self.stopped.is_set():
                    self._out_cond.wait(0.5)
                batch, self.outbox = self.outbox, []
                self._sending = bool(batch)
            try:
                if batch:
                    # An input's log lines reach the control plane before its result, so a caller that has
                    # the result can print the input's output without waiting for stragglers.
                    self.flush_logs()
                    self._post_outputs(batch)
                elif self.stopped.is_set():
                    return
            except Exception as e:  # the thread must live on: the unsent inputs' leases expire and requeue
                print(f"[cloudmodal] sending outputs failed: {type(e).__name__}: {e}", file=sys.stderr)
            finally:
                with self._out_cond:
                    self._sending = False
                    self._out_cond.notify_all()

    def emit(self, rows: list[list[Any]], *, defer: bool = False) -> None:
        """Queue output rows for the sender thread; ``defer``: leave them for the main loop's next claim,
        which carries them (one request instead of two per input when inputs run one at a time)."""
        with self._out_cond:
            self.outbox.extend(rows)
            if not defer:
                self._out_cond.notify()

    def _take_outbox_for_claim(self) -> list[list[Any]]:
        """Outputs to send with the next claim: only when nothing runs (no output can follow the ones taken
        in another request) and the sender has no batch in flight (a call's outputs keep their order); else
        the sender sends them, and the claim does not wait for it."""
        with self._lock:
            if self.running:
                return []
        with self._out_cond:
            if self._sending:
                self._out_cond.notify()
                return []
            n = len(batches(self.outbox, _row_size)[0]) if self.outbox else 0
            batch, self.outbox = self.outbox[:n], self.outbox[n:]
        return batch

    def _post_outputs(self, rows: list[list[Any]]) -> None:
        for part in batches(rows, _row_size):
            self.t.post(f"{self.base}/outputs", {"outputs": part})

    def _watchdog_loop(self) -> None:
        timeout = float(self.spec.timeout)
        while not self.stopped.wait(0.2):
            now = time.time()
            with self._lock:
                late = [
                    w
                    for w in self.running.values()
                    if w.started_at and now - w.started_at > timeout and not w.outputs_sent
                ]
            for w in late:
                task = w.extra.get("task")
                if task is not None and self.loop is not None:
                    w.extra["timed_out"] = True
                    self.loop.call_soon_threadsafe(task.cancel)
                    continue
                # A thread cannot be interrupted: report the timeout, hand back the rest, and exit.
                self._finish(w, [[w.input_id, "timeout", timeout_payload(timeout), None, -1, True]])
                self._hard_exit(f"input {w.input_id} exceeded timeout={timeout:g}s")

    def _hard_exit(self, reason: str) -> None:
        self.draining.set()
        with self._lock:
            others = [
                w.input_id for w in list(self.running.values()) + list(self.local_queue) if not w.outputs_sent
            ]
            self.local_queue.clear()
        self._flush_outbox()
        if others:
            try:
                self.t.post(f"{self.base}/release", {"input_ids": others}, reconnect_timeout=10)
            except Exception:
                pass
        print(f"[cloudmodal] worker exiting: {reason}", file=sys.stderr)
        self.flush_logs()
        try:
            self.t.post(f"{self.base}/stopped", {"reason": reason, "crashed": False}, reconnect_timeout=10)
        except Exception:
            pass
        os._exit(3)

    def _flush_outbox(self) -> None:
        with self._out_cond:
            batch, self.outbox = self.outbox, []
        if batch:
            self.flush_logs()  # before the results they belong to (see _sender_loop)
            self._post_outputs(batch)

    # -- running inputs -----------------------------------------------------------------------------------
    def _load_args(self, w: Work) -> tuple[tuple[Any, ...], dict[str, Any]]:
        data = w.args
        if data is None and w.args_blob:
            data = self.t.request("GET", f"/v1/blobs/{w.args_blob}", raw_response=True)
        assert data is not None
        return deserialize(data, "arguments")

    def _result_row(
        self, w: Work, status: str, value: Any, gen_index: int = -1, retryable: bool = True
    ) -> list[Any]:
        data = failure_payload(value) if status == "failure" else serialize(value)
        if len(data) <= INLINE_LIMIT:
            return [w.input_id, status, data, None, gen_index, retryable]
        blob = self.t.request("POST", "/v1/blobs", raw_body=data)["blob_id"]
        return [w.input_id, status, None, blob, gen_index, retryable]

    def _finish(self, w: Work, rows: list[list[Any]]) -> bool:
        with self._lock:
            if w.outputs_sent:
                return False
            w.outputs_sent = True
            self.running.pop(w.input_id, None)
            if w.started_at:
                self._served += 1
                self._busy_s += max(time.time() - w.started_at, 0.0)
            self._cond.notify_all()
        self.emit(rows, defer=self._defer_outputs and threading.current_thread() is self._main)
        self.last_activity = time.time()
        return True

    def _run_sync(self, w: Work) -> None:
        tok_i = _context.current_input_id.set(str(w.input_id))
        tok_c = _context.current_call_id.set(w.call_id)
        self._tls.call_id = w.call_id
        t0 = time.perf_counter()
        try:
            try:
                args, kwargs = self._load_args(w)
            except Exception as e:
                self._finish(w, [self._result_row(w, "failure", e, retryable=False)])
                return
            try:
                fn = self._callable(w.method)
                result = fn(*args, **kwargs)
                if inspect.isgenerator(result):
                    i = 0
                    for item in result:
                        if w.cancelled or w.outputs_sent:
                            result.close()
                            return
                        self.emit([self._result_row(w, "gen_item", item, gen_index=i)])
                        i += 1
                    result = None
                self._finish(w, [self._result_row(w, "success", result)])
            except InputCancellation:
                self._finish(w, [])
            except Exception as e:
                self._finish(w, [self._result_row(w, "failure", e)])
        finally:
            dt = time.perf_counter() - t0
            self.avg_duration = 0.8 * self.avg_duration + 0.2 * dt
            self._tls.call_id = None
            _context.current_input_id.reset(tok_i)
            _context.current_call_id.reset(tok_c)

    async def _run_async(self, w: Work) -> None:
        _context.current_input_id.set(str(w.input_id))
        _context.current_call_id.set(w.call_id)
        t0 = time.perf_counter()
        try:
            args, kwargs = await asyncio.to_thread(self._load_args, w)
        except Exception as e:
            self._finish(w, [self._result_row(w, "failure", e, retryable=False)])
            return
        try:
            fn = self._callable(w.method)
            if inspect.isasyncgenfunction(fn):
                i = 0
                async for item in fn(*args, **kwargs):
                    self.emit([self._result_row(w, "gen_item", item, gen_index=i)])
                    i += 1
                result = None
            else:
                result = fn(*args, **kwargs)
                if inspect.isawaitable(result):
                    result = await result
            self._finish(w, [self._result_row(w, "success", result)])
        except asyncio.CancelledError:
            if w.extra.get("timed_out"):
                self._finish(
                    w, [[w.input_id, "timeout", timeout_payload(float(self.spec.timeout)), None, -1, True]]
                )
            else:
                self._finish(w, [])
        except Exception as e:
            self._finish(w, [self._result_row(w, "failure", e)])
        finally:
            self.avg_duration = 0.8 * self.avg_duration + 0.2 * (time.perf_counter() - t0)

    def _is_async_method(self, method: str | None) -> bool:
        if self.kind == "cls":
            return method in self.spec.async_methods
        return self.loop is not None

    def _start(self, w: Work) -> None:
        w.started_at = time.time()
        with self._lock:
            self._claimed_pending.discard(w.input_id)
            self.running[w.input_id] = w
        if self._is_async_method(w.method):
            assert self.loop is not None

            def create() -> None:
                w.extra["task"] = self.loop.create_task(self._run_async(w))  # type: ignore[union-attr]

            self.loop.call_soon_threadsafe(create)
        elif self.capacity == 1:
            self._run_sync(w)  # one at a time: run it right here, no thread hand-off per input
        else:
            w.future = self.pool.submit(self._run_sync, w)

    def _run_batch(self, ws: list[Work]) -> None:
        """``@batched``: one call with lists; one output per input."""
        now = time.time()
        with self._lock:
            for w in ws:
                w.started_at = now
                self.running[w.input_id] = w
        loaded = []
        for w in ws:
            try:
                loaded.append((w, self._load_args(w)))
            except Exception as e:
                self._finish(w, [self._result_row(w, "failure", e, retryable=False)])
        if not loaded:
            return
        first_args, first_kwargs = loaded[0][1]
        n_pos = len(first_args)
        try:
            cols = [[a[0][i] for _, a in loaded] for i in range(n_pos)]
            kcols = {k: [a[1][k] for _, a in loaded] for k in first_kwargs}
        except (IndexError, KeyError) as e:
            for w, _ in loaded:
                self._finish(
                    w,
                    [
                        self._result_row(
                            w,
                            "failure",
                            TypeError(f"Inputs of a batched function must all pass the same arguments: {e}"),
                            retryable=False,
                        )
                    ],
                )
            return
        method = loaded[0][0].method
        try:
            fn = self._callable(method)
            if self._is_async_method(method):
                assert self.loop is not None
                results = asyncio.run_coroutine_threadsafe(fn(*cols, **kcols), self.loop).result()
            else:
                results = fn(*cols, **kcols)
            results = list(results)
            if len(results) != len(loaded):
                raise RuntimeError(
                    f"A batched function must return one result per input: got {len(results)} results for {len(loaded)} inputs."
                )
            for (w, _), r in zip(loaded, results, strict=True):
                self._finish(w, [self._result_row(w, "success", r)])
        except Exception as e:
            for w, _ in loaded:
                self._finish(w, [self._result_row(w, "failure", e)])

    def _batch_loop(self) -> None:
        assert self.batching is not None
        size, wait = self.batching.max_batch_size, self.batching.wait_ms / 1000.0
        while True:
            with self._cond:
                while not self.local_queue and not (self.draining.is_set() and not self.running):
                    self._cond.wait(0.2)
                    if self.draining.is_set() and not self.local_queue:
                        return
                first_at = time.time()
                while len(self.local_queue) < size and time.time() - first_at < wait:
                    self._cond.wait(max(0.0, wait - (time.time() - first_at)))
                batch = [self.local_queue.popleft() for _ in range(min(size, len(self.local_queue)))]
            batch = [w for w in batch if not w.cancelled]
            if batch:
                self._run_batch(batch)

    # -- main loop ----------------------------------------------------------------------------------------
    def run(self) -> int:
        threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True).start()
        sender = threading.Thread(target=self._sender_loop, name="outputs", daemon=True)
        sender.start()
        threading.Thread(target=self._watchdog_loop, name="watchdog", daemon=True).start()
        if self.batching is not None:
            threading.Thread(target=self._batch_loop, name="batcher", daemon=True).start()
        single_use = self.spec.single_use_containers
        served = 0
        while not self.draining.is_set():
            with self._cond:
                limit = (
                    self.batching.max_batch_size * 2
                    if self.batching
                    else self.capacity + min(MAX_PREFETCH, int(0.05 / max(self.avg_duration, 1e-5)))
                )
                while (
                    len(self.running) + len(self.local_queue) >= max(limit, 1) and not self.draining.is_set()
                ):
                    self._cond.wait(0.5)
                free = max(limit, 1) - len(self.running) - len(self.local_queue)
            if self.draining.is_set():
                break
            if single_use:
                free = 1
            outputs = self._take_outbox_for_claim()
            if outputs:
                self.flush_logs()  # before the results they belong to (see _sender_loop)
            r = self.claims.call({"max": free, "wait": CLAIM_WAIT_S, "outputs": outputs})
            if r.get("drain"):
                self.draining.set()
            works = [Work(*row) for row in r.get("inputs") or []]
            if not works:
                continue
            if self.batching is None:
                with self._lock:
                    self._claimed_pending.update(w.input_id for w in works)
            if self.batching is not None:
                with self._cond:
                    self.local_queue.extend(works)
                    self._cond.notify_all()
                continue
            for i, w in enumerate(works):
                if self.draining.is_set():
                    rest = [x.input_id for x in works[i:]]
                    with self._lock:
                        self._claimed_pending.difference_update(rest)
                    self.t.post(f"{self.base}/release", {"input_ids": rest})
                    break
                with self._cond:
                    while len(self.running) >= self.capacity:
                        self._cond.wait(0.5)
                if not w.cancelled:
                    # run inline as the batch's last: its outputs go out with the next claim
                    self._defer_outputs = i == len(works) - 1
                    try:
                        self._start(w)
                    finally:
                        self._defer_outputs = False
                else:
                    with self._lock:
                        self._claimed_pending.discard(w.input_id)
                served += 1
            if single_use and served >= 1:
                self.draining.set()
        return self.drain("drained")

    def drain(self, reason: str) -> int:
        """Stop claiming, hand back what has not started, finish what has, run @exit hooks, say goodbye."""
        self.draining.set()
        with self._cond:
            unstarted = [w.input_id for w in self.local_queue]
            self.local_queue.clear()
            self._cond.notify_all()
        if unstarted:
            self.t.post(f"{self.base}/release", {"input_ids": unstarted})
        deadline = time.time() + float(self.spec.timeout) + 5
        with self._cond:
            while self.running and time.time() < deadline:
                self._cond.wait(0.2)
        self._flush_outbox()
        if getattr(self, "web", None) is not None:
            self.web.drain(float(self.spec.timeout))
        if self.kind == "cls" and self.instance is not None:
            from cloudmodal.partial_function import run_lifecycle_hooks

            try:
                run_lifecycle_hooks(self.instance, "exit")
            except Exception:
                traceback.print_exc()
        if self.spec.has_mounts:
            from cloudmodal.worker.volumes import commit_all

            commit_all()
        sys.stdout.flush()
        self.flush_logs()
        self.t.post(f"{self.base}/stopped", {"reason": reason, "crashed": False}, reconnect_timeout=10)
        self.stopped.set()
        return 0


# A request's body stays well under the control plane's cap for output and log posts (64 MiB): rows are
# sent in batches of at most this many payload bytes (a single larger row is sent alone: payloads over 2 MiB
# travel as blobs, so a row is never near the cap).
POST_BATCH_BYTES = 32 * 1024 * 1024


def batches(rows: list[Any], size: Any, limit: int = POST_BATCH_BYTES) -> list[list[Any]]:
    """``rows`` split in order into runs of at most ``limit`` bytes by ``size(row)`` (each run non-empty)."""
    out: list[list[Any]] = []
    run: list[Any] = []
    total = 0
    for r in rows:
        n = size(r) + 64
        if run and total + n > limit:
            out.append(run)
            run, total = [], 0
        run.append(r)
        total += n
    if run:
        out.append(run)
    return out


def _row_size(row: list[Any]) -> int:
    return len(row[2] or b"")


@dataclass(frozen=True)
class Credentials:
    """How this worker reaches its control plane. Kept here, not in ``os.environ``, so the user's code and
    the processes it starts do not inherit the token; nested calls made by the user's code inside this
    worker find it through :func:`credentials` (see ``cloudmodal.client.session.current_session``).

    This keeps the token out of environments, ``/proc/<pid>/environ`` and child processes; it cannot keep
    it from code running in this same process, which could read this module or the transport's memory."""

    url: str
    token: str | None
    worker_id: str


_credentials: Credentials | None = None

TOKEN_ENV = "CLOUDMODAL_TOKEN"
TOKEN_FILE_ENV = "CLOUDMODAL_TOKEN_FILE"  # a file holding the token (for providers on other machines)
CREDENTIALS_ENV = "CLOUDMODAL_CREDENTIALS"  # "stdin": one JSON line {"CLOUDMODAL_TOKEN": ...} on stdin


def credentials() -> Credentials | None:
    """This worker's credentials, once :func:`main` has taken them; None outside a worker."""
    return _credentials


def take_token(environ: Any = None, stdin: Any = None) -> str | None:
    """The control-plane token handed to this process, removed from ``environ`` (default ``os.environ``)
    wherever it came from, so nothing started from here inherits it.

    Sources, first found wins: one JSON line on stdin when ``CLOUDMODAL_CREDENTIALS=stdin`` (the local
    provider: nothing in ``/proc/<pid>/environ``); a file named by ``CLOUDMODAL_TOKEN_FILE``; the
    ``CLOUDMODAL_TOKEN`` variable itself (accepted, and removed)."""
    from cloudmodal.settings import settings

    env = os.environ if environ is None else environ
    s = settings(env)
    token, via, path = s.token, s.credentials, s.token_file
    for name in (TOKEN_ENV, CREDENTIALS_ENV, TOKEN_FILE_ENV):
        env.pop(name, None)
    if environ is None and token:
        # Given in the environment (a custom launcher): /proc/<pid>/environ would keep showing it to the user's
        # code and what it starts for this process's whole life, whatever os.environ holds now.
        from cloudmodal.worker.exec_host import scrub_initial_environ

        scrub_initial_environ()
    if via == "stdin":
        stream = sys.stdin if stdin is None else stdin
        line = stream.readline() if stream is not None else ""
        try:
            private = json.loads(line) if line.strip() else {}
        except ValueError:
            private = None
        if not isinstance(private, dict):
            raise RuntimeError(
                "The worker's credentials on stdin are not a JSON object; the provider that started this "
                'worker must write one line like {"CLOUDMODAL_TOKEN": "..."} (see providers/local.py).'
            )
        token = private.get(TOKEN_ENV) or token
        if stdin is None:
            _stdin_to_devnull()
    elif via:
        raise RuntimeError(f"Unknown {CREDENTIALS_ENV}={via!r}; the only supported value is 'stdin'.")
    if path and not token:
        try:
            token = open(path, encoding="utf-8").read().strip() or None
        except OSError as e:
            raise RuntimeError(
                f"Cannot read the worker's token from {TOKEN_FILE_ENV}={path}: {e}. The provider must "
                "write it there before the worker starts."
            ) from e
    return token


def _stdin_to_devnull() -> None:
    """The user's code reads an empty stdin, as before credentials came on it."""
    try:
        fd = os.open(os.devnull, os.O_RDONLY)
        os.dup2(fd, 0)
        os.close(fd)
        sys.stdin = open(0, closefd=False)  # noqa: SIM115 - replaces the process's stdin for good
    except OSError:
        pass


def watch_preemption(w: Worker, source: str) -> Any:
    """On a cloud node: watch the cloud's metadata for a preemption notice and tell the control plane at once
    (it stops giving this worker inputs, requeues the ones it holds and starts a replacement)."""
    from cloudmodal.worker.preemption import watcher_from_env

    def on_notice(at: float) -> None:
        w.t.post(f"{w.base}/preempting", {"at": at, "source": source}, reconnect_timeout=10)

    return watcher_from_env(on_notice)


def main(token: str | None = None, restored: Restored | None = None) -> int:
    """Run this process as the worker its environment names. ``token``: already taken by the caller (the
    standby and snapshot paths); else :func:`take_token` finds it. ``restored``: see :meth:`Worker.setup`."""
    global _credentials
    from cloudmodal.settings import settings

    s = settings()
    url, worker_id = s.server_url, s.worker_id
    if not url or not worker_id:
        raise RuntimeError(
            "CLOUDMODAL_SERVER_URL and CLOUDMODAL_WORKER_ID are not set: a worker is started by a control "
            "plane's provider, which sets them."
        )
    taken = take_token()
    token = token or taken
    from cloudmodal.worker.snapshot import take_agent_path

    take_agent_path()
    _credentials = Credentials(url, token, worker_id)
    w = Worker(url, token, worker_id, s.worker_reconnect_s)

    def on_term(signum: int, _frame: Any) -> None:
        w.draining.set()
        # what is left to say (outputs, "stopped") gets TERM_GRACE_S to reach the control plane: an
        # orphaned worker whose control plane is gone exits instead of retrying for worker_reconnect_s
        w.t.give_up_at = time.monotonic() + TERM_GRACE_S
        with w._cond:
            w._cond.notify_all()

    signal.signal(signal.SIGTERM, on_term)
    watch_preemption(w, s.preemption_source or "")
    try:
        w.setup(restored)
    except BaseException:
        tb = traceback.format_exc()
        try:
            if sys.__stderr__ is not None:  # None when the process was started without a stderr
                sys.__stderr__.write(tb)
            w.log("stderr", tb.rstrip("\n"), None)
            w.flush_logs()
            w.t.post(
                f"{w.base}/stopped",
                {"reason": "startup failed: " + tb.strip().splitlines()[-1], "crashed": False},
                reconnect_timeout=10,
            )
        except Exception:
            pass
        return 1
    from cloudmodal.worker.exec_host import start_exec_host  # `cloudmodal shell` into this container

    start_exec_host(w)
    return w.run()
