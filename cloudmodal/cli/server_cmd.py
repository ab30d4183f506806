"""`cloudmodal server start|stop|status|token`: a long-lived control plane on this machine."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import typer

from cloudmodal import config
from cloudmodal.cli.errors import fail, user_errors

app = typer.Typer(help="Run a long-lived control plane on this machine.", no_args_is_help=True)


def _write_info(info: dict[str, object]) -> None:
    f = config.server_file()
    tmp = f.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(info, fh)
    os.replace(tmp, f)


@app.command("start")
def start(
    host: str = typer.Option(
        "127.0.0.1", help="Address to listen on. Anything but loopback requires tokens for every request."
    ),
    port: int = typer.Option(8765, help="Port to listen on (0 = any free port)."),
    database_url: str = typer.Option(
        None, envvar="CLOUDMODAL_DATABASE_URL", help="SQLAlchemy URL (default: SQLite in CLOUDMODAL_HOME)."
    ),
    foreground: bool = typer.Option(
        False, "--foreground", help="Serve in this process instead of in the background."
    ),
) -> None:
    """Start the control plane (in the background unless --foreground)."""
    ref = config.configured_server()
    if ref is not None and ref.source == "local-server" and not foreground:
        typer.echo(f"A control plane is already running at {ref.url}.")
        return
    if not foreground:
        log_path = config.home() / "server.log"
        argv = [
            sys.executable,
            "-m",
            "cloudmodal.cli.main",
            "server",
            "start",
            "--foreground",
            "--host",
            host,
            "--port",
            str(port),
        ]
        if database_url:
            argv += ["--database-url", database_url]
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True
            )
        deadline = time.time() + 30
        while time.time() < deadline:
            ref = config.configured_server()
            if ref is not None and ref.source == "local-server":
                typer.echo(f"Control plane running at {ref.url} (pid {proc.pid}); logs in {log_path}.")
                return
            if proc.poll() is not None:
                fail(f"The control plane exited with code {proc.returncode}; see {log_path}.")
            time.sleep(0.1)
        fail(f"The control plane did not start within 30 s; see {log_path}.")
    from cloudmodal.server.app import ServerHandle, default_settings
    from cloudmodal.server.auth import is_loopback

    with user_errors():
        settings = default_settings(config.home(), database_url=database_url, allow_loopback_anonymous=True)
        handle = ServerHandle(settings, host=host, port=port)
        token = handle.cp.tokens.create("admin", "server start")
        _write_info(
            {
                "url": handle.url,
                "pid": os.getpid(),
                "token": token,
                "host": host,
                "port": handle.port,
                "database_url": settings.database_url,
            }
        )
        if not is_loopback(host):
            typer.echo(
                "Listening beyond loopback: every request needs a bearer token (see ~/.cloudmodal/server.json).",
                err=True,
            )

        def on_term(*_: object) -> None:
            handle.server.should_exit = True

        signal.signal(signal.SIGTERM, on_term)
        typer.echo(f"cloudmodal control plane on {handle.url}")
        try:
            handle.serve_forever()
        finally:
            f = config.server_file()
            try:
                if json.loads(f.read_text()).get("pid") == os.getpid():
                    f.unlink()
            except (OSError, ValueError):
                pass


@app.command("stop")
def stop() -> None:
    """Stop the background control plane (its workers drain and stop)."""
    f = config.server_file()
    if not f.exists():
        typer.echo("No control plane is running.")
        return
    info = json.loads(f.read_text())
    pid = int(info["pid"])
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        f.unlink(missing_ok=True)
        typer.echo("No control plane is running (removed a stale record).")
        return
    deadline = time.time() + 30
    while time.time() < deadline and config._alive(pid):
        time.sleep(0.1)
    if config._alive(pid):
        os.kill(pid, signal.SIGKILL)
    f.unlink(missing_ok=True)
    typer.echo(f"Stopped the control plane (pid {pid}).")


@app.command("status")
def status() -> None:
    """Show which control plane this machine uses and whether it answers."""
    from cloudmodal.client.transport import Transport

    ref = config.configured_server()
    if ref is None:
        typer.echo(
            "No control plane configured or running: `cloudmodal run` starts an embedded one per run; `cloudmodal server start` starts a long-lived one."
        )
        raise typer.Exit(1)
    try:
        t = Transport(ref.url, ref.token, reconnect_timeout=2)
        health = t.get("/healthz")
        apps = t.get("/v1/apps", all=False)
    except Exception as e:
        fail(f"Control plane at {ref.url} does not answer: {e}")
        return
    role = {
        True: "it scales the pools",
        False: "standby: another control plane on its database scales the pools",
    }.get(health.get("reconciling"), "")
    typer.echo(
        f"Control plane at {ref.url} ({ref.source}): up, {len(apps)} running/deployed app(s)"
        + (f"; {role}." if role else ".")
    )


@app.command("token")
def token() -> None:
    """Print a new admin token for clients on other machines (store it; it is shown once)."""
    from cloudmodal.client.session import current_session

    with user_errors():
        s = current_session()
        assert s is not None
        typer.echo(s.transport.post("/v1/tokens")["token"])


def ensure_server() -> None:
    """`deploy` needs a long-lived control plane: use the configured one or start a local one."""
    if config.configured_server() is not None:
        return
    typer.echo(
        "No control plane running; starting one on this machine (`cloudmodal server stop` stops it).",
        err=True,
    )
    start(host="127.0.0.1", port=0, database_url=None, foreground=False)
