"""Schedules: deployed functions with ``schedule=Period(...)`` or ``schedule=Cron(...)`` are called by the
control plane once per tick.

As on Modal, only deployed apps' schedules run: ``cloudmodal run`` of an app with a scheduled function does
not schedule it. A deployment writes a row per scheduled function (:func:`sync_app_schedules`, in the
transaction that records the deployment) holding the schedule's wire form, its ``anchor`` (the deploy: a
``Period`` counts from it, so ``Period(hours=1)`` first fires an hour after the deploy) and ``next_fire_at``.
A redeploy keeps an unchanged schedule's row (its ticks go on); a changed one starts again from the redeploy.
Stopping the app deletes its rows.

**Exactly once per tick.** The reconciling control plane (the leader; see :class:`~cloudmodal.server.db.
Leadership`) looks for rows due each reconciler tick. Firing a row is one transaction that advances its
``next_fire_at`` by compare-and-swap (``UPDATE ... WHERE function_id = :f AND next_fire_at = :seen``) and, only
if that changed a row, creates the call with its one input and the ``schedule.fired`` event. Two control
planes that both fire the same tick (two leaders for a moment, a restart overlapping the old process) race
on that row: the second's update finds ``next_fire_at`` moved and changes nothing, and its transaction
creates nothing. A crash before the commit leaves the row as it was (the tick fires at the next look); after
it, the call exists and the tick is done. So correctness never depends on there being one leader; leading
only keeps the others from trying.

**Missed ticks (no backfill, as on Modal).** When no control plane ran across several ticks, the latest tick
less than :data:`MISSED_GRACE_S` (5 minutes) old fires once, late; every older one is skipped, and listed in a
``schedule.skipped`` event (:func:`plan`). The grace covers a restart or a fail-over (seconds): the tick that
fell in it still runs. Runs missed longer ago are not made up: Modal does not backfill either, and a job run
far from its time (the 09:00 report at 11:30) is as often wrong as late. So a control plane down across ten
ticks of ``Period(seconds=2)`` fires the last of them, once; one down for an hour across a daily ``Cron``
tick skips it, and says so in the app's events.

Ticks are epoch seconds; a Period's anchor is the deploy's whole second, so its ticks are exact
(``anchor + k * period``). A tick fires within a reconciler interval (0.25 s) of its time while a control
plane runs.

Each firing is an ordinary call (kind ``schedule``) the user can look up: ``FunctionCall.from_id`` with the
call id in the ``schedule.fired`` event (``cloudmodal app events``), its logs in ``cloudmodal app logs``.
``cloudmodal app list`` shows each scheduled function's next run.

The decisions (:func:`next_tick`, :func:`plan`) are pure and take ``now``; the tests are tables.
"""

from __future__ import annotations

import logging
import math
import pickle
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import and_, delete, func, select, update

from cloudmodal.ids import new_id
from cloudmodal.schedule import Cron, Period, schedule_from_wire
from cloudmodal.server import models
from cloudmodal.server.models_schedules import FunctionSchedule
from cloudmodal.server.states import AppState, FunctionState, InputState

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection

    from cloudmodal.server.service import ControlPlane

log = logging.getLogger("cloudmodal.scheduler")

S = FunctionSchedule.__table__  # type: ignore[attr-defined]  # set by SQLAlchemy's mapping
A = models.apps
F = models.functions
CA = models.calls
I = models.inputs  # noqa: E741
E = models.events

# a missed tick younger than this still fires (once: the latest); older ones are skipped
MISSED_GRACE_S = 300.0
LISTED_SKIPS = 100  # skipped ticks listed in a schedule.skipped event (the count goes on past them)
COUNTED_SKIPS = 10_000  # skipped ticks counted one by one; past this the event says "more than"
RESCAN_S = 1.0  # the scheduler re-reads the earliest due tick this often (rows another control plane wrote)
# Call.created_by of a firing: no token's principal, so the owner and the app's members read it (not workers)
SCHEDULE_CALLER = "schedule"
# what a scheduled call's one input holds: no arguments (a scheduled function takes none; checked at decoration)
NO_ARGS = pickle.dumps(((), {}), protocol=4)


# -- pure decisions -------------------------------------------------------------------------------------------
def _dt(t: float) -> datetime:
    return datetime.fromtimestamp(t, UTC)


