"""`cloudmodal server start|stop|status|token`: a long-lived control plane on this machine."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

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


ANONYMOUS_WARNING = (
    "WARNING: --allow-anonymous-loopback: any request from this machine's loopback address is the owner of "
    "this control plane, without a token. Every local user, and anything that forwards traffic to loopback "
    "(a reverse proxy, an SSH tunnel, a container port mapping), can then deploy and run code as this "
    "account and read its secrets. Use it only on a single-user machine with no such forwarders."
)


def _owner_token_id(cp: Any, token: str) -> str | None:
    """The id of a live owner token (None if unknown here, revoked already, or not an owner's)."""
    who = cp.tokens.identify(token)
    return who.principal if who is not None and who.kind == "owner" else None


def _revoke_earlier_owner_token(cp: Any) -> None:
    """An earlier `server start` of this state dir left its owner token in server.json (it was killed before
    it could revoke it): revoke it before the file is replaced, or whoever read it keeps owner access."""
    # Versions before owner tokens were per-process named theirs so and never revoked them.
    cp.tokens.revoke_named("server start", "owner")
    try:
        previous = json.loads(config.server_file().read_text())
    except (OSError, ValueError):
        return
    token = previous.get("token") if isinstance(previous, dict) else None
    if not isinstance(token, str) or not token:
        return
    token_id = _owner_token_id(cp, token)
    if token_id is not None:
        cp.tokens.revoke(token_id)
    elif previous.get("database_url") not in (None, cp.settings.database_url):
        # (not naming that database: its URL may hold a password, and this goes to the terminal and log)
        typer.echo(
            "Note: the previous control plane of this state dir used another database; its owner token "
            "there stays valid until revoked with `cloudmodal token revoke` against that control plane.",
            err=True,
        )


@app.command("start")
def start(
    host: str = typer.Option(
        "127.0.0.1", help="Address to listen on. Anything but loopback requires tokens for every request."
    ),
    port: int = typer.Option(8765, help="Port to listen on (0 = any free port)."),
    database_url: str | None = typer.Option(
        None, envvar="CLOUDMODAL_DATABASE_URL", help="SQLAlchemy URL (default: SQLite in CLOUDMODAL_HOME)."
    ),
    foreground: bool = typer.Option(
        False, "--foreground", help="Serve in this process instead of in the background."
    ),
    allow_anonymous_loopback: bool = typer.Option(
        False,
        "--allow-anonymous-loopback",
        help="Let requests from loopback in without a token, as the owner. Unsafe on a machine with other "
        "users or anything forwarding to loopback; by default every request needs a token (the CLI of this "
        "account reads the owner token from server.json in the state dir).",
    ),
    tls: bool | None = typer.Option(
        None,
        "--tls/--no-tls",
        help="Serve HTTPS. Without --tls-cert: with a self-signed certificate generated on first start "
        "(kept in the state dir, reused later), whose fingerprint clients and workers pin. Default: on when "
        "--host is not loopback (--no-tls: plain HTTP behind a TLS-terminating proxy), off on loopback.",
    ),
    tls_cert: str | None = typer.Option(
        None,
        "--tls-cert",
        help="Serve HTTPS with this PEM certificate (its chain after it); needs --tls-key.",
    ),
    tls_key: str | None = typer.Option(
        None, "--tls-key", help="The unencrypted PEM private key of --tls-cert (keep it 0600)."
    ),
    public_url: str | None = typer.Option(
        None,
        "--public-url",
        envvar="CLOUDMODAL_PUBLIC_URL",
        help="The one address of several replicas on one database (a load balancer in front of them): workers "
        "are given it instead of this replica's own, so they reconnect to a replica that still runs.",
    ),
) -> None:
    """Start the control plane (in the background unless --foreground). It writes an owner token to
    server.json (mode 0600) in the state dir for the CLI and clients of this account."""
    from cloudmodal.server.auth import is_loopback

    if (tls_cert is None) != (tls_key is None):
        fail("--tls-cert and --tls-key go together: give the certificate and its private key.", 2)
    if tls_cert is not None and tls is False:
        fail("--no-tls with --tls-cert: choose one.", 2)
    serve_tls = tls_cert is not None or (tls if tls is not None else not is_loopback(host))
    if allow_anonymous_loopback:
        typer.secho(ANONYMOUS_WARNING, fg="red", err=True)
    if not serve_tls and not is_loopback(host):
        typer.secho(
            "WARNING: --no-tls beyond loopback: tokens and code travel in clear text. Use it only behind a "
            "proxy that terminates TLS on this machine or a private network you trust.",
            fg="yellow",
            err=True,
        )
    ref = config.local_server()
    if ref is not None and not foreground:
        typer.echo(f"A control plane is already running at {ref.url}.")
        return
    home = config.home()  # private (0700): it holds the owner token and the database
    if not foreground:
        log_path = home / "server.log"
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
        if public_url:
            argv += ["--public-url", public_url]
        if allow_anonymous_loopback:
            argv.append("--allow-anonymous-loopback")
        if tls_cert is not None and tls_key is not None:
            argv += ["--tls-cert", os.path.abspath(tls_cert), "--tls-key", os.path.abspath(tls_key)]
        else:
            argv.append("--tls" if serve_tls else "--no-tls")
        with config.open_private(log_path, "ab") as log:  # 0600, also if an older version made it 0644
            log_start = log.tell()
            proc = subprocess.Popen(
                argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True
            )
        deadline = time.time() + 30
        while time.time() < deadline:
            ref = config.local_server()
            if ref is not None:
                typer.echo(f"Control plane running at {ref.url} (pid {proc.pid}); logs in {log_path}.")
                if ref.fingerprint:
                    typer.echo(_tls_lines(ref.fingerprint, host, ref.url))
                return
            if proc.poll() is not None:
                fail(
                    f"The control plane exited with code {proc.returncode}"
                    + _log_tail(log_path, log_start)
                    + f"\n(the whole log: {log_path})"
                )
            time.sleep(0.1)
        fail(f"The control plane did not start within 30 s; see {log_path}.")
    # Everything this process writes (database, WAL, blobs, worker state) is for this account only.
    os.umask(0o077)
    from cloudmodal.server.app import ServerHandle, default_settings

    with user_errors():
        cert = _server_cert(home, host, tls_cert, tls_key) if serve_tls else None
        if public_url is not None and not public_url.startswith(("http://", "https://")):
            fail(
                f"--public-url {public_url!r}: give an http:// or https:// URL, e.g. https://cp.example.com:8765.",
                2,
            )
        extra = {"public_url": public_url.rstrip("/")} if public_url else {}
        settings = default_settings(
            home, database_url=database_url, allow_loopback_anonymous=allow_anonymous_loopback, **extra
        )
        # applies pending migrations (see migrate)
        handle = ServerHandle(settings, host=host, port=port, tls=cert)
        upgraded = handle.cp.db.upgraded
        if upgraded is not None and not upgraded.created:
            typer.echo(f"{upgraded.describe()}.", err=True)
        _revoke_earlier_owner_token(handle.cp)
        own_token_id = _owner_token_id(handle.cp, handle.token)
        _write_info(
            {
                "url": handle.url,
                "pid": os.getpid(),
                "token": handle.token,
                "host": host,
                "port": handle.port,
                "database_url": settings.database_url,
                "tls_fingerprint": cert.fingerprint if cert is not None else None,
                "tls_cert": str(cert.cert_path) if cert is not None else None,
            }
        )
        if cert is not None:
            typer.echo(_tls_lines(cert.fingerprint, host, handle.url, cert), err=True)
        if not is_loopback(host):
            typer.echo(
                f"Listening beyond loopback: every request needs a bearer token (the owner token is in "
                f"{config.server_file()}; `cloudmodal token create` makes tokens for others).",
                err=True,
            )

        def on_term(*_: object) -> None:
            handle.server.should_exit = True

        signal.signal(signal.SIGTERM, on_term)
        typer.echo(f"cloudmodal control plane on {handle.url}")
        try:
            handle.serve_forever()
        finally:
            # The owner token dies with this process: the next start mints its own.
            if own_token_id is not None:
                try:
                    handle.cp.tokens.revoke(own_token_id)
                except Exception as e:
                    typer.echo(
                        f"Could not revoke this control plane's owner token ({e}); revoke it with "
                        f"`cloudmodal token revoke {own_token_id}` once the database answers.",
                        err=True,
                    )
            f = config.server_file()
            try:
                if json.loads(f.read_text()).get("pid") == os.getpid():
                    f.unlink()
            except (OSError, ValueError):
                pass


def _server_cert(home: Any, host: str, tls_cert: str | None, tls_key: str | None) -> Any:
    from cloudmodal import tls

    if tls_cert is not None and tls_key is not None:
        return tls.given_cert(tls_cert, tls_key)
    return tls.self_signed(home, host)


def _tls_lines(fingerprint: str, host: str, url: str, cert: Any = None) -> str:
    """What `server start` says about its certificate: the fingerprint, and how clients trust it."""
    from urllib.parse import urlsplit

    from cloudmodal.tls import display_fingerprint

    port = urlsplit(url).port
    where = host if host not in ("0.0.0.0", "::", "") else "<this machine's address>"
    where = f"[{where}]" if ":" in where else where
    origin = ""
    if cert is not None:
        origin = (
            f" (self-signed, {'generated now' if cert.generated else 'reused'}: {cert.cert_path})"
            if cert.self_signed
            else f" ({cert.cert_path})"
        )
    return (
        f"TLS certificate SHA-256 fingerprint: {display_fingerprint(fingerprint)}{origin}\n"
        f"Clients trust it with `cloudmodal login https://{where}:{port} --fingerprint {fingerprint}` "
        "(or CLOUDMODAL_TLS_FINGERPRINT); workers this control plane starts pin it themselves."
    )


def _log_tail(path: Any, start: int, lines: int = 15) -> str:
    """The last lines the control plane wrote to its log since ``start`` (where its error is), as ':\n...'."""
    try:
        with open(path, "rb") as fh:
            fh.seek(start)
            text = fh.read().decode(errors="replace").strip()
    except OSError:
        return ""
    return (":\n" + "\n".join(text.splitlines()[-lines:])) if text else ""


@app.command("migrate")
def migrate(
    database_url: str | None = typer.Option(
        None, envvar="CLOUDMODAL_DATABASE_URL", help="SQLAlchemy URL (default: SQLite in CLOUDMODAL_HOME)."
    ),
    check: bool = typer.Option(
        False,
        "--check",
        help="Only say whether the database needs migrating (exit 1 if it does); change nothing.",
    ),
) -> None:
    """Bring the control plane's database to this release's schema (`server start` does it too). Stop the
    control planes that use it first: they run the previous release's code."""
    from pathlib import Path

    from sqlalchemy import create_engine
    from sqlalchemy.pool import NullPool

    from cloudmodal.server import migrations

    url = database_url or f"sqlite:///{config.home() / 'cloudmodal.db'}"
    with user_errors():
        if check:
            engine = create_engine(url, poolclass=NullPool)
            database = engine.url.database
            if engine.url.get_backend_name() == "sqlite" and not (database and Path(database).exists()):
                typer.echo(
                    f"No database at {database}: a control plane creates it at schema revision "
                    f"{migrations.HEAD} when it starts."
                )
                return
            revision = migrations.stored_revision(engine)
            engine.dispose()
            if revision == migrations.HEAD:
                typer.echo(f"The database is at schema revision {revision}, this release's.")
                return
            if revision is not None and migrations.is_newer(revision):
                fail(migrations.newer_message(revision, ""))
            typer.echo(
                f"The database is at schema revision {revision or 'none (0.1.0, or empty)'}; this release "
                f"needs {migrations.HEAD}: `cloudmodal server migrate` upgrades it."
            )
            raise typer.Exit(1)
        from cloudmodal.server.db import Database

        db = Database(url)
        db.dispose()
        if db.upgraded is None:
            typer.echo(
                f"The database is at schema revision {migrations.HEAD}, this release's: nothing to do."
            )
        else:
            typer.echo(f"{db.upgraded.describe()}.")


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
        t = Transport(ref.url, ref.token, reconnect_timeout=2, fingerprint=ref.fingerprint)
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
    if ref.fingerprint:
        from cloudmodal.tls import display_fingerprint

        typer.echo(f"TLS certificate SHA-256 fingerprint (pinned): {display_fingerprint(ref.fingerprint)}")
    elif ref.url.startswith("https://"):
        typer.echo("TLS certificate verified by the system's certificate authorities (no pin).")


@app.command("token")
def token() -> None:
    """Print a new owner token, e.g. for your own clients on other machines (a shortcut for `cloudmodal token
    create --owner`). It is shown once; give others member tokens (`cloudmodal token create`)."""
    from cloudmodal.cli.token_cmd import create_token

    typer.echo(create_token("owner", None, "server token")["token"])


def ensure_server() -> None:
    """`deploy` needs a long-lived control plane: use the configured one or start a local one."""
    if config.configured_server() is not None:
        return
    typer.echo(
        "No control plane running; starting one on this machine (`cloudmodal server stop` stops it).",
        err=True,
    )
    start(
        host="127.0.0.1",
        port=0,
        database_url=None,
        foreground=False,
        allow_anonymous_loopback=False,
        tls=None,
        tls_cert=None,
        tls_key=None,
    )
