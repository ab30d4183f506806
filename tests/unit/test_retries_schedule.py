"""Retries, Period and Cron: validation messages, delays, and next firing times."""

from __future__ import annotations

import pickle
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from cloudmodal import Cron, Period, Retries
from cloudmodal.exception import InvalidError
from cloudmodal.retries import parse_retries
from cloudmodal.schedule import schedule_from_wire
from cloudmodal.spec import RetryPolicy

# ------------------------------------------------------------------------------------------------ Retries


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"max_retries": -1}, ["non-negative", "max_retries=0"]),
        ({"max_retries": 1.5}, ["whole number", "Retries(max_retries=3)"]),
        ({"max_retries": True}, ["whole number"]),
        ({"max_retries": 2, "backoff_coefficient": 0.5}, ["backoff_coefficient", "between 1.0", "10.0"]),
        ({"max_retries": 2, "backoff_coefficient": 10.5}, ["backoff_coefficient", "10.0"]),
        ({"max_retries": 2, "initial_delay": -1}, ["initial_delay", "between 0 and 60"]),
        ({"max_retries": 2, "initial_delay": 61}, ["initial_delay", "between 0 and 60"]),
        ({"max_retries": 2, "max_delay": 0.5}, ["max_delay", "between 1 and 60"]),
        ({"max_retries": 2, "max_delay": 61}, ["max_delay", "between 1 and 60"]),
        ({"max_retries": 2, "initial_delay": "1"}, ["must be a number"]),
    ],
)
def test_retries_validation(kwargs, expected):
    with pytest.raises(InvalidError) as e:
        Retries(**kwargs)
    for text in expected:
        assert text in str(e.value)


@pytest.mark.parametrize(
    ("kwargs", "delays"),
    [
        ({"max_retries": 4}, [1.0, 2.0, 4.0, 8.0]),
        ({"max_retries": 3, "backoff_coefficient": 1.0, "initial_delay": 5}, [5.0, 5.0, 5.0]),
        (
            {"max_retries": 5, "backoff_coefficient": 3.0, "initial_delay": 10, "max_delay": 60},
            [10, 30, 60, 60, 60],
        ),
        ({"max_retries": 2, "initial_delay": 0}, [0.0, 0.0]),
        ({"max_retries": 0}, []),
        ({"max_retries": 3, "backoff_coefficient": 10, "initial_delay": 1, "max_delay": 50}, [1, 10, 50]),
    ],
)
def test_retries_delays(kwargs, delays):
    r = Retries(**kwargs)
    assert r.delays() == pytest.approx(delays)
    assert [r.to_policy().delay_for(n) for n in range(1, len(delays) + 1)] == pytest.approx(delays)


def test_retries_boundaries_accepted():
    Retries(max_retries=0, backoff_coefficient=1.0, initial_delay=0.0, max_delay=1.0)
    Retries(max_retries=100, backoff_coefficient=10.0, initial_delay=60.0, max_delay=60.0)


def test_int_retries_mean_fixed_one_second_delay():
    r = parse_retries(3, "f")
    assert r == Retries(max_retries=3, backoff_coefficient=1.0, initial_delay=1.0)
    assert r.delays() == [1.0, 1.0, 1.0]
    assert parse_retries(0, "f") is None
    assert parse_retries(None, "f") is None


@pytest.mark.parametrize("bad", [-1, "3", 2.5, True])
def test_parse_retries_rejects(bad):
    with pytest.raises(InvalidError) as e:
        parse_retries(bad, "@app.function(retries=...)")
    assert "retries" in str(e.value)


def test_retries_wire_and_policy_round_trip():
    r = Retries(max_retries=2, backoff_coefficient=1.5, initial_delay=0.5, max_delay=30)
    assert Retries.from_wire(r.to_wire()) == r
    assert r.to_policy() == RetryPolicy(2, 1.5, 0.5, 30.0)
    assert hash(r) == hash(Retries(max_retries=2, backoff_coefficient=1.5, initial_delay=0.5, max_delay=30))
    assert pickle.loads(pickle.dumps(r)) == r
    with pytest.raises(AttributeError):
        r.max_retries = 5  # type: ignore[misc]