def next_tick(schedule: Period | Cron, anchor: float, after: float) -> float:
    """The schedule's first tick strictly after ``after`` (epoch seconds): a Period's ticks are
    ``anchor + k * period`` (k >= 1), a Cron's its matches in its timezone."""
    if isinstance(schedule, Period):
        return schedule.next_after(_dt(after), anchor=_dt(anchor)).timestamp()
    return schedule.next_after(_dt(after)).timestamp()


@dataclass(frozen=True)
class Plan:
    """What to do with a schedule whose next tick is ``due`` at ``now`` (see :func:`plan`)."""

    fire_at: float | None  # the tick to fire now; None: nothing to fire (not due, or every due tick too old)
    next_fire_at: float  # the row's next tick afterwards: always after now when something was due
    skipped: tuple[float, ...] = ()  # ticks given up, oldest first (at most LISTED_SKIPS of them)
    skipped_count: int = 0  # how many (counted up to COUNTED_SKIPS)
    skipped_more: bool = False  # more than skipped_count were given up


def plan(
    schedule: Period | Cron, anchor: float, due: float, now: float, grace_s: float = MISSED_GRACE_S
) -> Plan:
    """The missed-tick policy. Not due (``now < due``): nothing. Otherwise fire the latest tick ``<= now`` if it
    is less than ``grace_s`` old, skip every earlier due tick, and move on to the first tick after ``now``."""
    if now < due:
        return Plan(None, due)
    # the first tick within the grace (due itself when it is young enough)
    first = due if due > now - grace_s else next_tick(schedule, anchor, now - grace_s)
    fire_at: float | None = None
    after = first  # when no tick is within the grace, the first one after it is after now too
    if first <= now:
        fire_at = first
        while (after := next_tick(schedule, anchor, fire_at)) <= now:  # at most grace_s / period steps
            fire_at = after
    # every due tick before the one fired (all of them when none fires) is skipped
    stop = fire_at if fire_at is not None else after
    listed: list[float] = []
    count, t = 0, due
    while t < stop and count < COUNTED_SKIPS:  # a long outage's tail is not walked tick by tick
        if len(listed) < LISTED_SKIPS:
            listed.append(t)
        count += 1
        t = next_tick(schedule, anchor, t)
    return Plan(fire_at, after, tuple(listed), count, t < stop)


def anchor_at(now: float) -> float:
    """A schedule set at ``now`` (a deploy) counts from the whole second: its ticks are then exact floats
    (``anchor + k * period``) and read as such in events (``12:00:03``, not ``12:00:03.146219``)."""
    return float(math.floor(now))


def first_tick(schedule: Period | Cron, now: float) -> float:
    """A schedule set at ``now`` (a deploy): its first tick after ``now``, counted from :func:`anchor_at`."""
    return next_tick(schedule, anchor_at(now), now)


# -- deployments ----------------------------------------------------------------------------------------------
def sync_app_schedules(conn: Connection, app_id: str, names: list[str], now: float) -> list[dict[str, Any]]:
    """Make the app's schedule rows those of the deployed functions ``names``, in the caller's transaction
    (the one recording the deployment): a new or changed schedule starts at ``now``, an unchanged one keeps
    its next tick, a function that lost its schedule (or left the app) loses its row. Returns a
    ``schedule.set`` / ``schedule.removed`` event row for each change, written here too."""
    ephemeral = conn.execute(select(A.c.ephemeral).where(A.c.id == app_id)).scalar()
    if ephemeral is not False:  # only deployed apps are scheduled (as on Modal): a run's never are
        names = []
    rows = conn.execute(
        select(F.c.id, F.c.name, F.c.spec).where(
            and_(F.c.app_id == app_id, F.c.state == FunctionState.ACTIVE, F.c.parent_id.is_(None))
        )
    ).all()
    wanted = {
        r.id: (r.name, r.spec["schedule"]) for r in rows if r.name in names and (r.spec or {}).get("schedule")
    }
    existing = {r.function_id: r for r in conn.execute(select(S).where(S.c.app_id == app_id)).all()}
    names_by_id = {r.id: r.name for r in rows}
    events: list[dict[str, Any]] = []
    for fid in existing.keys() - wanted.keys():
        conn.execute(delete(S).where(S.c.function_id == fid))
        name = names_by_id.get(fid, fid)
        events.append(_event_row(app_id, fid, "schedule.removed", f"{name}: no longer scheduled", now))
    for fid, (name, wire) in wanted.items():
        old = existing.get(fid)
        if old is not None and old.schedule == wire:
            continue  # unchanged: its ticks go on from the first deploy
        sched = schedule_from_wire(wire)
        nxt = first_tick(sched, now)
        values = dict(app_id=app_id, schedule=wire, anchor=anchor_at(now), next_fire_at=nxt, updated_at=now)
        if old is None:
            conn.execute(S.insert().values(function_id=fid, **values))
        else:
            conn.execute(update(S).where(S.c.function_id == fid).values(**values))
        events.append(
            _event_row(
                app_id,
                fid,
                "schedule.set",
                f"{name}: {describe(wire)}, first run at {_iso(nxt)}",
                now,
                schedule=wire,
                next_fire_at=nxt,
            )
        )
    if events:
        conn.execute(E.insert(), events)
    return events


