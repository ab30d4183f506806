"""Which control plane this process talks to, and the lifetime of a running app."""

from __future__ import annotations

import contextlib
import io
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, overload

from cloudmodal import config
from cloudmodal.client.transport import Transport
from cloudmodal.client.unsupported import check_app
from cloudmodal.exception import ExecutionError, InvalidError
from cloudmodal.ids import new_id

EMBEDDED_WORKER_RECONNECT_S = 30.0
_lock = threading.RLock()
_current: Session | None = None


class Session:
    """A connection to one control plane (and the embedded one it started, if any)."""

    def __init__(self, transport: Transport, embedded: Any = None, tmpdir: str | None = None) -> None:
        self.transport = transport
        self.embedded = embedded
        self._tmpdir = tmpdir
        self._uploaded: dict[str, str] = {}

    def upload_blob(self, data: bytes) -> str:
        return self.transport.request("POST", "/v1/blobs", raw_body=data)["blob_id"]

    def download_blob(self, blob_id: str) -> bytes:
        return self.transport.request("GET", f"/v1/blobs/{blob_id}", raw_response=True)

    def upload_file(self, path: str) -> str:
        data = Path(path).read_bytes()
        key = f"{path}:{len(data)}:{hash(data)}"
        if key not in self._uploaded:
            self._uploaded[key] = self.upload_blob(data)
        return self._uploaded[key]

    def close(self) -> None:
        self.transport.close()
        if self.embedded is not None:
            self.embedded.stop(wait=False)  # its workers are stopped; the server winds down on its own
            self.embedded = None
        if self._tmpdir:
            shutil.rmtree(self._tmpdir, ignore_errors=True)


def in_worker() -> bool:
    from cloudmodal.settings import settings

    return bool(settings().worker_id)


@overload
def current_session(required: Literal[True] = True) -> Session: ...
@overload
def current_session(required: bool) -> Session | None: ...


def current_session(required: bool = True) -> Session | None:
    """The session of the running app; inside a worker, one to the worker's own control plane."""
    global _current
    with _lock:
        if _current is not None:
            return _current
        if in_worker():
            # The worker runtime holds its credentials (they are kept out of the environment, so the user's
            # code and its subprocesses do not see the token); a process it started has none of its own.
            runtime = sys.modules.get("cloudmodal.worker.runtime")
            creds = runtime.credentials() if runtime is not None else None
            from cloudmodal.tls import env_fingerprint

            if creds is not None:
                _current = Session(Transport(creds.url, creds.token, fingerprint=env_fingerprint()))
                return _current
            from cloudmodal.settings import settings

            s = settings()
            if s.server_url:
                _current = Session(Transport(s.server_url, s.token, fingerprint=env_fingerprint()))
                return _current
        ref = config.configured_server()
        if ref is not None:
            _current = Session(
                Transport(ref.url, ref.token, refresh_token=_refresher(ref), fingerprint=ref.fingerprint)
            )
            return _current
    if required:
        raise ExecutionError(
            "No control plane is configured and no app is running. Run your code with `cloudmodal run FILE`, "
            "inside `with app.run():`, or start one with `cloudmodal server start`."
        )
    return None


def _refresher(ref: config.ServerRef) -> Any:
    """For this machine's `cloudmodal server start`: its current owner token, after a restart replaced (and
    revoked) the one this process read."""
    if ref.source != "local-server":
        return None

    def token() -> str | None:
        now = config.local_server()
        return now.token if now is not None and now.url == ref.url else None

    return token


def connect(embedded_ok: bool = True) -> Session:
    """Use the configured control plane, or start an embedded one in this process."""
    global _current
    with _lock:
        existing = current_session(required=False)
        if existing is not None:
            return existing
        if not embedded_ok:
            raise ExecutionError("No control plane configured: start one with `cloudmodal server start`.")
        tmp = tempfile.mkdtemp(prefix="cloudmodal-embedded-")
        from cloudmodal.providers.local import start_standby

        # The local provider's first worker interpreter starts now, importing while the control plane does.
        start_standby(Path(tmp) / "workers")
        from cloudmodal.server.app import ServerHandle, default_settings
        from cloudmodal.settings import settings

        # An embedded control plane dies with this process: its workers should not wait ten minutes for it.
        quick = (
            {}
            if settings().is_set("worker_reconnect_s")
            else {"worker_reconnect_s": EMBEDDED_WORKER_RECONNECT_S}
        )
        # No anonymous access even here: another local user could reach this port. This process talks with
        # the handle's random owner token; its workers get worker tokens from the reconciler.
        handle = ServerHandle(
            default_settings(
                Path(tmp),
                database_url=f"sqlite:///{tmp}/cloudmodal.db",
                allow_loopback_anonymous=False,
                **quick,
            )
        ).start_in_thread()
        _current = Session(Transport(handle.url, handle.token), embedded=handle, tmpdir=tmp)
        return _current