# ------------------------------------------------------------------------------------------------ Period


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({}, ["shorter than 1 second", "Period(minutes=5)"]),
        ({"seconds": 0.5}, ["shorter than 1 second"]),
        ({"hours": -1}, [">= 0"]),
        ({"hours": 1.5}, ["whole number", "Period(minutes=90)"]),
        ({"days": True}, ["whole number"]),
        ({"seconds": float("inf")}, ["finite"]),
    ],
)
def test_period_validation(kwargs, expected):
    with pytest.raises(InvalidError) as e:
        Period(**kwargs)
    for text in expected:
        assert text in str(e.value)


@pytest.mark.parametrize(
    ("period", "now", "expected"),
    [
        (Period(hours=6), datetime(2025, 1, 1, 13), datetime(2025, 1, 1, 19)),
        (Period(minutes=1, seconds=30), datetime(2025, 1, 1), datetime(2025, 1, 1, 0, 1, 30)),
        (Period(days=1), datetime(2025, 2, 28), datetime(2025, 3, 1)),
        (Period(weeks=2), datetime(2025, 1, 1), datetime(2025, 1, 15)),
        (Period(months=1), datetime(2025, 1, 31), datetime(2025, 2, 28)),
        (Period(months=1), datetime(2024, 1, 31), datetime(2024, 2, 29)),
        (Period(years=1), datetime(2024, 2, 29), datetime(2025, 2, 28)),
        (Period(seconds=1.25), datetime(2025, 1, 1), datetime(2025, 1, 1, 0, 0, 1, 250000)),
    ],
)
def test_period_next_after(period, now, expected):
    assert period.next_after(now) == expected


@pytest.mark.parametrize(
    ("period", "anchor", "now", "expected"),
    [
        # fixed periods: the grid anchor + k*period, never drifting
        (Period(hours=6), datetime(2025, 1, 1), datetime(2025, 1, 1, 13, 5), datetime(2025, 1, 1, 18)),
        (Period(hours=6), datetime(2025, 1, 1), datetime(2025, 1, 1, 18), datetime(2025, 1, 2)),
        # 59 days = 84960 min; the next multiple of 7 is 84966 min
        (Period(minutes=7), datetime(2025, 1, 1), datetime(2025, 3, 1), datetime(2025, 3, 1, 0, 6)),
        # before the anchor: the first firing is one period after it
        (Period(days=1), datetime(2025, 1, 10), datetime(2025, 1, 1), datetime(2025, 1, 11)),
        # calendar months from Jan 31: Feb 28, Mar 31, Apr 30, May 31 (no drift to the 28th)
        (Period(months=1), datetime(2025, 1, 31), datetime(2025, 3, 1), datetime(2025, 3, 31)),
        (Period(months=1), datetime(2025, 1, 31), datetime(2025, 4, 30), datetime(2025, 5, 31)),
        (Period(months=1), datetime(2025, 1, 31), datetime(2027, 2, 1), datetime(2027, 2, 28)),
        (Period(years=1), datetime(2020, 2, 29), datetime(2023, 6, 1), datetime(2024, 2, 29)),
    ],
)
def test_period_next_after_anchor(period, anchor, now, expected):
    assert period.next_after(now, anchor=anchor) == expected


def test_period_keeps_timezone_style_and_uses_utc_arithmetic():
    ny = ZoneInfo("America/New_York")
    # 2025-03-09 02:00 local is the DST jump: 6 hours after 00:00 EST is 07:00 EDT in wall time
    start = datetime(2025, 3, 9, 0, 0, tzinfo=ny)
    nxt = Period(hours=6).next_after(start)
    assert nxt.tzinfo is ny
    assert nxt.astimezone(UTC) - start.astimezone(UTC) == timedelta(hours=6)  # elapsed, not wall-clock
    assert (nxt.hour, nxt.utcoffset()) == (7, timedelta(hours=-4))
    aware_utc = Period(hours=1).next_after(datetime(2025, 1, 1, tzinfo=UTC))
    assert aware_utc == datetime(2025, 1, 1, 1, tzinfo=UTC)


def test_period_wire_eq_hash_pickle():
    p = Period(days=1, hours=2, seconds=3.5)
    assert p.to_wire() == {
        "type": "period",
        "years": 0,
        "months": 0,
        "weeks": 0,
        "days": 1,
        "hours": 2,
        "minutes": 0,
        "seconds": 3.5,
    }
    assert schedule_from_wire(p.to_wire()) == p
    assert hash(p) == hash(Period(days=1, hours=2, seconds=3.5))
    assert pickle.loads(pickle.dumps(p)) == p
    assert repr(p) == "Period(days=1, hours=2, seconds=3.5)"