def delete_app_schedules(conn: Connection, app_id: str) -> None:
    """The app stops: its schedules with it (in the caller's transaction)."""
    conn.execute(delete(S).where(S.c.app_id == app_id))


def next_runs(conn: Connection) -> dict[str, dict[str, Any]]:
    """function id -> ``{"next_run_at", "schedule", "last_run_at", "last_call_id"}`` of every scheduled function
    (``cloudmodal app list``; the last run's tick and call, None before the first)."""
    cols = (S.c.function_id, S.c.next_fire_at, S.c.schedule, S.c.last_fired_at, S.c.last_call_id)
    return {
        r.function_id: {
            "next_run_at": r.next_fire_at,
            "schedule": describe(r.schedule),
            "last_run_at": r.last_fired_at,
            "last_call_id": r.last_call_id,
        }
        for r in conn.execute(select(*cols)).all()
    }


def describe(wire: dict[str, Any]) -> str:
    """A stored schedule as the user wrote it: ``Period(seconds=10)`` (the wire form's seconds are a float)."""
    try:
        if wire.get("type") == "period" and float(wire.get("seconds") or 0).is_integer():
            wire = wire | {"seconds": int(wire.get("seconds") or 0)}
        return repr(schedule_from_wire(wire))
    except Exception:  # a form this version cannot read (ValueError, InvalidError…): listing must still work
        return repr(wire)


def _iso(t: float) -> str:
    return _dt(t).isoformat(timespec="seconds").replace("+00:00", "Z")


def _event_row(app_id: str, fid: str, kind: str, message: str, ts: float, **data: Any) -> dict[str, Any]:
    return dict(app_id=app_id, function_id=fid, ts=ts, kind=kind, message=message, data=data or None)


# -- firing ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Fired:
    """One schedule's firing, as committed: the tick fired (None: all skipped) and its call."""

    function_id: str
    app_id: str
    tick: float | None
    call_id: str | None
    skipped: int


