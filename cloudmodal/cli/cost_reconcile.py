"""`cloudmodal cost --reconcile aws`: the ledger beside AWS Cost Explorer, per UTC day and app, with why they
differ (the comparison itself: :mod:`cloudmodal.cost_reconcile`).

The ledger's side comes from the control plane (``GET /v1/apps``, then ``GET /v1/cost`` per app with AWS
cost); the bill's from Cost Explorer's ``GetCostAndUsage`` through boto3 (the ``aws`` extra), with the
credentials boto3 finds (``AWS_PROFILE``, the environment, SSO...). Each Cost Explorer request is billed
$0.01. boto3 honours ``AWS_ENDPOINT_URL_COST_EXPLORER`` (tests point it at a local stub).
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import sys
import time
from typing import Any

import typer

from cloudmodal.cli.errors import user_errors
from cloudmodal.cli.tables import Column, print_table
from cloudmodal.cost_reconcile import (
    DAY_S,
    LedgerCell,
    Reconciliation,
    parse_cost_and_usage,
    reconcile,
)
from cloudmodal.exception import Error
from cloudmodal.providers.nodes import TAG_APP

REQUEST_USD = 0.01  # what AWS charges for each Cost Explorer API request
APPS_LIMIT = 10_000  # the newest apps (ephemeral runs make one each); the most GET /v1/apps returns

NOT_BUILT = {
    "gcp": "GCP's bill by label comes from the Cloud Billing export to BigQuery (labels key cloudmodal-app); "
    "reconciling against it is not built yet.",
    "azure": "Azure's bill by tag comes from Cost Management (the Query API grouped by TagKey cloudmodal-app); "
    "reconciling against it is not built yet.",
    "lambda": "Lambda Cloud has no billing API by instance or tag; compare its invoices with "
    "`cloudmodal cost --by cloud` by hand.",
}
COLUMNS = (
    Column("Day"),
    Column("App"),
    Column("Ledger (USD)", "right"),
    Column("Bill (USD)", "right"),
    Column("Difference", "right"),
    Column("Status", keep=1),
    Column("Why", keep=2, shrink=True),
)


class CostExplorerError(Error):
    """Cost Explorer could not be read; the message says what to do."""


def reconcile_command(
    cloud: str,
    since: float,
    until: float,
    app: str | None,
    fmt: str,
    *,
    wide: bool = False,
    now: float | None = None,
) -> None:
    """Print the reconciliation of the ledger with ``cloud``'s bill over the UTC days that ``[since, until)``
    touches (today at most), for every app or the one ``app`` (name or id), as a table, csv or JSON."""
    cloud = cloud.strip().lower()
    if cloud != "aws":
        what = NOT_BUILT.get(cloud, f"{cloud!r} is not a cloud cloudmodal launches on.")
        raise typer.BadParameter(f"only aws can be reconciled. {what}", param_hint="'--reconcile'")
    if fmt not in ("table", "csv", "json"):
        raise typer.BadParameter("one of table, csv, json.", param_hint="'--format'")
    now = time.time() if now is None else now
    start, end = bill_period(since, until, now)
    with user_errors():
        from cloudmodal.client.session import current_session

        transport = current_session().transport
        known, ledger, wanted = ledger_by_app_and_day(
            transport, _midnight(start), min(_midnight(end), now), app
        )
        pages = fetch_cost_and_usage(start, end)
    result = reconcile(
        ledger, parse_cost_and_usage(pages), start=start, end=end, known_apps=known, now=now, apps=wanted
    )
    result.notes.append(
        f"{len(pages)} Cost Explorer request{'s' if len(pages) != 1 else ''} "
        f"(AWS bills ${REQUEST_USD:.2f} each: ${len(pages) * REQUEST_USD:.2f})."
    )
    if fmt == "json":
        typer.echo(json.dumps(result.to_json(), indent=2))
    elif fmt == "csv":
        out = csv.writer(sys.stdout)
        out.writerow(
            ["day", "app_id", "app", "ledger_usd", "bill_usd", "difference_usd", "status", "explanation"]
        )
        for r in result.to_json()["rows"]:
            out.writerow(
                [
                    r["day"],
                    r["app_id"],
                    r["app"],
                    r["ledger_usd"],
                    r["bill_usd"],
                    r["difference_usd"],
                    r["status"],
                    " ".join(r["explanation"]),
                ]
            )
    else:
        print_reconciliation(result, wide=wide)


def bill_period(since: float, until: float, now: float) -> tuple[str, str]:
    """The UTC days ``[start, end)`` that ``[since, until)`` touches, ending with today at the latest.

    >>> bill_period(1772323200.0 + 3600, 1772496000.0 + 60, 1772496000.0 + 7200)  # 03-01 01:00 .. 03-03 00:01
    ('2026-03-01', '2026-03-04')
    """
    first = dt.datetime.fromtimestamp(since, dt.UTC).date()
    last = dt.datetime.fromtimestamp(until, dt.UTC)
    end = last.date() + dt.timedelta(days=0 if last.time() == dt.time() else 1)
    end = min(end, dt.datetime.fromtimestamp(now, dt.UTC).date() + dt.timedelta(days=1))
    if first >= end:
        raise typer.BadParameter("the period has no day up to today to reconcile.", param_hint="'--since'")
    return first.isoformat(), end.isoformat()


def ledger_by_app_and_day(
    transport: Any, since: float, until: float, app: str | None
) -> tuple[dict[str, str], dict[tuple[str, str], LedgerCell], set[str] | None]:
    """``(app id -> name, {(app id, day): the ledger's AWS cost}, the app ids asked for or None)``.

    One report per app with any cost in the period; an app that also ran on another cloud is read day by
    day, by cloud, to keep its AWS part only."""
    apps = transport.get("/v1/apps", all=True, limit=APPS_LIMIT)
    known = {a["id"]: a["name"] for a in apps}
    wanted = None
    if app is not None:
        wanted = {i for i, name in known.items() if app in (i, name)} or {app}  # an id only the bill knows
    costly = {
        g["key"] for g in transport.get("/v1/cost", by="app", since=since, until=until)["groups"] if g["cost"]
    }
    ledger: dict[tuple[str, str], LedgerCell] = {}
    for app_id, name in known.items():
        if name not in costly or (wanted is not None and app_id not in wanted):
            continue
        clouds = {
            g["key"]: g["cost"]
            for g in transport.get("/v1/cost", by="cloud", app=app_id, since=since, until=until)["groups"]
        }
        if not clouds.get("aws"):
            continue
        if all(not cost for key, cost in clouds.items() if key != "aws"):
            report = transport.get("/v1/cost", by="day", app=app_id, since=since, until=until)
            for g in report["groups"]:
                ledger[(app_id, g["key"])] = LedgerCell(g["cost"], g["spot_cost"])
            continue
        t = since
        while t < until:
            day_end = min(_midnight_after(t), until)
            report = transport.get("/v1/cost", by="cloud", app=app_id, since=t, until=day_end)
            for g in report["groups"]:
                if g["key"] == "aws" and g["cost"]:
                    ledger[(app_id, _day(t))] = LedgerCell(g["cost"], g["spot_cost"])
            t = day_end
    return known, ledger, wanted


def fetch_cost_and_usage(start: str, end: str, client: Any = None) -> list[dict[str, Any]]:
    """Every page of Cost Explorer's daily unblended cost by ``cloudmodal-app`` over ``[start, end)``."""
    try:
        import botocore.config
        import botocore.exceptions
    except ImportError:
        raise CostExplorerError(
            "Reading AWS Cost Explorer needs boto3: pip install 'cloudmodal[aws]'."
        ) from None
    if client is None:
        import boto3

        session = boto3.session.Session()
        # Cost Explorer has one endpoint per partition (us-east-1 for aws) whatever the region; a region is
        # still needed to sign for an endpoint set by AWS_ENDPOINT_URL_COST_EXPLORER.
        client = session.client(
            "ce",
            region_name=session.region_name or "us-east-1",
            config=botocore.config.Config(retries={"mode": "standard", "total_max_attempts": 3}),
        )
    pages: list[dict[str, Any]] = []
    token: str | None = None
    try:
        while True:
            kw: dict[str, Any] = {
                "TimePeriod": {"Start": start, "End": end},
                "Granularity": "DAILY",
                "Metrics": ["UnblendedCost"],
                "GroupBy": [{"Type": "TAG", "Key": TAG_APP}],
            }
            if token:
                kw["NextPageToken"] = token
            page = client.get_cost_and_usage(**kw)
            pages.append(page)
            token = page.get("NextPageToken")
            if not token:
                return pages
    except (botocore.exceptions.NoCredentialsError, botocore.exceptions.PartialCredentialsError):
        raise CostExplorerError(
            "No AWS credentials found: set AWS_PROFILE (or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY), or run "
            "`aws configure` / `aws sso login`. The principal needs ce:GetCostAndUsage."
        ) from None
    except botocore.exceptions.ClientError as e:
        raise CostExplorerError(_client_error_message(e)) from None
    except botocore.exceptions.BotoCoreError as e:
        raise CostExplorerError(f"AWS Cost Explorer could not be reached: {e}") from None


def _client_error_message(e: Any) -> str:
    err = e.response.get("Error", {})
    code, message = err.get("Code", ""), err.get("Message", "")
    fixes = {
        "AccessDeniedException": "the principal needs ce:GetCostAndUsage, and Cost Explorer must be enabled "
        "for the account (open Cost Explorer once in the Billing console; data appears within 24 h).",
        "UnrecognizedClientException": "the AWS credentials are not valid: check AWS_PROFILE or the keys.",
        "InvalidClientTokenId": "the AWS credentials are not valid: check AWS_PROFILE or the keys.",
        "ExpiredTokenException": "the AWS session has expired: run `aws sso login` or refresh the keys.",
        "DataUnavailableException": "Cost Explorer has no data for this period yet (enabled less than 24 h "
        "ago), or the period is older than it keeps.",
        "LimitExceededException": "Cost Explorer is throttling this account: try again in a minute.",
        "BillExpirationException": "the period is older than Cost Explorer keeps: choose a later --since.",
    }
    fix = fixes.get(code, "see the message above.")
    return f"AWS Cost Explorer refused GetCostAndUsage ({code}: {message}): {fix}"


def print_reconciliation(result: Reconciliation, *, wide: bool = False) -> None:
    from rich.console import Console

    c = Console()
    s = result.summary()
    end = (dt.date.fromisoformat(result.end) - dt.timedelta(days=1)).isoformat()
    c.print(f"[bold]Ledger vs AWS bill, {result.start} → {end} (UTC days)[/]")
    c.print(
        f"  ledger ${s['ledger_usd']:,.2f} · bill under app tags ${s['bill_tagged_usd']:,.2f} "
        f"(difference {s['difference_usd']:+,.2f}) · bill with no app tag ${s['bill_untagged_usd']:,.2f}"
    )
    if s["days_not_final"]:
        c.print(f"  not final yet: {', '.join(s['days_not_final'])}")
    rows = [
        [
            r.day,
            r.app if r.app == r.app_id or not r.app_id else f"{r.app} ({r.app_id})",
            _money(r.ledger),
            _money(r.bill),
            "-" if r.difference is None else f"{r.difference:+,.4f}",
            r.status,
            "\n".join(r.reasons),
        ]
        for r in result.rows
    ]
    print_table(COLUMNS, rows, wide=wide, notes=[f"note: {n}" for n in result.notes], console=c)


def _money(x: float | None) -> str:
    return "-" if x is None else f"{x:,.4f}"


def _midnight(day: str) -> float:
    return dt.datetime.combine(dt.date.fromisoformat(day), dt.time(), dt.UTC).timestamp()


def _midnight_after(t: float) -> float:
    return (t // DAY_S + 1) * DAY_S


def _day(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).date().isoformat()