def disconnect() -> None:
    global _current
    with _lock:
        if _current is not None:
            _current.close()
            _current = None


class WholeLines(io.TextIOBase):
    """Stands in for ``sys.stdout``/``sys.stderr`` while worker logs stream to the terminal: what the
    program prints reaches the real stream a whole line at a time, under the lock the log printer takes, so a
    worker's log line never lands in the middle of a ``print`` (which writes its pieces separately). A
    partial line goes out when the program flushes it (prompts, progress bars)."""

    def __init__(self, target: Any, lock: threading.Lock) -> None:
        self.target = target
        self.lock = lock
        self._partial: dict[int, str] = {}  # per thread: text after its last newline

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        tid = threading.get_ident()
        text = self._partial.pop(tid, "") + s
        head, nl, rest = text.rpartition("\n")
        if rest:
            self._partial[tid] = rest
        if nl:
            with self.lock:
                self.target.write(head + nl)
        return len(s)

    def flush(self) -> None:
        rest = self._partial.pop(threading.get_ident(), "")
        with self.lock:
            if rest:
                self.target.write(rest)
            self.target.flush()

    def __getattr__(self, name: str) -> Any:  # encoding, isatty(), fileno(): the real stream's
        return getattr(self.target, name)


class RunningApp:
    def __init__(self, session: Session, app_id: str, name: str) -> None:
        self.session = session
        self.app_id = app_id
        self.name = name
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.log_cursor = 0
        self._print_lock = threading.Lock()
        self._restore: tuple[Any, Any] | None = None  # the streams start_log_stream replaced

    def start_heartbeat(self, interval: float = 5.0) -> None:
        def beat() -> None:
            while not self._stop.wait(interval):
                try:
                    self.session.transport.post(
                        f"/v1/apps/{self.app_id}/heartbeat", reconnect_timeout=interval
                    )
                except Exception:
                    pass

        t = threading.Thread(target=beat, name="app-heartbeat", daemon=True)
        t.start()
        self._threads.append(t)

    def start_log_stream(self, out: Any = None) -> None:
        if out is None and not isinstance(sys.stdout, WholeLines):
            self._restore = (sys.stdout, sys.stderr)
            sys.stdout = WholeLines(sys.stdout, self._print_lock)
            sys.stderr = WholeLines(sys.stderr, self._print_lock)

        def stream() -> None:
            while not self._stop.is_set():
                try:
                    rows = self.session.transport.get(
                        f"/v1/apps/{self.app_id}/logs", after=self.log_cursor, timeout=1.0
                    )
                except Exception:
                    if self._stop.wait(0.5):
                        return
                    continue
                self._print_logs(rows, out)

        t = threading.Thread(target=stream, name="app-logs", daemon=True)
        t.start()
        self._threads.append(t)

    def _print_logs(self, rows: list[dict[str, Any]], out: Any) -> None:
        with self._print_lock:  # the streaming thread and the final flush may fetch the same rows
            rows = [r for r in rows if r["id"] > self.log_cursor]
            self._print_rows(rows, out)

    def _print_rows(self, rows: list[dict[str, Any]], out: Any) -> None:
        """Called with the print lock held: write to the real streams, past :class:`WholeLines`."""
        for r in rows:
            self.log_cursor = max(self.log_cursor, r["id"])
            stream = (out or _real(sys.stdout)) if r["stream"] == "stdout" else (out or _real(sys.stderr))
            stream.write(r["text"] if r["text"].endswith("\n") else r["text"] + "\n")
        if rows:
            (out or _real(sys.stdout)).flush()

    def restore_streams(self) -> None:
        """Put back the streams :meth:`start_log_stream` replaced (after the last logs are printed)."""
        restore, self._restore = self._restore, None
        if restore is not None:
            for proxy in (sys.stdout, sys.stderr):
                if isinstance(proxy, WholeLines):
                    proxy.flush()
            sys.stdout, sys.stderr = restore

    def flush_logs(self, out: Any = None, wait: float = 0.0) -> None:
        """Print the log lines the control plane has not shown yet. Workers send an input's lines before its
        result, so once the caller has its results nothing is missing; ``wait`` also waits for stragglers
        (lines printed after a result, e.g. by a background thread)."""
        deadline = time.time() + wait
        while True:
            try:
                rows = self.session.transport.get(
                    f"/v1/apps/{self.app_id}/logs", after=self.log_cursor, timeout=0.0
                )
            except Exception:
                return
            self._print_logs(rows, out)
            if not rows and time.time() >= deadline:
                return
            if not rows:
                time.sleep(0.05)

    def stop(self) -> None:
        self._stop.set()


def _real(stream: Any) -> Any:
    return stream.target if isinstance(stream, WholeLines) else stream


def _app_name(app: Any) -> str:
    return app.name or "ephemeral-app"


