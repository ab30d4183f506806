"""Functions: registration (and redefinition), look-ups, and the parsed specs and retry policies the hot path
reads from memory (cached per function id; a registration replaces them)."""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

from sqlalchemy import and_, select, update

from cloudmodal.exception import AlreadyExistsError, InvalidError, NotFoundError, PermissionDeniedError
from cloudmodal.ids import new_id
from cloudmodal.server import models
from cloudmodal.server.queue import FunctionPolicy
from cloudmodal.server.security import Identity
from cloudmodal.server.states import AppState, FunctionState
from cloudmodal.spec import FunctionSpec

if TYPE_CHECKING:
    from cloudmodal.server.service import ControlPlane

A = models.apps
F = models.functions

# a function's row as the API shows it: never its secrets' values, nor where its code lives
FUNCTION_VIEW = ("id", "app_id", "name", "parent_id", "spec", "module", "version", "state", "created_at")
# what an instance of a parametrized class inherits from its class's function (never from the request)
INHERITED = ("spec", "module", "source_name", "source_blob", "source_dir", "inline_env")
# what a worker is told about the function it serves when it registers
WORKER_DEFINITION = (
    "id",
    "app_id",
    "name",
    "parent_id",
    "spec",
    "module",
    "source_name",
    "source_blob",
    "source_dir",
    "pickled_blob",
    "inline_env",
    "version",
)


