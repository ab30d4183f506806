"""`cloudmodal sandbox list|stop`: running sandboxes from the command line (Modal's `container list|stop` for
sandboxes)."""

from __future__ import annotations

import datetime as dt
import json
import shlex

import typer

from cloudmodal.cli.errors import user_errors
from cloudmodal.cli.tables import WIDE_HELP, Column, print_table

app = typer.Typer(help="Manage sandboxes.", no_args_is_help=True)

LIST_COLUMNS = (
    Column("Sandbox ID"),
    Column("App", keep=1),
    Column("Command", shrink=True, keep=3),
    Column("Created", keep=2),
    Column("Tags", shrink=True, keep=4),
)


def _ts(t: float) -> str:
    return dt.datetime.fromtimestamp(t).astimezone().strftime("%Y-%m-%d %H:%M:%S")


@app.command("list")
def list_sandboxes(
    app_id: str = typer.Option(None, "--app-id", help="Only this app's sandboxes (ap-...)."),
    tag: list[str] = typer.Option([], "--tag", help="KEY=VALUE: only sandboxes with this tag (repeatable)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    wide: bool = typer.Option(False, "--wide", help=WIDE_HELP),
) -> None:
    """Running sandboxes, newest first."""
    from cloudmodal.client.session import current_session

    tags = {}
    for t in tag:
        key, sep, value = t.partition("=")
        if not sep or not key:
            typer.echo(f"--tag {t!r}: give KEY=VALUE.", err=True)
            raise typer.Exit(2)
        tags[key] = value
    with user_errors():
        rows = current_session().transport.post("/v1/sandboxes/list", {"app_id": app_id, "tags": tags})[
            "sandboxes"
        ]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    print_table(
        LIST_COLUMNS,
        [
            [
                r["id"],
                r["app_name"],
                shlex.join(r["spec"].get("argv") or []) or "-",
                _ts(r["created_at"]),
                ",".join(f"{k}={v}" for k, v in sorted((r["tags"] or {}).items())) or "-",
            ]
            for r in rows
        ],
        wide=wide,
    )


@app.command("stop")
def stop(sandbox_id: str = typer.Argument(..., help="The sandbox's id (sb-...).")) -> None:
    """Terminate a sandbox and every process in it."""
    from cloudmodal.client.session import current_session

    with user_errors():
        current_session().transport.post(f"/v1/sandboxes/{sandbox_id}/terminate", {})
    typer.echo(f"Stopped sandbox {sandbox_id}.")
