"""`cloudmodal token create|list|revoke`: who may use the control plane.

Owner tokens may do everything, including managing tokens; member tokens deploy, run and call apps (all of
them, or the apps named with ``--app``). Only an owner token (the CLI of the account that ran ``cloudmodal
server start`` reads one from the state dir) may manage tokens."""

from __future__ import annotations

import datetime as dt
import json
import re
from typing import Any

import typer

from cloudmodal.cli.errors import user_errors
from cloudmodal.cli.tables import WIDE_HELP, Column, print_table

app = typer.Typer(help="Create, list and revoke access tokens of the control plane.", no_args_is_help=True)

_TOKEN_ID = re.compile(r"tk-[A-Za-z0-9]{1,64}")
# The id is copied into `cloudmodal token revoke`: whole or not at all; the app list is cut to fit.
TOKEN_COLUMNS = (
    Column("ID"),
    Column("Name", keep=1),
    Column("Kind", keep=1),
    Column("Apps", keep=2, shrink=True),
    Column("Revoked", keep=2),
    Column("Created", keep=3),
)
# Stored scopes list a member's apps comma-separated: an app name may not contain one.
_FORBIDDEN_IN_APP = ","


def _session() -> Any:
    from cloudmodal.client.session import current_session

    return current_session()


def _ts(t: float | None) -> str:
    return dt.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S") if t else "-"


def _check_apps(apps: list[str]) -> list[str]:
    out: list[str] = []
    for a in apps:
        name = a.strip()
        if not name:
            raise typer.BadParameter("an app name may not be empty.", param_hint="'--app'")
        if any(c in name for c in _FORBIDDEN_IN_APP) or any(ord(c) < 32 for c in name):
            raise typer.BadParameter(
                f"{a!r} is not an app name (no commas or control characters); repeat --app for several apps.",
                param_hint="'--app'",
            )
        if name not in out:
            out.append(name)
    return out


def create_token(kind: str, apps: list[str] | None, name: str) -> dict[str, Any]:
    """Ask the control plane for a new token: ``{token, id, kind, apps}`` (the token itself only here)."""
    with user_errors():
        s = _session()
        return s.transport.post("/v1/tokens", {"kind": kind, "apps": apps or None, "name": name})


@app.command("create")
def create(
    member: bool = typer.Option(
        True,
        "--member/--owner",
        help="A member token (deploy, run, call and read the logs of apps; no token management) or an owner "
        "token (everything).",
    ),
    apps: list[str] = typer.Option(
        [],
        "--app",
        help="Limit a member token to this app (by name); repeat for several. Default: every app.",
    ),
    name: str = typer.Option(
        "", "--name", help="A label to tell the token apart in `cloudmodal token list`."
    ),
    proxy: bool = typer.Option(
        False,
        "--proxy",
        help="A proxy-auth token for web endpoints declared requires_proxy_auth=True: send its id as the "
        "Modal-Key header and the token as Modal-Secret. It opens nothing else.",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the token and its id as JSON."),
) -> None:
    """Create a token and print it (shown only this once: store it)."""
    if proxy and not member:
        raise typer.BadParameter("a token is either --proxy or --owner, not both.", param_hint="'--proxy'")
    if not member and apps:
        raise typer.BadParameter(
            "an owner token has access to every app; --app limits member tokens only.", param_hint="'--app'"
        )
    names = _check_apps(apps)
    if len(name) > 200:
        raise typer.BadParameter("at most 200 characters.", param_hint="'--name'")
    made = create_token("proxy" if proxy else "member" if member else "owner", names, name)
    if as_json:
        typer.echo(json.dumps(made))
        return
    if proxy:
        typer.echo(
            f"Created proxy-auth token {made['id']}. Send it with each request to an endpoint declared "
            "requires_proxy_auth=True; it is shown only this once.",
            err=True,
        )
        typer.echo(f"Modal-Key: {made['id']}")
        typer.echo(f"Modal-Secret: {made['token']}")
        return
    scope = "every app" if not made.get("apps") else "apps " + ", ".join(made["apps"])
    typer.echo(
        f"Created {made.get('kind', 'member' if member else 'owner')} token {made.get('id', '?')} ({scope}). "
        "It is shown only this once; `cloudmodal token revoke ID` revokes it.",
        err=True,
    )
    typer.echo(made["token"])


@app.command("list")
def list_tokens(
    as_json: bool = typer.Option(False, "--json"),
    workers: bool = typer.Option(False, "--workers", help="Also list the workers' own tokens."),
    wide: bool = typer.Option(False, "--wide", help=WIDE_HELP),
) -> None:
    """The control plane's tokens (never the tokens themselves): id, name, kind, apps, created, revoked."""
    with user_errors():
        rows = _session().transport.get("/v1/tokens")
    if not workers:
        rows = [r for r in rows if r.get("kind") != "worker"]
    if as_json:
        typer.echo(json.dumps(rows, indent=2, default=str))
        return
    table = []
    for r in rows:
        apps = r.get("apps")
        table.append(
            [
                str(r.get("id", "")),
                r.get("name") or "-",
                str(r.get("kind", "")),
                ", ".join(apps) if apps else ("all" if r.get("kind") != "worker" else "-"),
                "yes" if r.get("revoked") else "no",
                _ts(r.get("created_at")),
            ]
        )
    print_table(TOKEN_COLUMNS, table, wide=wide)


@app.command("revoke")
def revoke(token_id: str = typer.Argument(..., help="The token's id (`cloudmodal token list`).")) -> None:
    """Revoke a token: every control plane on the database refuses it within seconds."""
    token_id = token_id.strip()
    if not _TOKEN_ID.fullmatch(token_id):
        hint = " That looks like a token, not its id." if token_id.startswith("cm_") else ""
        raise typer.BadParameter(
            f"{token_id!r} is not a token id (like tk-...; `cloudmodal token list` shows them).{hint}",
            param_hint="'ID'",
        )
    with user_errors():
        _session().transport.post(f"/v1/tokens/{token_id}/revoke")
    typer.echo(f"Revoked token {token_id}.")
