"""The ledger beside a cloud's bill: one row per (UTC day, app), and why the two differ. Pure: no I/O.

The bill comes from AWS Cost Explorer's ``GetCostAndUsage`` (``Granularity="DAILY"``,
``Metrics=["UnblendedCost"]``, ``GroupBy=[{"Type": "TAG", "Key": "cloudmodal-app"}]``), as the pages of its
real response (:func:`parse_cost_and_usage`); the ledger's side is its AWS cost per (app id, UTC day).
:func:`reconcile` matches the two and explains each difference, only with the reasons that apply.

What a finance owner should know before relying on it:

- Cost Explorer's API is billed: each request (each page) costs $0.01 (https://aws.amazon.com/aws-cost-
  management/aws-cost-explorer/pricing/). One reconciliation of a week is usually one request.
- The bill can only be split by app once the AWS account (the management account in an organization)
  has **activated ``cloudmodal-app`` as a cost allocation tag** (Billing console → Cost allocation tags, or
  ``aws ce update-cost-allocation-tags-status --cost-allocation-tags-status TagKey=cloudmodal-app,Status=Active``).
  Until then, and for usage before the activation, every cost is under the empty tag value.
- The ledger counts instance time only, at the list $/h fixed at launch, from when AWS accepted the launch to
  when the control plane saw the worker stop (plus AWS's 60 s minimum). The bill also has EBS volumes, data
  transfer and public IPv4 addresses (higher), and any negotiated discount, credit, Savings Plan or Reserved
  Instance (lower); spot is billed at each hour's spot price, not the price at launch (either way).

Amounts are USD; a difference is ``bill - ledger`` (positive: the bill is higher).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from cloudmodal.providers.nodes import TAG_APP

ROUNDING_USD = 0.01  # a difference under this is rounding: the two match
LAG_S = 24 * 3600.0  # AWS refreshes Cost Explorer at least once every 24 h: a day is incomplete until then
DAY_S = 86400.0

Status = Literal["match", "bill-higher", "bill-lower", "only-in-bill", "only-in-ledger", "untagged"]

# The reasons, each added to a row only when it applies.
R_ESTIMATED = (
    "Cost Explorer marks this day Estimated: AWS has not finalized it and the amount can still change."
)
R_LAG = (
    "This day ended less than 24 h ago (or has not ended): AWS refreshes Cost Explorer at least once a day, "
    "so usage is still arriving and the bill can still grow."
)
R_MATCH = "Matches: the difference is under $0.01 (rounding)."
R_HIGHER = (
    "The bill is higher: the ledger counts instance time only, while the bill also charges the nodes' EBS "
    "volumes, data transfer and public IPv4 addresses under this app's tag."
)
R_LOWER = (
    "The bill is lower: the ledger uses list prices, while the bill takes off negotiated discounts, Savings "
    "Plans or Reserved Instances covering this usage, and credits; the ledger also counts each node's boot "
    "(from when AWS accepted the launch; AWS bills from when the instance runs)."
)
R_SPOT = (
    "This app ran spot instances that day: the ledger keeps the spot price at launch, AWS bills each hour's "
    "spot price, which moves either way."
)
R_FOREIGN = (
    "No app with this id on this control plane: its nodes were launched by another control plane sharing the "
    "AWS account, or by hand with cloudmodal's tags."
)
R_OURS_UNLEDGERED = (
    "An app of this control plane, but the ledger has no AWS instance time for it this day: a node or volume "
    "that outlived its worker (look for resources tagged cloudmodal-app with this id), or charges AWS put on "
    "this day for usage the ledger counted the day before."
)
R_NOT_BILLED = (
    "The bill has nothing under this app's tag this day: the nodes ran in another AWS account than the one "
    "these credentials read (only a management account sees its member accounts), or the tag was not yet "
    "active as a cost allocation tag then."
)
R_NO_TAGS = (
    "Nothing in the bill carries the cloudmodal-app tag: it is probably not activated as a cost allocation tag "
    "(Billing console → Cost allocation tags); until it is, this app's cost is under the empty tag value."
)
R_UNTAGGED = (
    "Cost with an empty cloudmodal-app value, not split by app: everything in the account that cloudmodal did "
    "not tag (in a shared account, mostly other work), and cloudmodal's own when the tag is not activated as "
    "a cost allocation tag, for resources launched before it was, or volumes the credentials could not tag."
)


@dataclass(frozen=True, slots=True)
class LedgerCell:
    """The ledger's AWS cost of one app on one UTC day; ``spot_cost``: the part of it on spot instances."""

    cost: float
    spot_cost: float = 0.0


