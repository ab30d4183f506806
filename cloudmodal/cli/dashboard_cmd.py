"""`cloudmodal dashboard`: the address of the control plane's dashboard, with this session's token."""

from __future__ import annotations

import html
import os
import shutil
import tempfile
import webbrowser
from pathlib import Path
from urllib.parse import quote

import typer

from cloudmodal.cli.errors import fail


def dashboard_url(server_url: str, token: str) -> str:
    """The dashboard's address: the token goes after ``#``, which browsers never send to a server."""
    return f"{server_url.rstrip('/')}/dashboard#token={quote(token, safe='')}"


def _redirect_file(url: str) -> Path:
    """A page that sends the browser on to ``url``, readable by this user only: a browser started with the
    address itself would show the token to every local user in its command line (``ps``)."""
    folder = Path(tempfile.mkdtemp(prefix="cloudmodal-dashboard-"))  # 0700
    path = folder / "open.html"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    link = html.escape(url, quote=True)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(
            '<!doctype html><meta charset="utf-8"><meta name="referrer" content="no-referrer">'
            f'<meta http-equiv="refresh" content="0;url={link}">'
            f'<title>cloudmodal dashboard</title><a href="{link}">Open the cloudmodal dashboard</a>\n'
        )
    return path


def dashboard_command(
    open_browser: bool = typer.Option(False, "--open", help="Also open it in a web browser."),
) -> None:
    """Print the address of the control plane's dashboard (costs, running workers, placement events), with
    this session's token after '#'."""
    from cloudmodal import config

    ref = config.configured_server()
    if ref is None:
        fail(
            "No control plane is configured: start one with `cloudmodal server start`, or set "
            "CLOUDMODAL_SERVER_URL and CLOUDMODAL_TOKEN."
        )
        return
    if not ref.token:
        fail(
            f"No token for {ref.url}: set CLOUDMODAL_TOKEN (the control plane's owner makes one with "
            "`cloudmodal token create`)."
        )
        return
    url = dashboard_url(ref.url, ref.token)
    typer.echo(url)
    typer.secho("The address holds your token: share it as you would the token.", err=True, dim=True)
    if open_browser:
        page = _redirect_file(url)
        if not webbrowser.open(page.as_uri()):
            shutil.rmtree(page.parent, ignore_errors=True)
            typer.secho("No web browser could be started here: open the address above.", err=True)