class Functions:
    def __init__(self, cp: ControlPlane) -> None:
        self.cp = cp
        self._specs: dict[str, FunctionSpec] = {}
        self._autoscaler_wire: dict[
            str, Any
        ] = {}  # the stored autoscaler settings each cached spec was made of
        self._policies: dict[str, FunctionPolicy] = {}

    # -- specs and policies (cached; a registration replaces them) ----------------------------------------
    def spec_of(self, function_id: str, stored: dict[str, Any] | None = None) -> FunctionSpec:
        """The function's spec, cached. ``stored``: the spec column as just read (the reconciler reads it every
        tick): a cached spec whose autoscaler settings differ from it is replaced, so that
        ``update_autoscaler`` made through another control plane on the same database reaches this one."""
        spec = self._specs.get(function_id)
        if spec is not None and stored is not None:
            if stored.get("autoscaler") != self._autoscaler_wire.get(function_id):
                spec = None
        if spec is None:
            if stored is None:
                with self.cp.db.read() as conn:
                    row = conn.execute(select(F.c.spec, F.c.parent_id).where(F.c.id == function_id)).first()
                if row is None:
                    raise NotFoundError(f"Function {function_id} not found.")
                stored = row.spec
            assert stored is not None
            spec = FunctionSpec.from_wire(stored)
            self._specs[function_id] = spec
            self._autoscaler_wire[function_id] = stored.get("autoscaler")
        return spec

    def policy_for(self, function_id: str) -> FunctionPolicy:
        p = self._policies.get(function_id)
        if p is None:
            crash_budget = self.cp.settings.crash_budget
            try:
                spec = self.spec_of(function_id)
                p = FunctionPolicy(retries=spec.retries, crash_budget=crash_budget)
            except NotFoundError:
                p = FunctionPolicy(crash_budget=crash_budget)
            self._policies[function_id] = p
        return p

    # -- registration ------------------------------------------------------------------------------------
    def create_function(self, body: dict[str, Any], who: Identity | None = None) -> dict[str, Any]:
        """Register (or update) a function. An instance of a parametrized class (``parent_id``) inherits its
        class function's definition here, never from the request: a worker may create one (a nested call to a
        class with parameters) without being able to supply code or read the class's secrets."""
        from cloudmodal.server.wire_spec import validate_wire_spec

        cp = self.cp
        body = dict(body)
        body.pop("sealed_env", None)  # set below for an inherited definition only, never by a request
        app_id = body["app_id"]
        name = body["name"]
        parent_id = body.get("parent_id")
        if who is not None and who.kind == "worker" and not parent_id:
            raise PermissionDeniedError("A worker may only create instances of a class (with `parent_id`).")
        if parent_id:
            parent = self.function_row(parent_id)
            if who is not None:
                cp.access.check_callable(who, parent_id)
            if parent["app_id"] != app_id:
                raise InvalidError(
                    f"Function {parent_id} (`parent_id`) belongs to another app than {app_id}."
                )
            body.update({k: parent[k] for k in INHERITED})
            body["sealed_env"] = True  # the parent's inline_env is stored sealed already
        else:
            body["spec"] = validate_wire_spec(body["spec"])
        if who is not None and who.kind == "member":
            cp.access.check_app(who, app_id)
        spec = FunctionSpec.from_wire(body["spec"])
        if not parent_id:  # an instance inherits its class's secrets, checked when the class was registered
            self._check_named_secrets(spec, body.get("secret_required_keys"), who)
        domains = self._check_custom_domains(spec, app_id) if not parent_id else False
        env = body.get("inline_env") or {}
        stored_env = env if body.get("sealed_env") else cp.secrets.seal_env(env)
        definition = {
            k: body.get(k) for k in ("spec", "module", "source_blob", "pickled_blob", "source_name")
        } | {"inline_env": cp.secrets.open_env(stored_env)}
        # keyed: the database never holds an unkeyed hash of a secret's value
        definition_hash = cp.secrets.fingerprint(json.dumps(definition, sort_keys=True, default=str).encode())
        if cp.reconciler is not None:
            cp.reconciler.check_resources(spec, allow_cpu_fallback=bool(body.get("allow_cpu_fallback")))
        now = time.time()
        with cp.db.write() as conn:
            app_state = conn.execute(select(A.c.state).where(A.c.id == app_id)).scalar_one_or_none()
            if app_state is None:
                raise NotFoundError(f"App {app_id} not found.")
            if app_state == AppState.STOPPED:
                raise InvalidError(f"App {app_id} is stopped; start a new run.")
            row = conn.execute(
                select(F.c.id, F.c.definition_hash, F.c.version).where(
                    and_(F.c.app_id == app_id, F.c.name == name)
                )
            ).first()
            values = dict(
                spec=body["spec"],
                module=body.get("module") or "",
                source_name=body.get("source_name"),
                source_blob=body.get("source_blob"),
                source_dir=body.get("source_dir"),
                pickled_blob=body.get("pickled_blob"),
                inline_env=stored_env,
                parent_id=parent_id,
                state=FunctionState.ACTIVE,
                last_active_at=now,
            )
            if row is None:
                fid = body.get("function_id") or new_id("fu")
                if conn.execute(select(F.c.id).where(F.c.id == fid)).first() is not None:
                    raise AlreadyExistsError(
                        f"Function id {fid!r} is taken by another function; leave `function_id` out to get a new one."
                    )
                conn.execute(
                    F.insert().values(
                        id=fid,
                        app_id=app_id,
                        name=name,
                        definition_hash=definition_hash,
                        version=1,
                        created_at=now,
                        **values,
                    )
                )
                version = 1
            else:
                fid = row.id
                if who is not None and who.kind == "worker" and row.definition_hash != definition_hash:
                    # a worker instantiates classes; it never changes an instance others use
                    raise AlreadyExistsError(f"Function {name!r} exists with another definition.")
                version = row.version + (1 if row.definition_hash != definition_hash else 0)
                conn.execute(
                    update(F)
                    .where(F.c.id == fid)
                    .values(definition_hash=definition_hash, version=version, **values)
                )
        self._specs.pop(fid, None)
        self._policies.pop(fid, None)
        if body.get("cpu_fallback_note"):
            cp.activity.event(
                "function.cpu_fallback", body["cpu_fallback_note"], app_id=app_id, function_id=fid
            )
        cp.hub.notify("reconcile")
        if domains and cp.web is not None:  # its custom domains route from the next request on
            cp.web.domains_changed()
        return {"function_id": fid, "version": version}

    def _check_custom_domains(self, spec: FunctionSpec, app_id: str) -> bool:
        """A custom domain belongs to one deployed app: claiming one another app serves is refused. True when
        the function declares any."""
        from cloudmodal.web_routes import endpoints

        domains = {d for _label, _method, web in endpoints(spec) for d in web.custom_domains}
        if not domains:
            return False
        from cloudmodal.server.web_gateway import domain_conflicts

        taken = domain_conflicts(self.cp, app_id, domains)
        if taken:
            raise AlreadyExistsError(
                f"Function {spec.name!r}: custom domain {', '.join(taken)} is already served by another deployed "
                "app. Stop that app (`cloudmodal app stop`) or choose another domain."
            )
        return True

    def _check_named_secrets(
        self, spec: FunctionSpec, required_keys: dict[str, list[str]] | None, who: Identity | None
    ) -> None:
        """The named secrets ``spec`` declares (``Secret.from_name``) exist and hold their required keys
        (``required_keys``: secret name -> keys), and ``who`` may use them: checked at every registration (a
        run, a deployment), so a missing one fails it at once instead of a worker's launch. Their values are
        read when each worker is launched."""
        from cloudmodal.server.svc_secrets import NamedSecrets, declared_named

        names = declared_named(spec.secrets)
        if names:
            NamedSecrets(self.cp).check_declared(names, required_keys, who, where=f"Function {spec.name!r}: ")

    # -- runtime settings and stats -----------------------------------------------------------------------
    def update_autoscaler(self, who: Identity, function_id: str, settings: dict[str, int]) -> dict[str, Any]:
        """``Function.update_autoscaler``: change the autoscaler settings in the function's stored spec, without
        a new version (its workers keep running). The next registration (a redeploy, a new run) writes the
        decorator's settings back, as on Modal. Owner, or a member that may use the function's app."""
        from cloudmodal.server.wire_spec import validate_wire_spec

        if who.kind not in ("owner", "member"):
            raise PermissionDeniedError("Only the owner and members change a function's autoscaler settings.")
        row = self.function_row(function_id)
        self.cp.access.check_app(who, row["app_id"])
        unknown = set(settings) - {
            "min_containers",
            "max_containers",
            "buffer_containers",
            "scaledown_window",
        }
        if unknown:
            raise InvalidError(f"Unknown autoscaler settings: {', '.join(sorted(unknown))}.")
        wire = dict(row["spec"])
        wire["autoscaler"] = {**(wire.get("autoscaler") or {}), **settings}
        # the same bounds as at registration (min <= max, window 2..3600); the rest of the row is kept as stored
        wire["autoscaler"] = validate_wire_spec(wire, ignore_unknown_keys=True)["autoscaler"]
        with self.cp.db.write() as conn:
            conn.execute(update(F).where(F.c.id == function_id).values(spec=wire))
        self._specs.pop(function_id, None)
        self.cp.activity.event(
            "function.autoscaler_updated",
            f"{row['name']}: autoscaler settings now {wire['autoscaler']}",
            app_id=row["app_id"],
            function_id=function_id,
        )
        self.cp.hub.notify("reconcile")
        return {"function_id": function_id, "autoscaler": wire["autoscaler"]}

    def current_stats(self, who: Identity, function_id: str) -> dict[str, Any]:
        """``Function.get_current_stats``: inputs waiting for a container, and live (starting or ready)
        workers, for a caller that may call the function."""
        from sqlalchemy import func

        from cloudmodal.server.states import InputState, WorkerState

        self.cp.access.check_callable(who, function_id)
        inputs, workers = models.inputs, models.workers
        with self.cp.db.read() as conn:
            backlog = conn.execute(
                select(func.count())
                .select_from(inputs)
                .where(and_(inputs.c.function_id == function_id, inputs.c.state == InputState.PENDING))
            ).scalar_one()
            runners = conn.execute(
                select(func.count())
                .select_from(workers)
                .where(
                    and_(
                        workers.c.function_id == function_id,
                        workers.c.state.in_((WorkerState.STARTING, WorkerState.READY)),
                    )
                )
            ).scalar_one()
        return {"function_id": function_id, "backlog": int(backlog), "num_total_runners": int(runners)}

    # -- look-ups ----------------------------------------------------------------------------------------
    def function_row(self, function_id: str) -> dict[str, Any]:
        with self.cp.db.read() as conn:
            row = conn.execute(select(F).where(F.c.id == function_id)).first()
        if row is None:
            raise NotFoundError(f"Function {function_id} not found.")
        return dict(row._mapping)

    def function_view(self, who: Identity, function_id: str) -> dict[str, Any]:
        """A function's row as ``who`` may see it: only functions it may call, never secrets or code."""
        self.cp.access.check_callable(who, function_id)
        return _view(self.function_row(function_id))

    def lookup_function(
        self, app_name: str | None, name: str, app_id: str | None = None, who: Identity | None = None
    ) -> dict[str, Any]:
        """A deployed app's function or class by name (or, with ``app_id``, any app's); with ``who``, as that
        caller may see it."""
        with self.cp.db.read() as conn:
            if app_id:
                app = conn.execute(select(A.c.id, A.c.name).where(A.c.id == app_id)).first()
            else:
                app = conn.execute(
                    select(A.c.id, A.c.name).where(and_(A.c.name == app_name, A.c.state == AppState.DEPLOYED))
                ).first()
            if app is None:
                raise NotFoundError(
                    f"No deployed app named {app_name!r}. Deploy it with `cloudmodal deploy FILE`; "
                    "`cloudmodal app list` shows the apps there are."
                )
            row = conn.execute(
                select(F).where(and_(F.c.app_id == app[0], F.c.name == name, F.c.parent_id.is_(None)))
            ).first()
            if row is None:
                names = [
                    r[0]
                    for r in conn.execute(
                        select(F.c.name).where(and_(F.c.app_id == app[0], F.c.parent_id.is_(None)))
                    ).all()
                ]
                raise NotFoundError(
                    f"App {app_name!r} has no function or class {name!r}. It has: {', '.join(sorted(names)) or 'nothing'}."
                )
        out = dict(row._mapping)
        if who is not None:
            self.cp.access.check_callable(who, out["id"])
            return _view(out)
        return out

    def worker_definition(self, function_id: str) -> dict[str, Any]:
        """What a worker registering for the function is told: its definition, with its secrets opened."""
        fn = self.function_row(function_id)
        out = {k: fn[k] for k in WORKER_DEFINITION}
        out["inline_env"] = self.cp.secrets.open_env(fn["inline_env"])
        if fn["parent_id"]:
            out["parent_name"] = self.function_row(fn["parent_id"])["name"]
        return out


def _view(row: dict[str, Any]) -> dict[str, Any]:
    return {k: row.get(k) for k in FUNCTION_VIEW}
