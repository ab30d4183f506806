"""Schedules for ``@app.function(schedule=...)``: :class:`Period` (every N units) and :class:`Cron`.

Both validate on construction, turn into a wire form with ``to_wire()``, and answer ``next_after(dt)``
purely (the scheduler passes the clock in; nothing here reads it).
"""

from __future__ import annotations

import difflib
import math
from datetime import UTC, datetime, timedelta, tzinfo
from typing import Any

from cloudmodal.exception import InvalidError

__all__ = ["Cron", "Period", "Schedule", "schedule_from_wire"]

_CRON_ALIASES = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly")
_CRON_FORM = (
    "The form is 'MINUTE HOUR DAY-OF-MONTH MONTH DAY-OF-WEEK' (5 fields), e.g. '0 9 * * 1-5' for 09:00 on "
    "weekdays or '*/15 * * * *' for every 15 minutes; @hourly, @daily, @weekly, @monthly and @yearly also work."
)


def _to_utc(dt: datetime) -> datetime:
    """Aware datetimes are converted; naive ones are taken to be UTC."""
    if not isinstance(dt, datetime):
        raise TypeError(f"expected a datetime, got {type(dt).__name__}")
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)


def _like(result_utc: datetime, original: datetime) -> datetime:
    """Return ``result_utc`` in the same style as ``original``: naive UTC for naive, else its timezone."""
    if original.tzinfo is None:
        return result_utc.replace(tzinfo=None)
    return result_utc.astimezone(original.tzinfo)


class Schedule:
    """Base of :class:`Period` and :class:`Cron`."""

    __slots__ = ()

    def to_wire(self) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def next_after(self, dt: datetime) -> datetime:  # pragma: no cover - abstract
        raise NotImplementedError


