"""HTTP routes of named Secrets (``Secret.from_name``; values encrypted at rest): added to the control plane's
route table by :func:`cloudmodal.server.api.build_routes`.

Every route is for the owner and team-wide members (declared ``member``; the handler refuses members scoped to
apps with a 403 that says so); workers are refused by the route's level. No route answers a secret's values
or key names: values go in (create, update) and come out only into the environment of a worker launched for a
function that declares the secret (:meth:`NamedSecrets.resolve`).
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, Field

from cloudmodal.server.limits import EnvName, EnvValue, Id
from cloudmodal.server.security import Identity
from cloudmodal.server.svc_secrets import MAX_KEYS, IfExists, NamedSecrets

# room for MAX_KEYS values of EnvValue's 64 KiB (the service then holds each to Modal's 32,768 characters and
# a secret to 1 MiB, with errors that name the key)
SECRET_BODY = 17 * 1024 * 1024


class SecretCreate(BaseModel):
    max_body: ClassVar[int] = SECRET_BODY

    name: Id  # checked as a secret name by the service
    env: dict[EnvName, EnvValue] = Field(default_factory=dict, max_length=MAX_KEYS)
    if_exists: IfExists = "fail"


class SecretUpdate(BaseModel):
    max_body: ClassVar[int] = SECRET_BODY

    env: dict[EnvName, EnvValue] = Field(max_length=MAX_KEYS)


class SecretDelete(BaseModel):
    max_body: ClassVar[int] = 4096

    allow_missing: bool = False


class SecretCheck(BaseModel):
    max_body: ClassVar[int] = 64 * 1024

    required_keys: list[EnvName] = Field(default_factory=list, max_length=MAX_KEYS)


def add_routes(route: Any, run: Any, cp: Any) -> None:
    """Add this module's routes with ``route(method, path, access, **kw)`` (the decorator ``build_routes``
    uses); ``run(fn, *args)`` runs blocking work (the database) off the event loop."""
    secrets = NamedSecrets(cp)

    @route("POST", "/v1/secrets", "member", body=SecretCreate)
    async def create_secret(b: SecretCreate, who: Identity) -> Any:
        """Create a named secret. If one exists by that name: ``if_exists`` ``fail`` (409), ``skip`` (keep
        it: Modal's ``allow_existing=True``) or ``overwrite`` (replace its values: ``--force``)."""
        return await run(lambda: secrets.create(b.name, b.env, if_exists=b.if_exists, who=who))

    @route("GET", "/v1/secrets", "member")
    async def list_secrets(who: Identity) -> Any:
        """Every named secret's name, id and dates (created, updated, last used, creator): never values."""
        return await run(secrets.list, who)

    @route("GET", "/v1/secrets/{secret_name}", "member")
    async def get_secret(secret_name: str, who: Identity) -> Any:
        """One named secret's name, id and dates: never values."""
        return await run(secrets.info, secret_name, who)

    @route("POST", "/v1/secrets/{secret_name}/update", "member", body=SecretUpdate)
    async def update_secret(secret_name: str, b: SecretUpdate, who: Identity) -> Any:
        """Add keys or replace their values (other keys keep theirs); new workers get them."""
        return await run(secrets.update, secret_name, b.env, who)

    @route("POST", "/v1/secrets/{secret_name}/delete", "member", body=SecretDelete)
    async def delete_secret(secret_name: str, b: SecretDelete, who: Identity) -> Any:
        """Delete a named secret (``allow_missing``: no 404 when there is none)."""
        deleted = await run(lambda: secrets.delete(secret_name, allow_missing=b.allow_missing, who=who))
        return {"deleted": deleted}

    @route("POST", "/v1/secrets/{secret_name}/check", "member", body=SecretCheck)
    async def check_secret(secret_name: str, b: SecretCheck, who: Identity) -> Any:
        """The secret exists and holds ``required_keys`` (404 naming the missing ones, never values); answers
        its info (``Secret.hydrate()``)."""
        await run(lambda: secrets.check_declared([secret_name], {secret_name: b.required_keys}, who))
        return await run(secrets.info, secret_name, who)