# ------------------------------------------------------------------------------------------------ Cron


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("* * * *",), ["4 fields, not 5", "MINUTE HOUR DAY-OF-MONTH MONTH DAY-OF-WEEK"]),
        (("0 0 * * * *",), ["6 fields", "seconds or year field is not supported"]),
        (("61 * * * *",), ["Invalid cron string '61 * * * *'", "e.g. '0 9 * * 1-5'"]),
        (("0 25 * * *",), ["Invalid cron string"]),
        (("* * * * MON-XYZ",), ["Invalid cron string"]),
        (("0 0 31 2 *",), ["never fires", "day-of-month"]),
        (("",), ["Empty cron string"]),
        (("@often",), ["unknown alias", "@daily"]),
        ((123,), ["expects a string"]),
        (("0 9 * * *", "Europe/Berln"), ["Unknown timezone 'Europe/Berln'", "Did you mean 'Europe/Berlin'"]),
        (("0 9 * * *", "america/new_york"), ["Did you mean 'America/New_York'", "case-sensitive"]),
        (("0 9 * * *", "Mars/Olympus"), ["Unknown timezone", "IANA name"]),
        (("0 9 * * *", ""), ["IANA timezone name"]),
    ],
)
def test_cron_validation(args, expected):
    with pytest.raises(InvalidError) as e:
        Cron(*args)
    for text in expected:
        assert text in str(e.value)


@pytest.mark.parametrize(
    ("cron", "now", "expected"),
    [
        (Cron("*/15 * * * *"), datetime(2025, 1, 1, 0, 15), datetime(2025, 1, 1, 0, 30)),  # strictly after
        (Cron("*/15 * * * *"), datetime(2025, 1, 1, 0, 16, 30), datetime(2025, 1, 1, 0, 30)),
        (Cron("0 9 * * 1-5"), datetime(2025, 1, 3, 10), datetime(2025, 1, 6, 9)),  # Fri 10:00 -> Mon 09:00
        (Cron("0 0 1 * *"), datetime(2025, 1, 15), datetime(2025, 2, 1)),
        (Cron("@daily"), datetime(2025, 1, 1, 12), datetime(2025, 1, 2)),
        (Cron("@HOURLY"), datetime(2025, 1, 1, 12, 1), datetime(2025, 1, 1, 13)),
        (Cron("0 0 29 2 *"), datetime(2025, 1, 1), datetime(2028, 2, 29)),
        (Cron("  30   2 * * *  "), datetime(2025, 1, 1), datetime(2025, 1, 1, 2, 30)),
    ],
)
def test_cron_next_after_utc(cron, now, expected):
    assert cron.next_after(now) == expected
    assert cron.next_after(now.replace(tzinfo=UTC)) == expected.replace(tzinfo=UTC)


def test_cron_next_after_in_timezone_across_dst():
    c = Cron("0 9 * * *", timezone="America/New_York")
    # EST (UTC-5) before 2025-03-09, EDT (UTC-4) after: 09:00 local is 14:00 then 13:00 UTC
    assert c.next_after(datetime(2025, 3, 8, 15)) == datetime(2025, 3, 9, 13)
    assert c.next_after(datetime(2025, 3, 7, 12)) == datetime(2025, 3, 7, 14)
    berlin = ZoneInfo("Europe/Berlin")
    nxt = Cron("30 8 * * *", timezone="Europe/Berlin").next_after(datetime(2025, 6, 1, 9, tzinfo=berlin))
    assert nxt == datetime(2025, 6, 2, 8, 30, tzinfo=berlin) and nxt.tzinfo is berlin


def test_cron_wire_eq_hash_pickle():
    c = Cron("0 9 * * 1-5", timezone="Europe/Berlin")
    assert c.to_wire() == {"type": "cron", "cron_string": "0 9 * * 1-5", "timezone": "Europe/Berlin"}
    assert schedule_from_wire(c.to_wire()) == c
    assert c != Cron("0 9 * * 1-5")
    assert hash(c) == hash(Cron("0 9 * * 1-5", "Europe/Berlin"))
    restored = pickle.loads(pickle.dumps(c))
    assert restored == c and restored.next_after(datetime(2025, 1, 1)) == c.next_after(datetime(2025, 1, 1))
    with pytest.raises(ValueError):
        schedule_from_wire({"type": "sometimes"})
