"""Named Secrets (``Secret.from_name``): create, list, update, delete; the check of a function's declared
secrets when it is registered; and their resolution into a worker's environment when it is launched.

A secret's values are one ciphertext (the JSON of the whole ``{KEY: value}`` dict sealed with the control
plane's :class:`~cloudmodal.server.secretbox.SecretBox`); they are opened only to check ``required_keys`` and to
start a worker of a function that declares the secret. No method returns them to a caller, and no error,
event or log line names a value: only secret names and key names.

Who may manage them: the owner and team-wide members (:func:`check_manager`). A member scoped to apps may not
(it could otherwise read every secret of the team through a function of its app), and neither may a worker.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from cloudmodal.exception import AlreadyExistsError, InvalidError, NotFoundError, PermissionDeniedError
from cloudmodal.ids import new_id
from cloudmodal.secret import check_object_name, is_inline_name
from cloudmodal.server.limits import ENV_NAME_PATTERN
from cloudmodal.server.models_secrets import named_secrets as S
from cloudmodal.server.secretbox import SEALED
from cloudmodal.server.security import Identity, app_scoped_refusal

if TYPE_CHECKING:
    from cloudmodal.server.service import ControlPlane

log = logging.getLogger("cloudmodal.server")

# Modal's limits on a pair (key names: letters, digits and '_', not starting with a digit; values up to 32,768
# characters), and ours on a whole secret: it becomes part of a worker's environment, which the system
# bounds (Linux: about 2 MiB for a process's arguments and environment together).
MAX_KEYS = 256
MAX_VALUE_CHARS = 32_768
MAX_SECRET_BYTES = 1024 * 1024

IfExists = Literal["fail", "skip", "overwrite"]  # Modal's default, allow_existing=True, --force

_ENV_NAME = re.compile(ENV_NAME_PATTERN)
CREATE_HINT = "cloudmodal secret create {name} KEY=VALUE"


def check_manager(who: Identity | None, action: str) -> None:
    """Refuse ``who`` unless it is the owner or a team-wide member (None: an internal caller)."""
    if who is None or who.team_wide:
        return
    refusal = app_scoped_refusal(who, action, "named secrets")
    if refusal is not None:
        raise PermissionDeniedError(refusal)
    raise PermissionDeniedError(f"A worker token may not {action}.")


def declared_named(secret_names: Iterable[str]) -> list[str]:
    """The named secrets among a spec's ``secrets`` (the others are inline secrets' generated names, whose
    values travel with the function's definition), in the spec's order."""
    return [n for n in secret_names if not is_inline_name(n)]


def check_env(env: Mapping[str, Any], where: str) -> dict[str, str]:
    """``env`` as a secret's values, within the limits; errors name keys, never values."""
    if len(env) > MAX_KEYS:
        raise InvalidError(f"{where}: {len(env)} keys; a secret holds at most {MAX_KEYS}. Split it in two.")
    out: dict[str, str] = {}
    size = 0
    for k, v in env.items():
        if not isinstance(k, str) or not _ENV_NAME.fullmatch(k):
            raise InvalidError(
                f"{where}: invalid key {k!r}. Keys hold letters, digits and '_', and do not start with a digit "
                "(e.g. API_KEY)."
            )
        if not isinstance(v, str):
            raise InvalidError(f"{where}: the value of {k} must be a string, not {type(v).__name__}.")
        if len(v) > MAX_VALUE_CHARS:
            raise InvalidError(
                f"{where}: the value of {k} has {len(v)} characters; at most {MAX_VALUE_CHARS} are allowed. "
                "Keep larger data in a Volume and read it at run time."
            )
        if "\0" in v:
            raise InvalidError(
                f"{where}: the value of {k} contains a NUL character, which no environment holds."
            )
        size += len(k.encode()) + len(v.encode()) + 2
        out[k] = v
    if size > MAX_SECRET_BYTES:
        raise InvalidError(
            f"{where}: the values take {size} bytes; a secret holds at most {MAX_SECRET_BYTES} (it becomes part "
            "of a worker's environment). Keep larger data in a Volume."
        )
    return out


