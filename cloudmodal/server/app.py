"""Assemble and run a control plane: embedded (a thread in the CLI process) or long-lived (`server start`)."""

from __future__ import annotations

import logging
import socket
import threading
import time
from pathlib import Path
from typing import Any

import uvicorn

from cloudmodal.server.api import build_asgi
from cloudmodal.server.limits import http_protocol
from cloudmodal.server.service import ControlPlane, Settings
from cloudmodal.tls import ServerCert


def default_settings(state_dir: Path, database_url: str | None = None, **overrides: Any) -> Settings:
    from cloudmodal.config import private_dir

    private_dir(state_dir)
    from cloudmodal.settings import settings as env_settings

    env = env_settings()
    url = database_url or env.database_url or f"sqlite:///{state_dir / 'cloudmodal.db'}"
    env_overrides: dict[str, Any] = {
        key: getattr(env, key)
        for key in (
            "lease_s",
            "worker_timeout_s",
            "heartbeat_s",
            "worker_reconnect_s",
            "retention_calls_ephemeral_s",
            "retention_calls_deployed_s",
            "retention_logs_ephemeral_s",
            "retention_logs_deployed_s",
            "retention_interval_s",
            "ledger_accrual_s",
            "public_url",
        )
        if env.is_set(key)
    }
    if env.blob_dir is not None:
        env_overrides["blob_dir"] = env.blob_dir
    if env.blob_store is not None:
        env_overrides["blob_store"] = env.blob_store
    if env.is_set("kv_synchronous_commit"):
        env_overrides["kv_durable"] = env.kv_synchronous_commit == "on"
    return Settings(database_url=url, state_dir=state_dir, **(env_overrides | overrides))


def make_providers(settings: Settings) -> dict[str, Any]:
    """The enabled providers: ``CLOUDMODAL_PROVIDERS`` (comma-separated; default ``local``)."""
    from cloudmodal.exception import InvalidError
    from cloudmodal.providers.clouds import CLOUDS, driver_class
    from cloudmodal.settings import settings as env_settings

    env = env_settings()
    names = list(env.providers if env.is_set("providers") else settings.providers)
    out: dict[str, Any] = {}
    for name in names:
        if name == "local":
            from cloudmodal.providers.local import LocalProvider

            out[name] = LocalProvider(state_dir=settings.state_dir / "workers", standby=True)
        elif name == "sim":
            from cloudmodal.providers.sim import SimProvider

            out[name] = SimProvider.from_env(state_dir=settings.state_dir / "sim")
        elif name in CLOUDS:
            from cloudmodal.infra.outputs import driver_options
            from cloudmodal.providers.cloud import CloudProvider

            # what `cloudmodal infra up` made for this cloud (the workers' instance profile, network), if any
            out[name] = CloudProvider(
                driver_class(name)(**driver_options(name, env.home)),
                state_dir=settings.state_dir / "clouds" / name,
                node_server_url=env.node_server_url,
                ssh_config=str(env.ssh_config) if env.ssh_config is not None else None,
                node_python=env.node_python,
                ssh_user=env.node_ssh_user,
                bootstrap_options=(
                    {"system_site_packages": True, "install_dependencies": False}
                    if env.node_prepared
                    else None
                ),
            )
        else:
            raise InvalidError(
                f"Unknown provider {name!r} in CLOUDMODAL_PROVIDERS; available: local, sim, {', '.join(CLOUDS)}."
            )
    if "local" not in out:
        from cloudmodal.providers.local import LocalProvider

        out["local"] = LocalProvider(state_dir=settings.state_dir / "workers", standby=True)  # CPU-only work
    return out