@dataclass(frozen=True)
class Bill:
    """Cost Explorer's answer, summed: ``amounts[(day, app id)]`` in USD (app id ``""``: the empty tag value),
    ``estimated[day]`` for every day it returned."""

    amounts: dict[tuple[str, str], float]
    estimated: dict[str, bool]


@dataclass(frozen=True)
class Row:
    day: str
    app_id: str  # "" for the untagged row
    app: str  # the app's name where this control plane knows it, else its id; "(untagged)"
    ledger: float | None  # None: the ledger has no AWS time for this app that day (or: the untagged row)
    bill: float | None  # None: nothing billed under this app's tag that day
    status: Status
    reasons: tuple[str, ...]

    @property
    def difference(self) -> float | None:
        if self.status == "untagged":
            return None
        return (self.bill or 0.0) - (self.ledger or 0.0)

    def to_json(self) -> dict[str, Any]:
        d = self.difference
        return {
            "day": self.day,
            "app_id": self.app_id,
            "app": self.app,
            "ledger_usd": None if self.ledger is None else round(self.ledger, 6),
            "bill_usd": None if self.bill is None else round(self.bill, 6),
            "difference_usd": None if d is None else round(d, 6),
            "status": self.status,
            "explanation": list(self.reasons),
        }


@dataclass(frozen=True)
class Reconciliation:
    start: str  # first day, inclusive
    end: str  # last day, exclusive (as Cost Explorer's TimePeriod.End)
    rows: list[Row]
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        compared = [r for r in self.rows if r.status != "untagged"]
        counts: dict[str, int] = {}
        for r in self.rows:
            counts[r.status] = counts.get(r.status, 0) + 1
        ledger = sum(r.ledger or 0.0 for r in compared)
        tagged = sum(r.bill or 0.0 for r in compared)
        return {
            "start": self.start,
            "end": self.end,
            "ledger_usd": round(ledger, 6),
            "bill_tagged_usd": round(tagged, 6),
            "bill_untagged_usd": round(sum(r.bill or 0.0 for r in self.rows if r.status == "untagged"), 6),
            "difference_usd": round(tagged - ledger, 6),
            "rows_by_status": dict(sorted(counts.items())),
            "days_not_final": sorted(
                {r.day for r in self.rows if R_ESTIMATED in r.reasons or R_LAG in r.reasons}
            ),
            "apps_only_in_bill": sorted({r.app_id for r in self.rows if r.status == "only-in-bill"}),
            "apps_only_in_ledger": sorted({r.app_id for r in self.rows if r.status == "only-in-ledger"}),
            "notes": list(self.notes),
        }

    def to_json(self) -> dict[str, Any]:
        return {"summary": self.summary(), "rows": [r.to_json() for r in self.rows]}


def parse_cost_and_usage(pages: Iterable[Mapping[str, Any]], tag_key: str = TAG_APP) -> Bill:
    """Sum the pages of ``GetCostAndUsage`` responses grouped by ``tag_key`` (DAILY, UnblendedCost).

    One day's groups may be spread over several pages; the untagged group's key is ``"<tag_key>$"``.

    >>> page = {"ResultsByTime": [{"TimePeriod": {"Start": "2026-03-01", "End": "2026-03-02"}, "Total": {},
    ...   "Groups": [{"Keys": ["cloudmodal-app$ap-1"], "Metrics": {"UnblendedCost": {"Amount": "1.5",
    ...   "Unit": "USD"}}}], "Estimated": True}]}
    >>> parse_cost_and_usage([page])
    Bill(amounts={('2026-03-01', 'ap-1'): 1.5}, estimated={'2026-03-01': True})
    """
    prefix = f"{tag_key}$"
    amounts: dict[tuple[str, str], float] = {}
    estimated: dict[str, bool] = {}
    for page in pages:
        for result in page.get("ResultsByTime") or ():
            period = result["TimePeriod"]
            day = period["Start"]
            if _date(period["End"]) - _date(day) != dt.timedelta(days=1):
                raise ValueError(
                    f"Cost Explorer period {day}..{period['End']} is not one day: ask for Granularity DAILY."
                )
            estimated[day] = estimated.get(day, False) or bool(result.get("Estimated", False))
            for group in result.get("Groups") or ():
                key = next((k for k in group.get("Keys") or () if k.startswith(prefix)), None)
                if key is None:
                    raise ValueError(
                        f"Cost Explorer group {group.get('Keys')!r} is not by the tag {tag_key!r}: "
                        f'ask for GroupBy [{{"Type": "TAG", "Key": "{tag_key}"}}].'
                    )
                metric = group["Metrics"]["UnblendedCost"]
                if metric.get("Unit", "USD") != "USD":
                    raise ValueError(f"Cost Explorer answered in {metric['Unit']}; the ledger is in USD.")
                app_id = key[len(prefix) :]
                amounts[(day, app_id)] = amounts.get((day, app_id), 0.0) + float(metric["Amount"])
    return Bill(amounts, estimated)