def register_app_functions(
    session: Session,
    app: Any,
    app_id: str,
    *,
    allow_cpu_fallback: bool = False,
    app_name: str | None = None,
    ephemeral: bool = True,
) -> list[str]:
    names = []
    for handle in list(app.registered_functions.values()) + list(app.registered_classes.values()):
        handle._register(session, app_id, allow_cpu_fallback=allow_cpu_fallback)
        handle._web_app = (app_name or _app_name(app), ephemeral)
        names.append(handle.spec.name)
    return names


def _app_extras(app: Any) -> dict[str, Any]:
    """An app's tags (cost grouping) and budget, as the control plane takes them."""
    out: dict[str, Any] = {}
    tags = getattr(app, "tags", None)
    if tags:
        out["tags"] = dict(tags)
    budget = getattr(app, "budget", None)
    if budget is not None:
        out["budget"] = budget.to_wire()
    return out


def web_endpoints(session: Session, app: Any, app_name: str, *, ephemeral: bool) -> list[tuple[str, str]]:
    """``(function or Cls.method, URL)`` of each web endpoint of ``app``, as served by ``session``'s control
    plane."""
    from cloudmodal.web_routes import endpoints, web_url

    out = []
    for handle in list(app.registered_functions.values()) + list(app.registered_classes.values()):
        spec = handle.spec
        for label, method, _web in endpoints(spec):
            where = f"{spec.name}.{method}" if method else spec.name
            out.append((where, web_url(session.transport.url, app_name, label, ephemeral=ephemeral)))
    return out


@contextlib.contextmanager
def run_app(
    app: Any,
    *,
    detach: bool = False,
    show_logs: bool | None = None,
    gpu_fallback: str | None = None,
    name: str | None = None,
) -> Iterator[RunningApp]:
    """Run an app ephemerally: register its functions, keep it alive, stop it (and its workers) at exit."""
    if gpu_fallback not in (None, "cpu"):
        raise InvalidError(f"gpu_fallback must be None or 'cpu', not {gpu_fallback!r}.")
    # Before anything exists on the control plane (or an embedded one starts).
    check_app(app, "run")
    from cloudmodal.settings import settings

    allow_cpu = gpu_fallback == "cpu" or settings().gpu_fallback == "cpu"
    session = connect()
    app_id = new_id("ap")
    session.transport.post(
        "/v1/apps", {"app_id": app_id, "name": name or _app_name(app), "ephemeral": True, **_app_extras(app)}
    )
    running = RunningApp(session, app_id, name or _app_name(app))
    app._running = running
    try:
        register_app_functions(
            session, app, app_id, allow_cpu_fallback=allow_cpu, app_name=running.name, ephemeral=True
        )
        running.start_heartbeat()
        if show_logs if show_logs is not None else _output_enabled():
            running.start_log_stream()
        yield running
    finally:
        running.stop()
        if show_logs if show_logs is not None else _output_enabled():
            running.flush_logs()
        running.restore_streams()
        if not detach:
            with contextlib.suppress(Exception):
                session.transport.post(f"/v1/apps/{app_id}/stop", reconnect_timeout=5.0)
        app._running = None
        for h in list(app.registered_functions.values()) + list(app.registered_classes.values()):
            h._unregister()
        if session.embedded is not None:
            disconnect()


def deploy(app: Any, *, name: str | None = None, allow_cpu_fallback: bool = False) -> dict[str, Any]:
    """Deploy an app to the configured control plane; its functions stay callable by name."""
    name = name or app.name
    if not name:
        raise InvalidError(
            'A deployed app needs a name: `cloudmodal.App("my-app")` or `cloudmodal deploy --name NAME`.'
        )
    check_app(app, "deploy")
    session = current_session()
    assert session is not None
    info = session.transport.post(
        "/v1/apps", {"app_id": new_id("ap"), "name": name, "ephemeral": False, **_app_extras(app)}
    )
    app_id = info["id"]
    names = register_app_functions(
        session, app, app_id, allow_cpu_fallback=allow_cpu_fallback, app_name=name, ephemeral=False
    )
    version = session.transport.post(f"/v1/apps/{app_id}/deployments", {"functions": names})["version"]
    urls = web_endpoints(session, app, name, ephemeral=False)
    for h in list(app.registered_functions.values()) + list(app.registered_classes.values()):
        h._unregister()
    return {"app_id": app_id, "name": name, "version": version, "functions": names, "web_endpoints": urls}


_OUTPUT_ENABLED = False


def _output_enabled() -> bool:
    return _OUTPUT_ENABLED


@contextlib.contextmanager
def enable_output() -> Iterator[None]:
    """Show worker logs and map progress (``cloudmodal run`` does this for you)."""
    global _OUTPUT_ENABLED
    prev = _OUTPUT_ENABLED
    _OUTPUT_ENABLED = True
    try:
        yield
    finally:
        _OUTPUT_ENABLED = prev
