"""`cloudmodal dict create|list|get|items|clear|delete`: Dicts from the command line (Modal's commands).

Keys given on the command line are strings, as in Modal's CLI."""

from __future__ import annotations

import datetime as dt
import itertools
import json
from typing import Any

import typer

from cloudmodal.cli.errors import user_errors
from cloudmodal.cli.tables import WIDE_HELP, Column, print_table

app = typer.Typer(help="Manage dicts.", no_args_is_help=True)

LIST_COLUMNS = (Column("Name"), Column("Created", keep=1), Column("Created by", keep=2))
ITEM_COLUMNS = (Column("Key", shrink=True), Column("Value", shrink=True))
DEFAULT_ITEMS = 20


def _ts(t: float | dt.datetime) -> str:
    when = t if isinstance(t, dt.datetime) else dt.datetime.fromtimestamp(t)
    return when.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def show(value: Any, use_repr: bool) -> str:
    """How a key or value is printed: ``repr`` with ``--repr``, else ``str``."""
    return repr(value) if use_repr else str(value)


def confirm(yes: bool, question: str) -> None:
    """Ask before a destructive command unless ``-y`` was given (and refuse without a terminal)."""
    if not yes and not typer.confirm(question, default=False):
        typer.echo("Aborted.", err=True)
        raise typer.Exit(1)


@app.command("create")
def create(name: str = typer.Argument(..., help="The dict's name.")) -> None:
    """Create a named dict."""
    from cloudmodal.dict import Dict

    with user_errors():
        Dict.objects.create(name)
    typer.echo(f"Created dict {name!r}.")


@app.command("list")
def list_dicts(
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    wide: bool = typer.Option(False, "--wide", help=WIDE_HELP),
) -> None:
    """Named dicts, newest first."""
    from cloudmodal.client.session import current_session

    with user_errors():
        rows = current_session().transport.get("/v1/dicts")
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    print_table(
        LIST_COLUMNS, [[r["name"], _ts(r["created_at"]), r["created_by"] or "-"] for r in rows], wide=wide
    )


@app.command("get")
def get(
    name: str = typer.Argument(..., help="The dict's name."),
    key: str = typer.Argument(..., help="The key (a string)."),
) -> None:
    """Print the value of one key (exit code 1 when it is absent)."""
    from cloudmodal.dict import Dict

    missing = object()
    with user_errors():
        value = Dict.from_name(name).get(key, missing)
    if value is missing:
        typer.secho(f"Error: dict {name!r} has no key {key!r}.", fg="red", err=True)
        raise typer.Exit(1)
    typer.echo(show(value, False))


@app.command("items")
def items(
    name: str = typer.Argument(..., help="The dict's name."),
    n: int = typer.Argument(DEFAULT_ITEMS, help="How many entries to show.", min=1),
    all: bool = typer.Option(False, "--all", "-a", help="Show every entry."),  # noqa: A002 - Modal's flag
    use_repr: bool = typer.Option(False, "--repr", "-r", help="Show keys and values with repr()."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON (keys and values as text)."),
    wide: bool = typer.Option(False, "--wide", help=WIDE_HELP),
) -> None:
    """Show the dict's entries (the first N, in no particular order; --all for every one)."""
    from cloudmodal.dict import Dict

    with user_errors():
        entries = Dict.from_name(name).items()
        shown = list(entries if all else itertools.islice(entries, n))
    if as_json:
        typer.echo(json.dumps([[show(k, use_repr), show(v, use_repr)] for k, v in shown], indent=2))
        return
    print_table(ITEM_COLUMNS, [[show(k, use_repr), show(v, use_repr)] for k, v in shown], wide=wide)


@app.command("clear")
def clear(
    name: str = typer.Argument(..., help="The dict's name."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
) -> None:
    """Remove every entry of the dict."""
    from cloudmodal.dict import Dict

    confirm(yes, f"Remove every entry of dict {name!r}?")
    with user_errors():
        Dict.from_name(name).clear()
    typer.echo(f"Cleared dict {name!r}.")


@app.command("delete")
def delete(
    name: str = typer.Argument(..., help="The dict's name."),
    allow_missing: bool = typer.Option(False, "--allow-missing", help="No error when it does not exist."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
) -> None:
    """Delete the dict and its entries."""
    from cloudmodal.dict import Dict

    confirm(yes, f"Delete dict {name!r} and all its entries? This cannot be undone.")
    with user_errors():
        Dict.objects.delete(name, allow_missing=allow_missing)
    typer.echo(f"Deleted dict {name!r}.")
