"""Tables of the ``cloudmodal`` command line: readable in a narrow terminal, plain when piped.

In a terminal a table fits the window: identifiers (ids, regions, instance types, paths) are never wrapped or
cut, so they can be copied; the least important columns are left out when they do not fit, and free text (lists,
status lines) is cut with an ellipsis. ``--wide`` shows every column in full, one line per row, wider than the window if it must.
When stdout is not a terminal (a pipe, a file) the table is plain text for scripts: a header line, then one line
per row, fields separated by tabs, every column, no colour or box drawing; titles and notes go to stderr.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import typer
from rich import box
from rich.cells import cell_len
from rich.console import Console
from rich.table import Table
from rich.text import Text

# Between two columns of the terminal layout: one space of padding each side and the (blank) rule of
# box.SIMPLE_HEAD; the outer edges have neither (show_edge=False, pad_edge=False).
GAP = 3
SHRINK_MIN = 12  # a shortened free-text column keeps at least this many cells, or is left out

Cell = str | Text


@dataclass(frozen=True)
class Column:
    """One column. ``keep`` orders what a narrow terminal shows: 0 always, then 1, 2, ... while they fit.
    ``shrink``: free text that may be cut with an ellipsis; every other column is an identifier or a number
    and is shown whole or not at all."""

    header: str
    justify: Literal["left", "right"] = "left"
    keep: int = 0
    shrink: bool = False


def _text(cell: Cell) -> Text:
    return cell.copy() if isinstance(cell, Text) else Text(cell)


def _cell_width(cell: Cell) -> int:
    return max((cell_len(line) for line in _text(cell).plain.split("\n")), default=0)


def _plain(cell: Cell) -> str:
    # One row per line and tab-separated: a cell's own line breaks and tabs become separators within the cell.
    return "; ".join(_text(cell).plain.replace("\t", " ").split("\n"))


def _fit(columns: Sequence[Column], natural: list[int], width: int) -> dict[int, int]:
    """Column index -> width for a window ``width`` cells wide: keep-0 columns, then the others by ``keep``
    (then left to right) while they fit, then the spare room to the shortened columns in the same order."""
    least = [
        min(n, max(SHRINK_MIN, len(c.header))) if c.shrink else n
        for c, n in zip(columns, natural, strict=True)
    ]
    order = sorted(range(len(columns)), key=lambda i: (columns[i].keep, i))
    chosen: list[int] = []
    used = -GAP
    for i in order:
        if columns[i].keep == 0 or used + GAP + least[i] <= width:
            chosen.append(i)
            used += GAP + least[i]
    widths = {i: least[i] for i in chosen}
    spare = width - used
    for i in sorted(chosen, key=lambda i: (columns[i].keep, i)):
        if spare <= 0:
            break
        more = min(spare, natural[i] - widths[i])
        widths[i] += more
        spare -= more
    return widths


def print_table(
    columns: Sequence[Column],
    rows: Iterable[Sequence[Cell]],
    *,
    wide: bool = False,
    title: str | None = None,
    notes: Sequence[str] = (),
    console: Console | None = None,
) -> None:
    """Print ``rows`` under ``columns`` for a terminal (fitted to its width, every column with ``wide``) or,
    when stdout is not a terminal, as tab-separated plain lines; ``notes`` are printed after the table."""
    console = console or Console()
    rows = [list(r) for r in rows]
    if not console.is_terminal:
        if title:
            typer.echo(title, err=True)
        typer.echo("\t".join(c.header for c in columns))
        for r in rows:
            typer.echo("\t".join(_plain(cell) for cell in r))
        for note in notes:
            typer.echo(note, err=True)
        return

    natural = [max([len(c.header), *(_cell_width(r[i]) for r in rows)]) for i, c in enumerate(columns)]
    if wide:
        # Every column whole, one line per row, however wide that is: the terminal (or `less -S`) scrolls.
        widths = dict(enumerate(natural))
        console.width = max(console.width, sum(natural) + GAP * (len(columns) - 1))
    else:
        widths = _fit(columns, natural, console.width)
    shown = [i for i in range(len(columns)) if i in widths]
    t = Table(
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
        padding=(0, 1),
        title=title,
        title_justify="left",
    )
    for i in shown:
        c = columns[i]
        t.add_column(c.header, justify=c.justify, width=widths[i], no_wrap=True, overflow="ellipsis")
    for r in rows:
        t.add_row(*(_text(r[i]) for i in shown))
    console.print(t)
    for note in notes:
        console.print(note, highlight=False)


WIDE_HELP = "Show every column in full, even wider than the terminal."