def days_between(start: str, end: str) -> list[str]:
    """The UTC days ``[start, end)``, as ISO dates.

    >>> days_between("2026-02-27", "2026-03-02")
    ['2026-02-27', '2026-02-28', '2026-03-01']
    """
    d, stop = _date(start), _date(end)
    out = []
    while d < stop:
        out.append(d.isoformat())
        d += dt.timedelta(days=1)
    return out


def reconcile(
    ledger: Mapping[tuple[str, str], LedgerCell],
    bill: Bill,
    *,
    start: str,
    end: str,
    known_apps: Mapping[str, str],
    now: float,
    apps: set[str] | None = None,
) -> Reconciliation:
    """Rows for the days ``[start, end)``: every (day, app) the ledger (``ledger[(app id, day)]``) or the bill
    has, and each day's untagged cost. ``known_apps``: this control plane's app ids -> names; ``now``: the
    time the bill was read (for Cost Explorer's lag); ``apps``: only these app ids (the untagged cost, which
    belongs to no app, is then left out)."""
    any_tagged = any(app_id and abs(v) >= ROUNDING_USD for (_d, app_id), v in bill.amounts.items())
    rows: list[Row] = []
    for day in days_between(start, end):
        pending = _pending(day, bill, now)
        ids = {a for (a, d) in ledger if d == day} | {a for (d, a) in bill.amounts if d == day and a}
        if apps is not None:
            ids &= apps
        for app_id in sorted(ids, key=lambda a: (known_apps.get(a, a), a)):
            cell = ledger.get((app_id, day))
            billed = bill.amounts.get((day, app_id))
            row = _row(day, app_id, known_apps, cell, billed, pending, any_tagged)
            if row is not None:
                rows.append(row)
        untagged = bill.amounts.get((day, ""))
        if apps is None and untagged is not None and abs(untagged) >= ROUNDING_USD:
            rows.append(Row(day, "", "(untagged)", None, untagged, "untagged", (R_UNTAGGED, *pending)))
    notes = []
    ledger_total = sum(
        c.cost for (a, d), c in ledger.items() if start <= d < end and (apps is None or a in apps)
    )
    if not any_tagged and ledger_total >= ROUNDING_USD:
        notes.append(
            f"The ledger has ${ledger_total:,.2f} of AWS instance time in this period, but no cost in the bill "
            "carries the cloudmodal-app tag: activate it as a cost allocation tag in the account that pays "
            "(Billing console → Cost allocation tags). AWS applies it from then on (a backfill can be "
            "requested for earlier months)."
        )
    if apps is not None:
        notes.append(
            "Only the chosen app: the cost under the empty tag value, which no app owns, is not shown."
        )
    return Reconciliation(start, end, rows, notes)


def _row(
    day: str,
    app_id: str,
    known_apps: Mapping[str, str],
    cell: LedgerCell | None,
    billed: float | None,
    pending: tuple[str, ...],
    any_tagged: bool,
) -> Row | None:
    ledger = None if cell is None or abs(cell.cost) < 1e-9 else cell.cost
    if ledger is None and billed is None:
        return None  # a ledger day with nothing billed on it
    diff = (billed or 0.0) - (ledger or 0.0)
    spot = [R_SPOT] if cell is not None and cell.spot_cost >= ROUNDING_USD else []
    status: Status
    if abs(diff) < ROUNDING_USD:
        status, reasons = "match", [R_MATCH, *pending]
    elif ledger is None:
        status = "only-in-bill"
        reasons = [R_OURS_UNLEDGERED if app_id in known_apps else R_FOREIGN, *pending]
    elif billed is None:
        # a bill still arriving is the likeliest cause: it comes first
        status, reasons = "only-in-ledger", [*pending, R_NOT_BILLED if any_tagged else R_NO_TAGS]
    elif diff > 0:
        status, reasons = "bill-higher", [R_HIGHER, *spot, *pending]
    else:
        status, reasons = "bill-lower", [*pending, R_LOWER, *spot]
    return Row(day, app_id, known_apps.get(app_id, app_id), ledger, billed, status, tuple(reasons))


def _pending(day: str, bill: Bill, now: float) -> tuple[str, ...]:
    """Why the bill of ``day`` is not final yet, if it is not."""
    out = []
    if bill.estimated.get(day, False):
        out.append(R_ESTIMATED)
    day_end = dt.datetime.combine(_date(day), dt.time(), dt.UTC).timestamp() + DAY_S
    if now < day_end + LAG_S:
        out.append(R_LAG)
    return tuple(out)


def _date(s: str) -> dt.date:
    return dt.date.fromisoformat(s[:10])
