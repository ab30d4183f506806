"""The ledger beside Cost Explorer's bill: parsing the real response shape, and each explanation only where it
applies (tables of cases, each with a negative control)."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from cloudmodal import cost_reconcile as cr
from cloudmodal.cost_reconcile import Bill, LedgerCell, parse_cost_and_usage, reconcile

DAY = "2026-03-01"
# Two days after DAY ended: Cost Explorer's 24 h lag is over.
SETTLED = dt.datetime(2026, 3, 4, tzinfo=dt.UTC).timestamp()
KNOWN = {"ap-ours": "train", "ap-spot": "spotty", "ap-quiet": "quiet"}


def page(*days: tuple[str, list[tuple[str, str]], bool], token: str | None = None) -> dict[str, Any]:
    """A GetCostAndUsage response page: (day, [(tag value, amount string)], estimated) per day."""
    out: dict[str, Any] = {
        "GroupDefinitions": [{"Type": "TAG", "Key": "cloudmodal-app"}],
        "ResultsByTime": [
            {
                "TimePeriod": {
                    "Start": d,
                    "End": (dt.date.fromisoformat(d) + dt.timedelta(days=1)).isoformat(),
                },
                "Total": {},
                "Groups": [
                    {
                        "Keys": [f"cloudmodal-app${v}"],
                        "Metrics": {"UnblendedCost": {"Amount": a, "Unit": "USD"}},
                    }
                    for v, a in groups
                ],
                "Estimated": est,
            }
            for d, groups, est in days
        ],
        "DimensionValueAttributes": [],
    }
    if token:
        out["NextPageToken"] = token
    return out


def one_row(
    ledger: float | None,
    bill: float | None,
    *,
    app: str = "ap-ours",
    spot: float = 0.0,
    estimated: bool = False,
    now: float = SETTLED,
    others_tagged: bool = True,
) -> cr.Row:
    led = {} if ledger is None else {(app, DAY): LedgerCell(ledger, spot)}
    amounts = {} if bill is None else {(DAY, app): bill}
    if others_tagged:
        amounts[(DAY, "ap-other-team-thing")] = 0.0  # present but nothing: not a row
        amounts[("2026-02-28", "ap-ours")] = 5.0  # tagged cost exists in the bill (the tag is active)
    res = reconcile(
        led,
        Bill(amounts, {DAY: estimated}),
        start=DAY,
        end="2026-03-02",
        known_apps=KNOWN,
        now=now,
    )
    rows = [r for r in res.rows if r.app_id == app]
    assert len(rows) == 1, res.rows
    return rows[0]


# -- parsing -------------------------------------------------------------------------------------------
def test_parse_sums_pages_and_keeps_the_untagged_group() -> None:
    p1 = page((DAY, [("ap-ours", "1.2500000000"), ("", "3.0000000001")], True), token="t1")
    p2 = page((DAY, [("ap-ours", "0.25")], False), ("2026-03-02", [], False))  # the day's rest on page 2
    bill = parse_cost_and_usage([p1, p2])
    assert bill.amounts == {(DAY, "ap-ours"): pytest.approx(1.5), (DAY, ""): pytest.approx(3.0000000001)}
    assert bill.estimated == {DAY: True, "2026-03-02": False}  # estimated if any page says so


def test_parse_value_with_a_dollar_sign_keeps_it() -> None:
    bill = parse_cost_and_usage([page((DAY, [("a$b", "1")], False))])
    assert bill.amounts == {(DAY, "a$b"): 1.0}


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda p: p["ResultsByTime"][0]["TimePeriod"].update(End="2026-04-01"), "Granularity DAILY"),
        (lambda p: p["ResultsByTime"][0]["Groups"][0].update(Keys=["SERVICE$Amazon EC2"]), "GroupBy"),
        (
            lambda p: p["ResultsByTime"][0]["Groups"][0]["Metrics"]["UnblendedCost"].update(Unit="EUR"),
            "EUR",
        ),
    ],
    ids=["monthly", "grouped-by-service", "not-usd"],
)
def test_parse_refuses_answers_to_another_question(mutate: Any, message: str) -> None:
    p = page((DAY, [("ap-ours", "1")], False))
    parse_cost_and_usage([p])  # control: the unmodified page parses
    mutate(p)
    with pytest.raises(ValueError, match=message):
        parse_cost_and_usage([p])


# -- one row: status and explanations --------------------------------------------------------------------
@pytest.mark.parametrize(
    "ledger, bill, kw, status, has, lacks",
    [
        (2.0, 2.0099, {}, "match", [cr.R_MATCH], [cr.R_HIGHER, cr.R_LOWER, cr.R_LAG, cr.R_ESTIMATED]),
        (2.0, 1.9901, {}, "match", [cr.R_MATCH], [cr.R_LOWER]),
        (2.0, 2.011, {}, "bill-higher", [cr.R_HIGHER], [cr.R_MATCH, cr.R_LOWER, cr.R_SPOT]),
        (2.0, 1.5, {}, "bill-lower", [cr.R_LOWER], [cr.R_MATCH, cr.R_HIGHER, cr.R_SPOT]),
        (2.0, 1.5, {"app": "ap-spot", "spot": 2.0}, "bill-lower", [cr.R_LOWER, cr.R_SPOT], [cr.R_HIGHER]),
        (2.0, 2.5, {"app": "ap-spot", "spot": 2.0}, "bill-higher", [cr.R_HIGHER, cr.R_SPOT], [cr.R_LOWER]),
        (2.0, 1.5, {"estimated": True}, "bill-lower", [cr.R_ESTIMATED, cr.R_LOWER], [cr.R_LAG]),
        # the day ended 12 h ago: Cost Explorer's lag, even though AWS did not flag it Estimated
        (2.0, 1.5, {"now": SETTLED - 2.5 * 86400}, "bill-lower", [cr.R_LAG], [cr.R_ESTIMATED]),
        (None, 3.0, {"app": "ap-stranger"}, "only-in-bill", [cr.R_FOREIGN], [cr.R_OURS_UNLEDGERED]),
        (None, 3.0, {"app": "ap-quiet"}, "only-in-bill", [cr.R_OURS_UNLEDGERED], [cr.R_FOREIGN]),
        (2.0, None, {}, "only-in-ledger", [cr.R_NOT_BILLED], [cr.R_NO_TAGS, cr.R_LAG]),
        (2.0, None, {"others_tagged": False}, "only-in-ledger", [cr.R_NO_TAGS], [cr.R_NOT_BILLED]),
        (0.004, None, {}, "match", [cr.R_MATCH], [cr.R_NOT_BILLED]),  # under a cent: nothing to explain
        (None, -0.003, {}, "match", [cr.R_MATCH], [cr.R_FOREIGN, cr.R_OURS_UNLEDGERED]),
    ],
    ids=[
        "match-above",
        "match-below",
        "higher",
        "lower",
        "lower-spot",
        "higher-spot",
        "estimated",
        "lag",
        "foreign-app",
        "our-app-no-ledger",
        "not-billed",
        "tag-not-active",
        "ledger-rounding",
        "bill-rounding",
    ],
)
def test_row_status_and_reasons(
    ledger: float | None,
    bill: float | None,
    kw: dict[str, Any],
    status: str,
    has: list[str],
    lacks: list[str],
) -> None:
    row = one_row(ledger, bill, **kw)
    assert row.status == status
    for reason in has:
        assert reason in row.reasons
    for reason in lacks:
        assert reason not in row.reasons
    assert len(set(row.reasons)) == len(row.reasons)


def test_difference_is_bill_minus_ledger() -> None:
    assert one_row(2.0, 2.5).difference == pytest.approx(0.5)
    assert one_row(2.0, 1.5).difference == pytest.approx(-0.5)
    assert one_row(None, 3.0, app="ap-stranger").difference == pytest.approx(3.0)


def test_an_incomplete_bill_is_named_before_the_standing_reasons() -> None:
    row = one_row(2.0, None, estimated=True)
    assert row.reasons[0] == cr.R_ESTIMATED and row.reasons[-1] == cr.R_NOT_BILLED


# -- the whole period -------------------------------------------------------------------------------------
def test_period_rows_untagged_and_summary() -> None:
    ledger = {
        ("ap-ours", DAY): LedgerCell(10.0),
        ("ap-ours", "2026-03-02"): LedgerCell(4.0),
        ("ap-spot", DAY): LedgerCell(1.0, 1.0),
        ("ap-ours", "2026-02-27"): LedgerCell(99.0),  # outside the period: not counted
    }
    bill = parse_cost_and_usage(
        [
            page(
                (DAY, [("ap-ours", "10.004"), ("ap-spot", "0.8"), ("", "7.5"), ("ap-stranger", "2")], False),
                ("2026-03-02", [("ap-ours", "4.6"), ("", "0.001")], True),
            )
        ]
    )
    res = reconcile(ledger, bill, start=DAY, end="2026-03-03", known_apps=KNOWN, now=SETTLED)
    got = [(r.day, r.app, r.status) for r in res.rows]
    assert got == [
        (DAY, "ap-stranger", "only-in-bill"),  # sorted by app name: unknown ids by their id
        (DAY, "spotty", "bill-lower"),
        (DAY, "train", "match"),
        (DAY, "(untagged)", "untagged"),
        ("2026-03-02", "train", "bill-higher"),  # the untagged $0.001 is rounding: no row
    ]
    untagged = res.rows[3]
    assert untagged.difference is None and untagged.ledger is None and cr.R_UNTAGGED in untagged.reasons
    s = res.summary()
    assert s["ledger_usd"] == pytest.approx(15.0)
    assert s["bill_tagged_usd"] == pytest.approx(10.004 + 0.8 + 2 + 4.6)
    assert s["bill_untagged_usd"] == pytest.approx(7.5)
    assert s["difference_usd"] == pytest.approx(10.004 + 0.8 + 2 + 4.6 - 15.0)
    assert s["days_not_final"] == ["2026-03-02"]
    assert s["apps_only_in_bill"] == ["ap-stranger"] and s["apps_only_in_ledger"] == []
    assert s["rows_by_status"] == {
        "bill-higher": 1,
        "bill-lower": 1,
        "match": 1,
        "only-in-bill": 1,
        "untagged": 1,
    }
    assert res.notes == []  # the tag is active: no activation note
    js = res.to_json()
    assert js["rows"][2]["difference_usd"] == pytest.approx(0.004) and js["rows"][2]["status"] == "match"


def test_no_tagged_cost_at_all_says_to_activate_the_tag() -> None:
    ledger = {("ap-ours", DAY): LedgerCell(10.0)}
    bill = parse_cost_and_usage([page((DAY, [("", "25.0")], False))])
    res = reconcile(ledger, bill, start=DAY, end="2026-03-02", known_apps=KNOWN, now=SETTLED)
    assert [r.status for r in res.rows] == ["only-in-ledger", "untagged"]
    assert cr.R_NO_TAGS in res.rows[0].reasons
    assert len(res.notes) == 1 and "activate it as a cost allocation tag" in res.notes[0]
    # control: with the tag active somewhere in the bill, no such note
    bill2 = parse_cost_and_usage([page((DAY, [("", "25.0"), ("ap-x", "1")], False))])
    res2 = reconcile(ledger, bill2, start=DAY, end="2026-03-02", known_apps=KNOWN, now=SETTLED)
    mine = next(r for r in res2.rows if r.app_id == "ap-ours")
    assert res2.notes == [] and cr.R_NOT_BILLED in mine.reasons and cr.R_NO_TAGS not in mine.reasons


def test_one_app_leaves_the_untagged_cost_out() -> None:
    ledger = {("ap-ours", DAY): LedgerCell(10.0), ("ap-spot", DAY): LedgerCell(1.0)}
    bill = parse_cost_and_usage([page((DAY, [("ap-ours", "10"), ("ap-spot", "1"), ("", "9")], False))])
    res = reconcile(
        ledger, bill, start=DAY, end="2026-03-02", known_apps=KNOWN, now=SETTLED, apps={"ap-ours"}
    )
    assert [(r.app_id, r.status) for r in res.rows] == [("ap-ours", "match")]
    assert any("empty tag value" in n for n in res.notes)


def test_days_between_and_pending_edges() -> None:
    assert cr.days_between("2026-02-28", "2026-03-01") == ["2026-02-28"]
    assert cr.days_between(DAY, DAY) == []
    day_end = dt.datetime(2026, 3, 2, tzinfo=dt.UTC).timestamp()
    bill = Bill({}, {})
    assert cr._pending(DAY, bill, day_end + cr.LAG_S - 1) == (cr.R_LAG,)
    assert cr._pending(DAY, bill, day_end + cr.LAG_S) == ()
