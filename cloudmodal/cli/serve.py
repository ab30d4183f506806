"""`cloudmodal serve FILE`: run an app's web endpoints ephemerally and reload them whenever its source changes.

The app runs as ``cloudmodal run`` runs one (an ephemeral app, stopped with its workers when this command
ends), and its endpoints are served at ``…/web/APP-dev/LABEL/``. The directory of FILE is watched with
watchfiles, whose debounce gathers a storm of saves into one change; each change re-imports FILE and
registers its functions again in the same app. A function whose definition changed gets a new version: the
control plane sends new requests only to workers of that version and drains the old ones, so the next
request after a save is answered by the new code. A file that no longer imports (a syntax error half-way
through an edit) is reported, and the last good version keeps serving until the next save.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path
from typing import Any

import typer

from cloudmodal.cli.errors import user_errors

DEBOUNCE_MS = 400  # how long watchfiles gathers changes after the first one before reporting them together


def serve_command(
    app_ref: str = typer.Argument(..., help="FILE.py defining a cloudmodal.App with web endpoints."),
    name: str = typer.Option(
        None, "--name", "-n", help="Name of the ephemeral app (default: the App's name)."
    ),
    timeout: float = typer.Option(
        None, "--timeout", min=0.1, help="Stop serving after this many seconds (default: until Ctrl-C)."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Don't stream the workers' logs."),
) -> None:
    """Serve FILE's web endpoints on an ephemeral app, reloading them when the source changes."""
    from cloudmodal.cli.imports import find_app, import_file, parse_ref
    from cloudmodal.client.session import run_app, web_endpoints

    with user_errors():
        path, _ = parse_ref(app_ref)
        module = import_file(path)
        app = find_app(module, path)
        with run_app(app, name=name, show_logs=not quiet) as running:
            urls = web_endpoints(running.session, app, running.name, ephemeral=True)
            if not urls:
                typer.secho(f"{path} defines no web endpoints; serving its functions anyway.", err=True)
            _print_urls(urls)
            typer.echo(f"Watching {path.resolve().parent} for changes; Ctrl-C stops serving.", err=True)
            stop = threading.Event()
            if timeout is not None:
                threading.Timer(timeout, stop.set).start()
            try:
                _watch(path, running, stop)
            except KeyboardInterrupt:
                pass
            typer.echo("Stopping the app.", err=True)


def _print_urls(urls: list[tuple[str, str]]) -> None:
    for where, url in urls:
        typer.echo(f"  • {where} => {url}", err=True)


def _watch(path: Path, running: Any, stop: threading.Event) -> None:
    """Reload on every batch of changes under ``path``'s directory until ``stop`` is set."""
    from watchfiles import PythonFilter, watch

    root = path.resolve().parent
    for changes in watch(
        root, watch_filter=PythonFilter(), debounce=DEBOUNCE_MS, stop_event=stop, yield_on_timeout=False
    ):
        changed = sorted({Path(p).name for _kind, p in changes})
        typer.echo(f"Changed: {', '.join(changed)}; reloading.", err=True)
        started = time.monotonic()
        if reload_app(path, running):
            typer.echo(f"Reloaded in {time.monotonic() - started:.2f}s.", err=True)


def reload_app(path: Path, running: Any) -> bool:
    """Import ``path`` again and register its app's functions in the running app. False (reported) when the
    file does not import or defines no app: the previous version keeps serving."""
    from cloudmodal.cli.imports import find_app, import_file
    from cloudmodal.client.session import register_app_functions
    from cloudmodal.client.unsupported import check_app

    try:
        module = import_file(path)
        app = find_app(module, path)
        check_app(app, "serve")
    except Exception as e:
        typer.secho(
            f"{path} did not reload ({type(e).__name__}: {e}); still serving the last version.",
            fg="red",
            err=True,
        )
        return False
    try:
        register_app_functions(running.session, app, running.app_id, app_name=running.name, ephemeral=True)
    except Exception as e:
        typer.secho(f"The reloaded app was refused: {e}; still serving the last version.", fg="red", err=True)
        return False
    sys.stdout.flush()
    return True
