"""`cloudmodal cost [APP]`: what apps cost, from the control plane's ledger (see cloudmodal.server.ledger)."""

from __future__ import annotations

import csv
import datetime as dt
import json
import re
import sys
import time
from typing import Any

import typer

from cloudmodal.cli.errors import user_errors
from cloudmodal.cli.tables import WIDE_HELP, Column, print_table

BY_HELP = "Group by app, function, gpu, cloud, market, day, or tag:KEY (an App(tags=...) key)."
_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
GROUP_COLUMNS = (
    Column("Group"),
    Column("Cost (USD)", "right"),
    Column("Share", "right", keep=1),
    Column("Hours", "right", keep=1),
    Column("GPU-hours", "right", keep=2),
    Column("Idle (USD)", "right", keep=2),
    Column("Spot saved (USD)", "right", keep=2),
)
BUDGET_COLUMNS = (
    Column("App"),
    Column("Period", keep=1),
    Column("Spent / cap (USD)", "right"),
    Column("Headroom (USD)", "right"),
    Column("Running / cap ($/h)", "right", keep=1),
)


def parse_when(text: str, now: float, what: str) -> float:
    """``7d``, ``36h``, ``90m`` (ago), ``now``, an ISO date (UTC midnight) or date-time, or epoch seconds."""
    t = text.strip()
    if t == "now":
        return now
    m = _RELATIVE.match(t)
    if m:
        return now - float(m.group(1)) * _UNIT_S[m.group(2)]
    try:
        return float(t)
    except ValueError:
        pass
    try:
        d = dt.datetime.fromisoformat(t)
    except ValueError:
        raise typer.BadParameter(
            f"{text!r} is not a time: use 7d, 36h or 90m (ago), now, 2026-12-01 or 2026-12-01T08:00.",
            param_hint=f"'{what}'",
        ) from None
    if d.tzinfo is None:
        d = d.replace(tzinfo=dt.UTC)
    return d.timestamp()


def _money(x: float | None) -> str:
    return "-" if x is None else f"{x:,.2f}"


def cost_command(
    app_name: str = typer.Argument(None, metavar="[APP]", help="Only this app (name or id)."),
    by: str = typer.Option("app", "--by", help=BY_HELP),
    since: str = typer.Option("7d", "--since", help="Start: 7d, 36h, 90m (ago), or a date/time (UTC)."),
    until: str = typer.Option("now", "--until", help="End: now, 2d (ago), or a date/time (UTC)."),
    fmt: str = typer.Option("table", "--format", help="table, csv or json."),
    wide: bool = typer.Option(False, "--wide", help=WIDE_HELP),
    reconcile: str | None = typer.Option(
        None,
        "--reconcile",
        metavar="CLOUD",
        help="Compare the ledger with CLOUD's bill (aws: Cost Explorer, $0.01 a request) per UTC day and app, "
        "and explain each difference.",
    ),
) -> None:
    """Costs from the ledger: totals, a breakdown, spot savings, what runs now ($/h) and budgets' headroom."""
    if fmt not in ("table", "csv", "json"):
        raise typer.BadParameter("one of table, csv, json.", param_hint="'--format'")
    if by not in ("app", "function", "gpu", "cloud", "market", "day") and not (
        by.startswith("tag:") and len(by) > 4
    ):
        raise typer.BadParameter(BY_HELP, param_hint="'--by'")
    now = time.time()
    t0, t1 = parse_when(since, now, "--since"), parse_when(until, now, "--until")
    if t0 >= t1:
        raise typer.BadParameter("--since must be before --until.", param_hint="'--since'")
    if reconcile is not None:
        from cloudmodal.cli.cost_reconcile import reconcile_command

        reconcile_command(reconcile, t0, t1, app_name, fmt, wide=wide)
        return
    with user_errors():
        from cloudmodal.client.session import current_session

        session = current_session()
        report = session.transport.get("/v1/cost", by=by, since=t0, until=t1, app=app_name)
    if fmt == "json":
        typer.echo(json.dumps(report, indent=2))
        return
    if fmt == "csv":
        out = csv.writer(sys.stdout)
        out.writerow(
            ["group", "cost_usd", "share", "hours", "gpu_hours", "idle_cost_usd", "spot_savings_usd"]
        )
        for g in report["groups"]:
            out.writerow(
                [
                    g["key"],
                    g["cost"],
                    g["share"],
                    g["hours"],
                    g["gpu_hours"],
                    g["idle_cost"],
                    g["spot_savings"],
                ]
            )
        return
    print_report(report, wide=wide)


def print_report(report: dict[str, Any], *, wide: bool = False) -> None:
    from rich.console import Console

    c = Console()
    t = report["total"]
    span = f"{_iso(report['since'])} → {_iso(report['until'])} UTC"
    c.print(f"[bold]Cost {span}[/]" + (f" · app {report['app']}" if report.get("app") else ""))
    c.print(
        f"  total [bold]${_money(t['cost'])}[/] over {t['hours']:.2f} worker-hours ({t['gpu_hours']:.2f} GPU-hours)"
        f" · idle in warm pools ${_money(t['idle_cost'])} · billing minimums ${_money(t['minimum_cost'])}"
    )
    c.print(
        f"  spot: ${_money(t['spot_cost'])} paid, ${_money(t['spot_on_demand_cost'])} on demand → "
        f"[green]saved ${_money(t['spot_savings'])}[/]"
    )
    running = report["running"]
    c.print(f"  running now: [bold]${_money(running['per_hour'])}/h[/] ({len(running['workers'])} workers)")
    rows = [
        [
            g["key"],
            _money(g["cost"]),
            f"{g['share'] * 100:.1f}%",
            f"{g['hours']:.2f}",
            f"{g['gpu_hours']:.2f}",
            _money(g["idle_cost"]),
            _money(g["spot_savings"]),
        ]
        for g in report["groups"]
    ]
    print_table(GROUP_COLUMNS, rows, wide=wide, title=f"by {report['by']}", console=c)
    if report.get("budgets"):
        brows = [
            [
                b["app"],
                b["period"],
                f"{_money(b['spent'])} / {_money(b['max_total'])}",
                _money(b["headroom"]),
                f"{_money(b['running_per_hour'])} / {_money(b['max_per_hour'])}",
            ]
            for b in report["budgets"]
        ]
        print_table(BUDGET_COLUMNS, brows, wide=wide, title="budgets", console=c)
    for note in report.get("notes") or ():
        c.print(f"  note: {note}")


def _iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%d %H:%M")