class Scheduler:
    """Fires the due schedules of the database (run by the reconciling control plane, each tick)."""

    def __init__(self, cp: ControlPlane, *, grace_s: float = MISSED_GRACE_S) -> None:
        self.cp = cp
        self.grace_s = grace_s
        self._earliest: float | None = None  # the earliest next tick last read (None: none, or not read)
        self._read_at = float("-inf")
        self._errors: dict[str, str] = {}  # function id -> the error its firing last failed with

    def run_due(self, now: float) -> list[Fired]:
        """Fire every schedule due at ``now``. Reads the database only when the earliest tick it knows of is
        due or every RESCAN_S (a deploy on another control plane adds rows): most ticks cost nothing."""
        due_known = self._earliest is not None and self._earliest <= now
        if not due_known and now - self._read_at < RESCAN_S:
            return []
        self._read_at = now
        with self.cp.db.read() as conn:  # one query when nothing is due (most looks)
            self._earliest = conn.execute(select(func.min(S.c.next_fire_at))).scalar()
            if self._earliest is None or self._earliest > now:
                return []
            rows = conn.execute(select(S).where(S.c.next_fire_at <= now).order_by(S.c.next_fire_at)).all()
        fired = []
        for row in rows:
            try:
                got = self.fire(row, now)
            except Exception as e:  # one schedule failing (a bad stored form) never stops the others
                why = f"{type(e).__name__}: {e}"
                if (
                    self._errors.get(row.function_id) != why
                ):  # logged once per distinct error, retried each look
                    self._errors[row.function_id] = why
                    log.exception("scheduler: firing the schedule of %s failed", row.function_id)
                continue
            self._errors.pop(row.function_id, None)
            if got is not None:
                fired.append(got)
        self._earliest = None  # the rows moved: read again, at once if some fired (others may be due too)
        if fired:
            self._read_at = float("-inf")
        return fired

    def fire(self, row: Any, now: float) -> Fired | None:
        """Fire one due row (see the module's docstring); None when another control plane fired it first, a
        redeploy changed it, or its app stopped (its row is then deleted)."""
        fid, seen = row.function_id, row.next_fire_at
        sched = schedule_from_wire(row.schedule)
        p = plan(sched, row.anchor, seen, now, self.grace_s)
        if p.fire_at is None and not p.skipped_count:
            return None
        call_id = new_id("fc") if p.fire_at is not None else None
        with self.cp.db.write() as conn:
            live = conn.execute(
                select(F.c.name)
                .select_from(F.join(A, A.c.id == F.c.app_id))
                .where(
                    and_(
                        F.c.id == fid,
                        F.c.state == FunctionState.ACTIVE,
                        A.c.state == AppState.DEPLOYED,
                        A.c.ephemeral.is_(False),
                    )
                )
            ).first()
            if live is None:  # the app stopped (or the row outlived its function): nothing to fire, ever
                conn.execute(delete(S).where(and_(S.c.function_id == fid, S.c.next_fire_at == seen)))
                return None
            moved = conn.execute(
                update(S)
                .where(and_(S.c.function_id == fid, S.c.next_fire_at == seen))
                .values(
                    next_fire_at=p.next_fire_at,
                    updated_at=now,
                    **({"last_fired_at": p.fire_at, "last_call_id": call_id} if call_id else {}),
                )
            ).rowcount
            if moved != 1:
                return None  # another control plane fired this tick, or a redeploy changed the schedule
            events = []
            if p.skipped_count:
                more = "more than " if p.skipped_more else ""
                events.append(
                    _event_row(
                        row.app_id,
                        fid,
                        "schedule.skipped",
                        f"{live.name}: {more}{p.skipped_count} missed run(s) from {_iso(p.skipped[0])} skipped "
                        f"(no control plane ran then; missed runs are not made up, only the latest within "
                        f"{self.grace_s:.0f} s runs late)",
                        now,
                        ticks=list(p.skipped),
                        count=p.skipped_count,
                        more=p.skipped_more,
                    )
                )
            if call_id is not None:
                assert p.fire_at is not None
                self._create_call(conn, call_id, fid, row.app_id, now)
                late = now - p.fire_at
                events.append(
                    _event_row(
                        row.app_id,
                        fid,
                        "schedule.fired",
                        f"{live.name}: run for {_iso(p.fire_at)} started as call {call_id}"
                        + (f" ({late:.0f} s late)" if late >= 1 else "")
                        + f"; next run at {_iso(p.next_fire_at)}",
                        now,
                        call_id=call_id,
                        tick=p.fire_at,
                        next_fire_at=p.next_fire_at,
                    )
                )
            conn.execute(E.insert(), events)
        # committed: announce it (what fails here only delays the pickup to the workers' periodic re-read)
        try:
            self.cp.hub.notify(f"events:{row.app_id}")
            if call_id is not None:
                self.cp.inputs_arrived(fid)
        except Exception:
            log.exception("scheduler: announcing the call of %s", fid)
        return Fired(fid, row.app_id, p.fire_at, call_id, p.skipped_count)

    @staticmethod
    def _create_call(conn: Connection, call_id: str, fid: str, app_id: str, now: float) -> None:
        conn.execute(
            CA.insert().values(
                id=call_id,
                function_id=fid,
                app_id=app_id,
                kind="schedule",
                created_at=now,
                num_inputs=1,
                cancelled=False,
                created_by=SCHEDULE_CALLER,
            )
        )
        conn.execute(
            I.insert().values(
                call_id=call_id,
                function_id=fid,
                idx=0,
                method=None,
                args=NO_ARGS,
                args_blob=None,
                state=int(InputState.PENDING),
                attempts=0,
                crashes=0,
                worker_id=None,
                lease_expires=0.0,
                available_at=0.0,
                created_at=now,
            )
        )
