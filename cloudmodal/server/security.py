"""Who may do what: identities, the access levels routes declare, and the rules for objects (apps,
functions, calls, blobs). ``SECURITY.md`` is the prose of this module; the route table
(:mod:`cloudmodal.server.api`) declares each route's level, and the handlers ask the ``may_*`` rules here about
the objects they touch. Nothing here does I/O: the control plane looks the facts up and passes them in.

Identities (a token's stored scope -> identity):

- ``owner`` (legacy ``admin``): everything, including minting and revoking tokens.
- ``member`` / ``member:app-a,app-b``: a team member; deploys, runs and calls apps, reads their logs and events;
  scoped to the named apps when it has a list. Cannot mint tokens.
- ``proxy`` / ``proxy:app-a,app-b``: a web proxy-auth token: it opens the web endpoints declared
  ``requires_proxy_auth=True`` (of the named apps only, when it has a list), sent as ``Modal-Key`` (its id) and
  ``Modal-Secret`` (the token). No API route accepts it.
- ``worker:<id>``: one worker. Claims its own pool's inputs; posts outputs, logs and heartbeats for inputs it
  holds under a live lease; reads its own function's definition (with the secrets that function declares) at
  registration; makes nested calls to its own app's functions and to deployed apps; reads the outputs of calls it
  made and the blobs its function and inputs reference. Nothing else.
- ``sandbox:<id>``: the host process of one sandbox (:mod:`cloudmodal.worker.sandbox_host`): it reads its own
  sandbox's commands and posts its own sandbox's output and exit codes (``sandbox`` routes, whose handlers check
  the id). Nothing else; the sandboxed code itself never sees it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Kind = Literal["owner", "member", "worker", "proxy", "sandbox"]

# What a route requires before its handler runs (object rules inside handlers narrow it further):
#   public  anyone (health checks)
#   owner   owner tokens
#   member  owner or member tokens
#   caller  owner, member or worker tokens (calls, outputs, blobs: the handler checks the object)
#   worker  the worker named in the path, with its own token
#   sandbox a sandbox host's token (the handler checks it is the sandbox the path names)
Access = Literal["public", "owner", "member", "caller", "worker", "sandbox"]
ACCESS_KINDS: dict[str, frozenset[str]] = {
    "public": frozenset(),
    "owner": frozenset({"owner"}),
    "member": frozenset({"owner", "member"}),
    "caller": frozenset({"owner", "member", "worker"}),
    "worker": frozenset({"worker"}),
    "sandbox": frozenset({"sandbox"}),
}


@dataclass(frozen=True, slots=True)
class Identity:
    kind: Kind
    principal: str  # the token's id (owner, member) or "worker:<id>": recorded as the creator of calls
    scope: str  # the stored scope string
    apps: frozenset[str] | None = None  # a member's apps (names); None: every app
    worker_id: str | None = None
    sandbox_id: str | None = None

    @property
    def team_wide(self) -> bool:
        """Sees every app, call and blob of the control plane (owner, unscoped member)."""
        return self.kind == "owner" or (self.kind == "member" and self.apps is None)


def identity_for(scope: str, token_id: str) -> Identity | None:
    """The identity of a stored scope string, or None for one this version does not understand (refused)."""
    if scope in ("owner", "admin"):
        return Identity("owner", token_id, scope)
    if scope == "member":
        return Identity("member", token_id, scope)
    if scope.startswith("member:"):
        apps = frozenset(a for a in scope[7:].split(",") if a)
        return Identity("member", token_id, scope, apps=apps) if apps else None
    if scope == "proxy":
        return Identity("proxy", token_id, scope)
    if scope.startswith("proxy:"):
        apps = frozenset(a for a in scope[6:].split(",") if a)
        return Identity("proxy", token_id, scope, apps=apps) if apps else None
    if scope.startswith("worker:") and len(scope) > 7:
        return Identity("worker", scope, scope, worker_id=scope[7:])
    if scope.startswith("sandbox:") and len(scope) > 8:
        return Identity("sandbox", scope, scope, sandbox_id=scope[8:])
    return None


def member_scope(apps: list[str] | None, kind: str = "member") -> str:
    """The stored scope of a member (or ``kind="proxy"``: a proxy-auth) token, limited to ``apps`` if any."""
    return kind if not apps else kind + ":" + ",".join(sorted(set(apps)))


def allows(access: Access, who: Identity | None, path_worker_id: str | None = None) -> str | None:
    """None when ``who`` passes the route's level, else why not (the 403's message)."""
    if access == "public":
        return None
    assert who is not None
    if who.kind not in ACCESS_KINDS[access]:
        if who.kind == "worker":
            return "A worker token may not use this route."
        if who.kind == "sandbox":
            return "A sandbox host's token may only serve its own sandbox."
        if who.kind == "proxy":
            return "A proxy-auth token only opens web endpoints (Modal-Key/Modal-Secret); it may not use the API."
        if access == "sandbox":
            return "Only the host of the sandbox named in the path may use this route."
        if access == "worker":
            return "Only the worker named in the path may use this route, with its own token."
        return "This route needs an owner token."
    if access == "worker" and who.worker_id != path_worker_id:
        return "This token belongs to another worker."
    return None


# -- object rules ---------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class FunctionFacts:
    """What the rules need to know about a function."""

    function_id: str
    app_id: str
    app_name: str
    app_deployed: bool


@dataclass(frozen=True, slots=True)
class WorkerFacts:
    worker_id: str
    function_id: str
    app_id: str


def app_scoped_refusal(who: Identity, action: str, objects: str) -> str | None:
    """Why ``who`` may not ``action``, when it is a member token scoped to apps: dicts, queues, named secrets
    and volumes (``objects``) are the whole team's, not an app's. None for any other identity."""
    if who.kind != "member" or who.team_wide:
        return None
    return (
        f"This token may not {action}: it is scoped to apps ({', '.join(sorted(who.apps or ()))}), and {objects} "
        "belong to the whole team. Use the owner's token or an unscoped member token (`cloudmodal token create` "
        "without --app)."
    )


def may_use_app(who: Identity, app_name: str) -> bool:
    """Manage or read an app (its functions, logs, events, deployments)."""
    if who.team_wide:
        return True
    if who.kind == "member":
        return who.apps is not None and app_name in who.apps
    return False  # workers manage no app


def may_call(who: Identity, fn: FunctionFacts, own: WorkerFacts | None = None) -> bool:
    """Call a function (create a call, put inputs), or look it up."""
    if who.kind == "worker":
        # nested calls: the worker's own app, or any deployed app of the team
        return own is not None and (fn.app_id == own.app_id or fn.app_deployed)
    return may_use_app(who, fn.app_name)


def may_read_call(who: Identity, created_by: str | None, fn: FunctionFacts) -> bool:
    """Read a call's outputs and progress, or cancel it."""
    if who.kind == "owner":
        return True
    if who.kind == "worker":
        return created_by == who.principal
    if created_by == who.principal:
        return True
    return may_use_app(who, fn.app_name)