class Period(Schedule):
    """Run every fixed period, calendar-aware (``months=1`` from Jan 31 is Feb 28/29, then Mar 31).

    ```python
    @app.function(schedule=cloudmodal.Period(hours=6))
    def refresh():
        ...
    ```
    """

    __slots__ = ("years", "months", "weeks", "days", "hours", "minutes", "seconds")

    years: int
    months: int
    weeks: int
    days: int
    hours: int
    minutes: int
    seconds: float

    def __init__(
        self,
        *,
        years: int = 0,
        months: int = 0,
        weeks: int = 0,
        days: int = 0,
        hours: int = 0,
        minutes: int = 0,
        seconds: float = 0,
    ) -> None:
        values = {
            "years": years,
            "months": months,
            "weeks": weeks,
            "days": days,
            "hours": hours,
            "minutes": minutes,
        }
        for name, v in values.items():
            if isinstance(v, bool) or not isinstance(v, int):
                raise InvalidError(
                    f"Period({name}={v!r}): {name} must be a whole number. "
                    f"For fractions use a smaller unit, e.g. Period(minutes=90) instead of Period(hours=1.5)."
                )
            if v < 0:
                raise InvalidError(f"Period({name}={v}): values must be >= 0.")
        if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not math.isfinite(seconds):
            raise InvalidError(f"Period(seconds={seconds!r}): seconds must be a finite number.")
        if seconds < 0:
            raise InvalidError(f"Period(seconds={seconds}): values must be >= 0.")
        for name, v in values.items():
            object.__setattr__(self, name, v)
        object.__setattr__(self, "seconds", float(seconds) if not isinstance(seconds, int) else seconds)
        if not (years or months) and self._fixed_seconds() < 1.0:
            raise InvalidError(
                f"{self!r} is shorter than 1 second. Give a positive period, e.g. Period(minutes=5) or Period(days=1)."
            )

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("Period is immutable; build a new one")

    def __getstate__(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__}

    def __setstate__(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            object.__setattr__(self, k, v)

    def _fixed_seconds(self) -> float:
        return self.weeks * 604800 + self.days * 86400 + self.hours * 3600 + self.minutes * 60 + self.seconds

    def _delta(self, k: int = 1) -> Any:
        from dateutil.relativedelta import relativedelta

        total_us = round(self.seconds * 1_000_000) * k
        return relativedelta(
            years=self.years * k,
            months=self.months * k,
            weeks=self.weeks * k,
            days=self.days * k,
            hours=self.hours * k,
            minutes=self.minutes * k,
            seconds=total_us // 1_000_000,
            microseconds=total_us % 1_000_000,
        )

    def _at(self, anchor_utc: datetime, k: int) -> datetime:
        if not (self.years or self.months):
            return anchor_utc + timedelta(seconds=self._fixed_seconds() * k)
        return anchor_utc + self._delta(k)

    def next_after(self, dt: datetime, *, anchor: datetime | None = None) -> datetime:
        """The first firing strictly after ``dt``.

        Without ``anchor`` that is ``dt + period``. With ``anchor`` (when the schedule started, e.g. the
        deploy time) it is the first ``anchor + k*period`` (k >= 1) after ``dt``, so firings never drift
        (monthly from Jan 31: Feb 28, Mar 31, Apr 30…). Arithmetic is done in UTC; naive datetimes are UTC
        and the result has the same timezone style as ``dt``.
        """
        now = _to_utc(dt)
        if anchor is None:
            return _like(self._at(now, 1), dt)
        start = _to_utc(anchor)
        if now < start:
            return _like(self._at(start, 1), dt)
        # Estimate k from an average length, then correct: cheap even for calendar units.
        avg = self._fixed_seconds() + self.years * 365.2425 * 86400 + self.months * 30.436875 * 86400
        k = max(1, int((now - start).total_seconds() // avg))
        while k > 1 and self._at(start, k - 1) > now:
            k -= 1
        while self._at(start, k) <= now:
            k += 1
        return _like(self._at(start, k), dt)

    def to_wire(self) -> dict[str, Any]:
        return {
            "type": "period",
            "years": self.years,
            "months": self.months,
            "weeks": self.weeks,
            "days": self.days,
            "hours": self.hours,
            "minutes": self.minutes,
            "seconds": self.seconds,
        }

    def _key(self) -> tuple[Any, ...]:
        return (self.years, self.months, self.weeks, self.days, self.hours, self.minutes, self.seconds)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Period) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(("period", self._key()))

    def __repr__(self) -> str:
        names = ("years", "months", "weeks", "days", "hours", "minutes", "seconds")
        parts = [f"{n}={v}" for n, v in zip(names, self._key(), strict=True) if v]
        return f"Period({', '.join(parts)})"


def _zone(name: object) -> tzinfo:
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    if not isinstance(name, str) or not name.strip():
        raise InvalidError(
            f"Cron timezone must be an IANA timezone name such as 'UTC' or 'America/New_York', not {name!r}."
        )
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        from zoneinfo import available_timezones

        zones = sorted(available_timezones() | {"UTC"})
        by_lower = {z.lower(): z for z in zones}
        if name.lower() in by_lower:
            hint = f" Did you mean {by_lower[name.lower()]!r}? Timezone names are case-sensitive."
        else:
            close = difflib.get_close_matches(name, zones, n=3, cutoff=0.6)
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise InvalidError(
            f"Unknown timezone {name!r} in Cron.{hint} Use an IANA name such as 'UTC', 'Europe/Berlin' or "
            "'America/New_York' (see `python -c \"import zoneinfo; print(zoneinfo.available_timezones())\"`)."
        ) from None


class Cron(Schedule):
    """Run on a cron schedule, evaluated in ``timezone`` (an IANA name; default UTC).

    ```python
    @app.function(schedule=cloudmodal.Cron("0 9 * * 1-5", timezone="Europe/Berlin"))
    def morning_report():
        ...
    ```

    Unlike Modal (which checks cron strings server-side), the string is validated here, at decoration.
    """

    __slots__ = ("cron_string", "timezone", "_tz")

    cron_string: str
    timezone: str
    _tz: tzinfo

    def __init__(self, cron_string: str, timezone: str = "UTC") -> None:
        if not isinstance(cron_string, str):
            raise InvalidError(
                f"Cron expects a string, not {type(cron_string).__name__} ({cron_string!r}). {_CRON_FORM}"
            )
        expr = " ".join(cron_string.split())
        if not expr:
            raise InvalidError(f"Empty cron string. {_CRON_FORM}")
        if expr.startswith("@"):
            if expr.lower() not in _CRON_ALIASES:
                raise InvalidError(f"Invalid cron string {cron_string!r}: unknown alias. {_CRON_FORM}")
            expr = expr.lower()
        else:
            n = len(expr.split(" "))
            if n != 5:
                extra = " (a seconds or year field is not supported)" if n in (6, 7) else ""
                raise InvalidError(
                    f"Invalid cron string {cron_string!r}: it has {n} field{'s' if n != 1 else ''}, not 5{extra}. {_CRON_FORM}"
                )
            from croniter import croniter

            try:
                it = croniter(expr, datetime(2000, 1, 1))
            except Exception as e:  # croniter raises several error types (ValueError/KeyError subclasses)
                raise InvalidError(f"Invalid cron string {cron_string!r}: {e}. {_CRON_FORM}") from None
            try:
                it.get_next(datetime)
            except Exception:  # e.g. '0 0 31 2 *' (February 31st) never matches
                raise InvalidError(
                    f"Cron string {cron_string!r} never fires (no date matches it, e.g. February 31st). "
                    f"Check the day-of-month and month fields. {_CRON_FORM}"
                ) from None
        tz = _zone(timezone)
        object.__setattr__(self, "cron_string", expr)
        object.__setattr__(self, "timezone", timezone)
        object.__setattr__(self, "_tz", tz)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("Cron is immutable; build a new one")

    def __getstate__(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__}

    def __setstate__(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            object.__setattr__(self, k, v)

    def next_after(self, dt: datetime) -> datetime:
        """The first firing strictly after ``dt``, evaluated on the wall clock of ``self.timezone``
        (DST-aware). Naive ``dt`` is taken as UTC; the result has the same timezone style as ``dt``."""
        from croniter import croniter

        local = _to_utc(dt).astimezone(self._tz)
        nxt = croniter(self.cron_string, local).get_next(datetime)
        return _like(nxt.astimezone(UTC), dt)

    def to_wire(self) -> dict[str, Any]:
        return {"type": "cron", "cron_string": self.cron_string, "timezone": self.timezone}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Cron) and (self.cron_string, self.timezone) == (
            other.cron_string,
            other.timezone,
        )

    def __hash__(self) -> int:
        return hash(("cron", self.cron_string, self.timezone))

    def __repr__(self) -> str:
        tz = "" if self.timezone == "UTC" else f", timezone={self.timezone!r}"
        return f"Cron({self.cron_string!r}{tz})"


def schedule_from_wire(d: dict[str, Any]) -> Period | Cron:
    """Rebuild a schedule from :meth:`Period.to_wire` / :meth:`Cron.to_wire` (used by the scheduler)."""
    kind = d.get("type")
    if kind == "cron":
        return Cron(d["cron_string"], timezone=d.get("timezone", "UTC"))
    if kind == "period":
        return Period(**{k: v for k, v in d.items() if k != "type"})
    raise ValueError(f"not a schedule wire form: {d!r}")
