"""Access checks: the facts :mod:`cloudmodal.server.security`'s rules decide on, looked up (and cached), and
the checks request handlers make before they touch an app, a function, a call or a blob."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sqlalchemy import and_, or_, select

from cloudmodal.exception import InvalidError, NotFoundError, PermissionDeniedError
from cloudmodal.server import models
from cloudmodal.server.security import (
    FunctionFacts,
    Identity,
    WorkerFacts,
    may_call,
    may_read_call,
    may_use_app,
)

if TYPE_CHECKING:
    from cloudmodal.server.service import ControlPlane

A = models.apps
F = models.functions
CA = models.calls


class Access:
    """Who may touch which object. The facts cached here never change for an id (an app's name and kind, a
    function's app, a worker's function, a call's function and creator), so the caches need no invalidation."""

    FACTS_CACHE_MAX = 50_000

    def __init__(self, cp: ControlPlane) -> None:
        self.cp = cp
        self._fn_facts: dict[str, FunctionFacts] = {}
        self._worker_facts: dict[str, WorkerFacts] = {}
        self._call_facts: dict[str, tuple[str, str | None]] = {}  # call id -> (function id, created by)

    def _remember(self, cache: dict[str, Any], key: str, value: Any) -> None:
        if len(cache) >= self.FACTS_CACHE_MAX:
            cache.clear()  # a cache, not a record: anything dropped is read again
        cache[key] = value

    def function_facts(self, function_id: str) -> FunctionFacts:
        got = self._fn_facts.get(function_id)
        if got is None:
            with self.cp.db.read() as conn:
                row = conn.execute(
                    select(F.c.app_id, A.c.name, A.c.ephemeral)
                    .select_from(F.join(A, A.c.id == F.c.app_id))
                    .where(F.c.id == function_id)
                ).first()
            if row is None:
                raise NotFoundError(f"Function {function_id} not found.")
            got = FunctionFacts(function_id, row.app_id, row.name, not row.ephemeral)
            self._remember(self._fn_facts, function_id, got)
        return got

    def worker_facts(self, worker_id: str) -> WorkerFacts:
        got = self._worker_facts.get(worker_id)
        if got is None:
            row = self.cp.workers.worker_row(worker_id)
            got = WorkerFacts(worker_id, row["function_id"], row["app_id"])
            self._remember(self._worker_facts, worker_id, got)
        return got

    def _own(self, who: Identity) -> WorkerFacts | None:
        return self.worker_facts(who.worker_id) if who.worker_id else None

    def check_app(self, who: Identity, name_or_id: str) -> dict[str, Any]:
        """The app, if ``who`` may manage or read it (else 404 / 403)."""
        app = self.cp.apps.find_app(name_or_id)
        if not may_use_app(who, app["name"]):
            raise PermissionDeniedError(
                f"This token may not use app {app['name']!r}"
                + (f": it is scoped to apps {', '.join(sorted(who.apps))}." if who.apps else ".")
                + " `cloudmodal token create --app NAME` makes a token for it."
            )
        return app

    def check_callable(self, who: Identity, function_id: str) -> FunctionFacts:
        facts = self.function_facts(function_id)
        if not who.team_wide and not may_call(who, facts, self._own(who)):
            raise PermissionDeniedError(
                f"This token may not call function {function_id} of app {facts.app_name!r}"
                + (
                    f": it is scoped to apps {', '.join(sorted(who.apps))}."
                    if who.apps
                    else " (a worker calls its own app's functions and deployed apps')."
                    if who.kind == "worker"
                    else "."
                )
                + " `cloudmodal token create --app NAME` makes a token for it."
            )
        return facts

    def remember_call(self, call_id: str, function_id: str, created_by: str | None) -> None:
        """Record a call just created, so checks on it need no read."""
        self._remember(self._call_facts, call_id, (function_id, created_by))

    def call_owner(self, call_id: str) -> tuple[str, str | None] | None:
        """(function id, created by) of a call, None for an unknown one (cached: neither ever changes)."""
        got = self._call_facts.get(call_id)
        if got is None:
            with self.cp.db.read() as conn:
                row = conn.execute(
                    select(CA.c.function_id, CA.c.created_by).where(CA.c.id == call_id)
                ).first()
            if row is None:
                return None
            got = (row.function_id, row.created_by)
            self._remember(self._call_facts, call_id, got)
        return got

    def check_call(self, who: Identity, call_id: str) -> str:
        """The call's function id, if ``who`` may read or cancel the call (else 404 / 403)."""
        got = self.call_owner(call_id)
        if got is None:
            raise NotFoundError(f"Function call {call_id!r} not found.")
        if who.kind != "owner" and not may_read_call(who, got[1], self.function_facts(got[0])):
            raise PermissionDeniedError(f"This token may not read function call {call_id!r}.")
        return got[0]

    @staticmethod
    def check_same_caller(
        found: tuple[str, str | None] | None, call_id: str, function_id: str, created_by: str | None
    ) -> None:
        """Inputs for an existing call (``found``: its function and creator) come from its creator
        (``created_by`` None: anyone, i.e. the owner), for its function."""
        if found is None:
            raise NotFoundError(f"Function call {call_id!r} not found: create it first (POST /v1/calls).")
        if created_by is not None and found[1] != created_by:
            raise PermissionDeniedError(f"Function call {call_id!r} belongs to another caller.")
        if found[0] != function_id:
            raise InvalidError(f"Function call {call_id!r} is a call of {found[0]}, not of {function_id}.")

    def check_blob(self, who: Identity, blob_id: str) -> None:
        """Team-wide tokens read any blob; others only the blobs their functions, inputs and calls reference."""
        if who.team_wide:
            return
        I = models.inputs  # noqa: E741
        O = models.outputs  # noqa: E741
        with self.cp.db.read() as conn:
            if who.kind == "worker":
                own = self._own(who)
                assert own is not None
                ok = (
                    conn.execute(
                        select(F.c.id).where(
                            and_(
                                F.c.id == own.function_id,
                                or_(F.c.source_blob == blob_id, F.c.pickled_blob == blob_id),
                            )
                        )
                    ).first()
                    or conn.execute(
                        select(I.c.id)
                        .where(and_(I.c.args_blob == blob_id, I.c.worker_id == own.worker_id))
                        .limit(1)
                    ).first()
                    or conn.execute(
                        select(O.c.id)
                        .select_from(O.join(CA, CA.c.id == O.c.call_id))
                        .where(and_(O.c.data_blob == blob_id, CA.c.created_by == who.principal))
                        .limit(1)
                    ).first()
                )
            else:  # a member scoped to named apps: their functions' code and their calls' outputs
                apps = sorted(who.apps or ())
                ok = (
                    conn.execute(
                        select(F.c.id)
                        .select_from(F.join(A, A.c.id == F.c.app_id))
                        .where(
                            and_(
                                A.c.name.in_(apps),
                                or_(F.c.source_blob == blob_id, F.c.pickled_blob == blob_id),
                            )
                        )
                        .limit(1)
                    ).first()
                    or conn.execute(
                        select(O.c.id)
                        .select_from(O.join(CA, CA.c.id == O.c.call_id).join(A, A.c.id == CA.c.app_id))
                        .where(
                            and_(
                                O.c.data_blob == blob_id,
                                or_(A.c.name.in_(apps), CA.c.created_by == who.principal),
                            )
                        )
                        .limit(1)
                    ).first()
                )
        if not ok:
            raise PermissionDeniedError(f"This token may not read blob {blob_id}.")