class ServerHandle:
    """A control plane serving HTTP on a bound socket, with its reconciler."""

    def __init__(
        self,
        settings: Settings,
        host: str = "127.0.0.1",
        port: int = 0,
        providers: dict[str, Any] | None = None,
        tls: ServerCert | None = None,
    ) -> None:
        """``tls``: serve HTTPS with this certificate (:mod:`cloudmodal.tls`); its fingerprint is handed to the
        workers, which pin it."""
        self.settings = settings
        self.tls = tls
        self.tls_fingerprint = tls.fingerprint if tls is not None else None
        self.cp = ControlPlane(settings)
        # An owner token for this process's own clients (the embedded default's, tests'); a long-lived
        # `server start` writes it to the 0600 server.json for the CLI of the same account.
        self.token = self.cp.tokens.create("owner", "control plane")
        # IPPROTO_TCP explicitly: asyncio only sets TCP_NODELAY on accepted sockets of a TCP-protocol listener;
        # without it every response waits ~40 ms for the client's delayed ACK.
        self.sock = socket.socket(
            socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP
        )
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.bind((host, port))
        self.sock.listen(1024)
        self.host = host
        self.port = self.sock.getsockname()[1]
        connect_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        self.url = f"{'https' if tls is not None else 'http'}://{connect_host}:{self.port}"
        from cloudmodal.server.reconciler import Reconciler

        # Workers are given the replicas' one address where there is one (Settings.public_url): they reconnect
        # to it, and so to a replica that still runs, when this one goes.
        self.reconciler = Reconciler(
            self.cp,
            providers if providers is not None else make_providers(settings),
            (settings.public_url or self.url).rstrip("/"),
        )
        self.reconciler.tls_fingerprint = self.tls_fingerprint  # into workers' environment (see Launcher)
        self.cp.reconciler = self.reconciler
        self.api = build_asgi(self.cp)
        from cloudmodal.server.web_gateway import WebGateway

        self.web = WebGateway(self.cp, self.api)
        self.cp.web = self.web
        config = uvicorn.Config(
            self.web.wrap(self.api),
            # closes connections whose request headers do not arrive in time (slow clients)
            http=http_protocol(self.api.limits),
            log_level="warning",
            access_log=False,
            lifespan="on",
            timeout_keep_alive=65,
            # the client address is the socket's: X-Forwarded-For from a same-host proxy must not make a
            # remote client look like loopback
            proxy_headers=False,
            # a message is a WebSocket route's body: the largest of their caps (a worker's claim carries outputs)
            ws_max_size=max(r.max_body or 0 for r in self.api.routes if r.websocket),
            ws_per_message_deflate=False,  # pickles compress poorly; deflate would cost every message
            ssl_certfile=str(tls.cert_path) if tls is not None else None,
            ssl_keyfile=str(tls.key_path) if tls is not None else None,
        )
        self.server = uvicorn.Server(config)
        on_signal = self.server.handle_exit

        def handle_exit(sig: int, frame: Any) -> None:  # SIGINT/SIGTERM of a long-lived `server start`
            self.cp.hub.close()
            on_signal(sig, frame)

        self.server.handle_exit = handle_exit  # type: ignore[method-assign]
        self._thread: threading.Thread | None = None
        self._detached = False
        self.cp.hub.notify = _chain_wake(self.cp.hub.notify, self.reconciler)  # type: ignore[method-assign]

    def start_in_thread(self) -> ServerHandle:
        # uvicorn (>= 0.29) installs signal handlers only when it runs on the main thread, never here
        self._thread = threading.Thread(target=self._serve, name="control-plane", daemon=True)
        self._thread.start()
        deadline = time.time() + 15
        while not self.server.started:
            if time.time() > deadline or not self._thread.is_alive():
                raise RuntimeError("The embedded control plane did not start.")
            time.sleep(0.005)
        self.reconciler.start()
        return self

    def serve_forever(self) -> None:
        """Serve on this thread until a signal stops the server: this process is the control plane's (``server
        start``), so its garbage collector is tuned for serving (:mod:`.gc_tuning`)."""
        from cloudmodal.server.gc_tuning import ServerGC

        gc_tuning = ServerGC()
        gc_tuning.install()
        self.reconciler.start()
        try:
            self.server.run(sockets=[self.sock])
        finally:
            self.reconciler.stop()
            gc_tuning.uninstall()

    def _serve(self) -> None:
        try:
            self.server.run(sockets=[self.sock])
        finally:
            if self._detached:  # stop(wait=False): nobody joins this thread, so it closes up itself
                self._close()

    def stop(self, *, wait: bool = True) -> None:
        """Stop the reconciler (and its workers), then the server. ``wait=False``: return once the workers
        are stopped and let the server finish its shutdown (~0.2 s: uvicorn's ticks) on its own thread; an
        embedded control plane whose client is done has nobody left to answer."""
        self.reconciler.stop()
        self.cp.hub.close()  # long polls answer now instead of holding the shutdown for their timeouts
        if not wait and self._thread is not None and self._thread.is_alive():
            self._detached = True
            self.server.should_exit = True
            return
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._close()

    def _close(self) -> None:
        self.sock.close()
        self.cp.commits.close()
        self.cp.db.dispose()


def _chain_wake(notify: Any, reconciler: Any) -> Any:
    def wrapped(*keys: str) -> None:
        notify(*keys)
        if "reconcile" in keys:
            reconciler.wake()

    return wrapped


def quiet_logs() -> None:
    logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
