"""`cloudmodal app list|logs|stop|history|events`."""

from __future__ import annotations

import datetime as dt
import json
import time
from typing import Any

import typer

from cloudmodal.cli.errors import user_errors
from cloudmodal.cli.tables import WIDE_HELP, Column, print_table

app = typer.Typer(help="Inspect and manage apps.", no_args_is_help=True)

# Ids and names are copied into other commands: whole or not at all. A pool's status line is cut to fit.
APP_COLUMNS = (
    Column("App ID"),
    Column("Name"),
    Column("State", keep=1),
    Column("Pools", keep=1, shrink=True),
    Column("Created", keep=2),
)
HISTORY_COLUMNS = (Column("Version", "right"), Column("Deployed", keep=1), Column("Functions", shrink=True))


def _session() -> Any:
    from cloudmodal.client.session import current_session

    return current_session()


def _ts(t: float | None) -> str:
    return dt.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S") if t else "-"


def _pool_line(p: dict[str, Any]) -> str:
    w = p["workers"]
    parts = [f"{p['name']} [{p['gpu']}]"]
    live = w.get("ready", 0) + w.get("starting", 0) + w.get("draining", 0)
    detail = ", ".join(f"{k} {w[k]}" for k in ("ready", "starting", "draining") if w.get(k))
    market = ", ".join(f"{k} {w[k]}" for k in ("spot", "on-demand") if w.get(k))
    parts.append(f"{live} worker{'' if live == 1 else 's'}" + (f" ({detail}; {market})" if detail else ""))
    parts.append(f"{p['pending']} pending, {p['running']} running")
    if p.get("desired") is not None and p["desired"] != live:
        parts.append(f"scaling to {p['desired']}")
    if p.get("fallen_back"):
        parts.append(f"on-demand: spot fell back ({p.get('fallback_reason') or 'spot unavailable'})")
    if p.get("schedule"):  # a deployed scheduled function
        parts.append(f"next run {_ts(p['schedule']['next_run_at'])} ({p['schedule']['schedule']})")
    return " · ".join(parts)


@app.command("list")
def list_apps(
    as_json: bool = typer.Option(False, "--json"),
    all: bool = typer.Option(True, "--all/--running", help="Include stopped apps."),
    wide: bool = typer.Option(False, "--wide", help=WIDE_HELP),
) -> None:
    """Apps with their state and a status line per function pool (a scheduled function's: its next run)."""
    with user_errors():
        apps = _session().transport.get("/v1/apps", all=all)
    if as_json:
        typer.echo(json.dumps(apps, indent=2, default=str))
        return
    rows = []
    for a in apps:
        pools = "\n".join(
            _pool_line(p) for p in a.get("pools", []) if "(" not in p["name"] or p["workers"] or p["pending"]
        )
        state = a["state"] + (f" v{a['version']}" if not a["ephemeral"] else "")
        rows.append([a["id"], a["name"], state, pools or "-", _ts(a["created_at"])])
    print_table(APP_COLUMNS, rows, wide=wide)


@app.command("logs")
def logs(
    app_ref: str = typer.Argument(..., help="App name or id."),
    follow: bool = typer.Option(False, "--follow", "-f"),
    timestamps: bool = typer.Option(False, "--timestamps"),
) -> None:
    """Print an app's logs (and keep following with -f)."""
    with user_errors():
        s = _session()
        a = s.transport.get(f"/v1/apps/{app_ref}")
        cursor = 0
        while True:
            rows = s.transport.get(f"/v1/apps/{a['id']}/logs", after=cursor, timeout=10.0 if follow else 0.0)
            for r in rows:
                cursor = r["id"]
                prefix = f"{_ts(r['ts'])} " if timestamps else ""
                typer.echo(prefix + r["text"], err=r["stream"] == "stderr")
            if not follow and not rows:
                return


@app.command("stop")
def stop(app_ref: str = typer.Argument(...), yes: bool = typer.Option(False, "--yes", "-y")) -> None:
    """Stop an app: its pending inputs are cancelled and its workers drain."""
    with user_errors():
        r = _session().transport.post(f"/v1/apps/{app_ref}/stop")
    typer.echo(f"Stopped {r['stopped']}.")


@app.command("history")
def history(
    app_ref: str = typer.Argument(...),
    as_json: bool = typer.Option(False, "--json"),
    wide: bool = typer.Option(False, "--wide", help=WIDE_HELP),
) -> None:
    """Deployments of an app, newest first."""
    with user_errors():
        rows = _session().transport.get(f"/v1/apps/{app_ref}/history")
    if as_json:
        typer.echo(json.dumps(rows, indent=2, default=str))
        return
    table = [[str(r["version"]), _ts(r["created_at"]), ", ".join(r["functions"] or [])] for r in rows]
    print_table(HISTORY_COLUMNS, table, wide=wide)


@app.command("events")
def events(
    app_ref: str = typer.Argument(...),
    as_json: bool = typer.Option(False, "--json"),
    follow: bool = typer.Option(False, "--follow", "-f"),
) -> None:
    """Placement decisions, launches, failures, preemptions and scaling of an app."""
    with user_errors():
        s = _session()
        cursor = 0
        while True:
            rows = s.transport.get(f"/v1/apps/{app_ref}/events", after=cursor)
            for r in rows:
                cursor = r["id"]
                if as_json:
                    typer.echo(json.dumps(r, default=str))
                else:
                    typer.echo(f"{_ts(r['ts'])}  {r['kind']:<18} {r['message']}")
            if not follow:
                return
            time.sleep(1.0)
