"""``cloudmodal pricing refresh|info``: fetch the public GPU price catalogs and show what is loaded."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.text import Text

from cloudmodal.cli.tables import WIDE_HELP, Cell, Column, print_table

app = typer.Typer(help="Manage the GPU price catalogs.", no_args_is_help=True)

# A narrow terminal keeps the counts and the start of the GPU list; the source path is in the title's directory.
INFO_COLUMNS = (
    Column("cloud"),
    Column("date", keep=1),
    Column("offers", "right", keep=1),
    Column("rows", "right", keep=3),
    Column("GPU types", keep=2, shrink=True),
    Column("skipped", keep=4, shrink=True),
    Column("source", keep=5),
)


def _split(values: list[str] | None) -> list[str]:
    return [v.strip() for item in values or [] for v in item.split(",") if v.strip()]


@app.command("refresh")
def refresh_command(
    url: str = typer.Option(
        None, "--url", help="Base URL of a v8 catalog tree (default: SkyPilot's public one)."
    ),
    clouds: list[str] = typer.Option(
        None, "--clouds", help="Clouds to fetch, comma-separated (default: aws,gcp,azure,lambda,runpod)."
    ),
    directory: Path = typer.Option(
        None, "--dir", help="Where to write (default: $CLOUDMODAL_CATALOG_DIR, else the user cache)."
    ),
) -> None:
    """Download SkyPilot's public v8 GPU price catalogs into the local cache."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TaskID, TextColumn, TransferSpeedColumn

    from cloudmodal.exception import Error
    from cloudmodal.pricing.catalog import catalog_dir
    from cloudmodal.pricing.refresh import DEFAULT_BASE_URL, DEFAULT_CLOUDS, refresh_catalogs

    err = Console(stderr=True)
    dest = directory or catalog_dir()
    wanted = _split(clouds) or list(DEFAULT_CLOUDS)
    tasks: dict[str, TaskID] = {}
    with Progress(
        TextColumn("{task.description:<22}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        console=err,
    ) as bar:

        def progress(name: str, done: int, total: int | None) -> None:
            if name not in tasks:
                tasks[name] = bar.add_task(name, total=total)
            bar.update(tasks[name], completed=done, total=total)

        try:
            meta = refresh_catalogs(dest, base_url=url or DEFAULT_BASE_URL, clouds=wanted, progress=progress)
        except Error as e:
            bar.stop()
            err.print(f"[red]Error:[/red] {e}", highlight=False)
            raise typer.Exit(1) from None
    rows = sum(int(meta["clouds"][c]["rows"]) for c in wanted if c in meta.get("clouds", {}))
    err.print(f"Catalogs for {', '.join(wanted)} ({rows:,} rows) are in {dest}.", highlight=False)


@app.command("info")
def info_command(
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    directory: Path = typer.Option(
        None, "--dir", help="Catalog directory (default: $CLOUDMODAL_CATALOG_DIR, else the user cache)."
    ),
    wide: bool = typer.Option(False, "--wide", help=WIDE_HELP),
) -> None:
    """Show each cloud's catalog source, date, row and offer counts, and GPU types."""
    from cloudmodal.exception import Error
    from cloudmodal.pricing.catalog import catalog_dir, load_offer_table

    d = directory or catalog_dir()
    try:
        table = load_offer_table(d)
    except Error as e:
        Console(stderr=True).print(f"[red]Error:[/red] {e}", highlight=False)
        raise typer.Exit(1) from None
    if as_json:
        out = {
            "directory": str(d),
            "offers": len(table),
            "clouds": [s.to_dict() for s in table.summaries],
        }
        typer.echo(json.dumps(out, indent=2))
        return
    rows: list[list[Cell]] = []
    for s in table.summaries:
        if s.error:
            rows.append([s.cloud, "", "", "", "", Text(s.error, style="red"), s.source])
            continue
        skipped = "; ".join(f"{n} {why}" for why, n in s.skipped.items())
        rows.append(
            [s.cloud, s.date, f"{s.offers:,}", f"{s.rows:,}", ", ".join(s.gpu_types), skipped, s.source]
        )
    print_table(
        INFO_COLUMNS,
        rows,
        wide=wide,
        title=f"GPU price catalog: {d}",
        notes=[f"{len(table):,} offers, {len(table.gpu_types())} GPU types."],
    )
