"""`cloudmodal queue create|list|len|peek|clear|delete`: Queues from the command line (Modal's commands)."""

from __future__ import annotations

import itertools
import json

import typer

from cloudmodal.cli.dict_cmd import _ts, confirm
from cloudmodal.cli.errors import user_errors
from cloudmodal.cli.tables import WIDE_HELP, Column, print_table

app = typer.Typer(help="Manage queues.", no_args_is_help=True)

LIST_COLUMNS = (
    Column("Name"),
    Column("Items", "right", keep=1),
    Column("Created", keep=2),
    Column("Created by", keep=3),
)
PARTITION_HELP = "The partition (default: the default partition)."


@app.command("create")
def create(name: str = typer.Argument(..., help="The queue's name.")) -> None:
    """Create a named queue."""
    from cloudmodal.queue import Queue

    with user_errors():
        Queue.objects.create(name)
    typer.echo(f"Created queue {name!r}.")


@app.command("list")
def list_queues(
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    wide: bool = typer.Option(False, "--wide", help=WIDE_HELP),
) -> None:
    """Named queues, newest first, with the items in all their partitions."""
    from cloudmodal.client.session import current_session
    from cloudmodal.queue import Queue

    with user_errors():
        rows = current_session().transport.get("/v1/queues")
        for r in rows:
            r["items"] = Queue.from_id(r["id"]).len(total=True)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = [[r["name"], str(r["items"]), _ts(r["created_at"]), r["created_by"] or "-"] for r in rows]
    print_table(LIST_COLUMNS, table, wide=wide)


@app.command("len")
def length(
    name: str = typer.Argument(..., help="The queue's name."),
    partition: str | None = typer.Option(None, "--partition", "-p", help=PARTITION_HELP),
    total: bool = typer.Option(False, "--total", "-t", help="Count the items of every partition."),
) -> None:
    """Print how many items the partition (or, with --total, the queue) holds."""
    from cloudmodal.queue import Queue

    with user_errors():
        typer.echo(str(Queue.from_name(name).len(partition=partition, total=total)))


@app.command("peek")
def peek(
    name: str = typer.Argument(..., help="The queue's name."),
    n: int = typer.Argument(1, help="How many items to show.", min=1),
    partition: str | None = typer.Option(None, "--partition", "-p", help=PARTITION_HELP),
) -> None:
    """Print the first N items of the partition without removing them."""
    from cloudmodal.queue import Queue

    with user_errors():
        for value in itertools.islice(Queue.from_name(name).iterate(partition=partition), n):
            typer.echo(repr(value))


@app.command("clear")
def clear(
    name: str = typer.Argument(..., help="The queue's name."),
    partition: str | None = typer.Option(None, "--partition", "-p", help=PARTITION_HELP),
    all: bool = typer.Option(False, "--all", "-a", help="Clear every partition."),  # noqa: A002 - Modal's flag
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
) -> None:
    """Remove the items of a partition (or, with --all, of every partition)."""
    from cloudmodal.queue import Queue

    what = (
        "every partition" if all else (f"partition {partition!r}" if partition else "the default partition")
    )
    confirm(yes, f"Remove the items of {what} of queue {name!r}?")
    with user_errors():
        Queue.from_name(name).clear(partition=partition, all=all)
    typer.echo(f"Cleared {what} of queue {name!r}.")


@app.command("delete")
def delete(
    name: str = typer.Argument(..., help="The queue's name."),
    allow_missing: bool = typer.Option(False, "--allow-missing", help="No error when it does not exist."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
) -> None:
    """Delete the queue and its items."""
    from cloudmodal.queue import Queue

    confirm(yes, f"Delete queue {name!r} and all its items? This cannot be undone.")
    with user_errors():
        Queue.objects.delete(name, allow_missing=allow_missing)
    typer.echo(f"Deleted queue {name!r}.")