class NamedSecrets:
    """The named secrets of one control plane's database. Holds no state but the control plane: every
    method reads and writes the database, so control planes sharing one agree."""

    def __init__(self, cp: ControlPlane) -> None:
        self.cp = cp

    # -- sealing ---------------------------------------------------------------------------------------
    def _seal(self, env: Mapping[str, str]) -> str:
        return self.cp.secrets.seal(json.dumps(dict(env), sort_keys=True, separators=(",", ":")).encode())

    def _open(self, sealed: str) -> dict[str, str]:
        return self.cp.secrets.open_env({SEALED: sealed})

    # -- management ------------------------------------------------------------------------------------
    def create(
        self, name: str, env: Mapping[str, Any], *, if_exists: IfExists = "fail", who: Identity | None = None
    ) -> dict[str, Any]:
        """Create secret ``name``. If it exists: ``fail`` (AlreadyExistsError), ``skip`` (keep its values:
        Modal's ``allow_existing=True``) or ``overwrite`` (replace them: ``cloudmodal secret create --force``).
        Answers ``{"secret_id", "name", "created"}``; ``created`` is False where an existing one was kept or
        overwritten."""
        check_manager(who, "create named secrets")
        check_object_name(name, "Secret")
        if is_inline_name(name):
            raise InvalidError(f"Secret names like {name!r} are reserved for inline secrets; choose another.")
        values = check_env(env, f"Secret {name!r}")
        sealed = self._seal(values)
        now = time.time()
        sid = new_id("st")
        try:
            with self.cp.db.write() as conn:
                row = conn.execute(select(S.c.id).where(S.c.name == name)).first()
                if row is None:
                    conn.execute(
                        S.insert().values(
                            id=sid,
                            name=name,
                            sealed=sealed,
                            created_at=now,
                            updated_at=now,
                            created_by=who.principal if who is not None else "",
                            last_used_at=None,
                        )
                    )
                    self._note("secret.created", f"secret {name!r} created ({len(values)} keys)", who)
                    return {"secret_id": sid, "name": name, "created": True}
        except IntegrityError:
            pass  # another control plane on this database created it between the read and the insert
        if if_exists == "fail":
            raise AlreadyExistsError(
                f"Secret {name!r} already exists. Overwrite it with `cloudmodal secret create {name} ... --force` "
                f"(Secret.objects.create(..., allow_existing=True) keeps it as it is), or add keys to it with "
                f"Secret.from_name({name!r}).update({{...}})."
            )
        with self.cp.db.write() as conn:
            row = conn.execute(select(S.c.id).where(S.c.name == name)).first()
            if row is None:
                raise NotFoundError(
                    f"Secret {name!r} was deleted while it was being created; create it again."
                )
            if if_exists == "overwrite":
                conn.execute(update(S).where(S.c.id == row.id).values(sealed=sealed, updated_at=now))
        if if_exists == "overwrite":
            self._note("secret.overwritten", f"secret {name!r} overwritten ({len(values)} keys)", who)
        return {"secret_id": row.id, "name": name, "created": False}

    def update(self, name: str, env: Mapping[str, Any], who: Identity | None = None) -> dict[str, Any]:
        """Add keys to secret ``name`` or replace their values (the other keys keep theirs). Workers started
        from now on get the new values; running ones keep those they started with."""
        check_manager(who, "update named secrets")
        check_object_name(name, "Secret")
        new = check_env(env, f"Secret {name!r}")
        with self.cp.db.write() as conn:
            row = conn.execute(select(S.c.id, S.c.sealed).where(S.c.name == name)).first()
            if row is None:
                raise self._not_found(name)
            merged = check_env(self._open(row.sealed) | new, f"Secret {name!r}")
            conn.execute(
                update(S).where(S.c.id == row.id).values(sealed=self._seal(merged), updated_at=time.time())
            )
        self._note("secret.updated", f"secret {name!r} updated ({len(new)} keys written)", who)
        return {"secret_id": row.id, "name": name, "keys": len(merged)}

    def delete(self, name: str, *, allow_missing: bool = False, who: Identity | None = None) -> bool:
        """Delete secret ``name``; False where it did not exist and ``allow_missing``. Functions that declare
        it keep running workers; new workers of theirs cannot start until it exists again."""
        check_manager(who, "delete named secrets")
        check_object_name(name, "Secret")
        with self.cp.db.write() as conn:
            gone = conn.execute(S.delete().where(S.c.name == name)).rowcount
        if not gone:
            if allow_missing:
                return False
            raise self._not_found(name)
        self._note("secret.deleted", f"secret {name!r} deleted", who)
        return True

    def list(self, who: Identity | None = None) -> list[dict[str, Any]]:
        """Every secret's name and dates, newest first (never values, nor key names)."""
        check_manager(who, "list named secrets")
        with self.cp.db.read() as conn:
            rows = conn.execute(select(*_INFO).order_by(S.c.created_at.desc(), S.c.name)).all()
        return [dict(r._mapping) for r in rows]

    def info(self, name: str, who: Identity | None = None) -> dict[str, Any]:
        """One secret's name and dates (never values, nor key names)."""
        check_manager(who, "read named secrets")
        check_object_name(name, "Secret")
        with self.cp.db.read() as conn:
            row = conn.execute(select(*_INFO).where(S.c.name == name)).first()
        if row is None:
            raise self._not_found(name)
        return dict(row._mapping)

    def reseal_all(self) -> int:
        """Seal every secret again with the encrypting (first) key, after a key rotation; how many."""
        with self.cp.db.write() as conn:
            rows = conn.execute(select(S.c.id, S.c.sealed)).all()
            for r in rows:
                conn.execute(update(S).where(S.c.id == r.id).values(sealed=self._seal(self._open(r.sealed))))
        return len(rows)

    # -- use by functions ------------------------------------------------------------------------------
    def check_declared(
        self,
        names: Sequence[str],
        required_keys: Mapping[str, Iterable[str]] | None = None,
        who: Identity | None = None,
        where: str = "",
    ) -> None:
        """At a function's registration: every secret in ``names`` exists and holds its ``required_keys``
        (secret name -> keys). Errors name the missing secret or keys, never a value. ``who``: the deploying
        identity (a member scoped to apps may not use named secrets, see :func:`check_manager`)."""
        if not names:
            return
        check_manager(who, f"use named secrets ({', '.join(repr(n) for n in names)})")
        required = {k: sorted(set(v)) for k, v in (required_keys or {}).items() if v}
        rows = self._rows(names, where)
        for name in names:
            want = required.get(name)
            if not want:
                continue
            have = self._open(rows[name].sealed)
            missing = [k for k in want if k not in have]
            if missing:
                raise NotFoundError(
                    f"{where}Secret {name!r} is missing required key(s) {', '.join(missing)}. Add them with "
                    f"`cloudmodal secret create {name} {' '.join(k + '=...' for k in missing)} --force` "
                    "(which replaces its values: list the existing keys too) or "
                    f"Secret.from_name({name!r}).update({{...}})."
                )

    def resolve(self, names: Sequence[str], where: str = "") -> dict[str, str]:
        """The environment that secrets ``names`` give a worker being launched now, merged in their order
        (a later secret's key wins), read now so that a rotated secret reaches new workers. Marks them used."""
        if not names:
            return {}
        rows = self._rows(names, where)
        env: dict[str, str] = {}
        for name in names:
            env.update(self._open(rows[name].sealed))
        self._touch(list(names), time.time())
        return env

    # -- helpers ---------------------------------------------------------------------------------------
    def _rows(self, names: Sequence[str], where: str) -> dict[str, Any]:
        with self.cp.db.read() as conn:
            rows = {
                r.name: r
                for r in conn.execute(
                    select(S.c.id, S.c.name, S.c.sealed).where(S.c.name.in_(set(names)))
                ).all()
            }
        missing = [n for n in names if n not in rows]
        if missing:
            raise self._not_found(missing[0], where)
        return rows

    def _touch(self, names: Sequence[str], now: float) -> None:
        with self.cp.db.write() as conn:
            conn.execute(update(S).where(S.c.name.in_(set(names))).values(last_used_at=now))

    @staticmethod
    def _not_found(name: str, where: str = "") -> NotFoundError:
        return NotFoundError(
            f"{where}Secret {name!r} not found. Create it with `{CREATE_HINT.format(name=name)}` "
            "(`cloudmodal secret list` shows the secrets there are)."
        )

    def _note(self, kind: str, message: str, who: Identity | None) -> None:
        """Record a change to a secret (its name and who, never its values) in the server's log."""
        log.info("%s: %s by %s", kind, message, who.principal if who is not None else "the control plane")


_INFO = (S.c.id, S.c.name, S.c.created_at, S.c.updated_at, S.c.created_by, S.c.last_used_at)
