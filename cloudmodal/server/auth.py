"""Bearer-token authentication. Tokens are stored as SHA-256 hashes; loopback may go without one
only when the server was started to allow it (the embedded default)."""

from __future__ import annotations

import hashlib
import ipaddress
import secrets
import time

from sqlalchemy import select

from cloudmodal.ids import new_id
from cloudmodal.server import models
from cloudmodal.server.db import Database

T = models.tokens


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def is_loopback(host: str | None) -> bool:
    if not host:
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class TokenStore:
    def __init__(self, db: Database) -> None:
        self.db = db
        self._cache: dict[str, str | None] = {}  # hash -> scope (None = unknown/revoked)

    def create(self, scope: str = "admin", name: str = "") -> str:
        token = "cm_" + secrets.token_urlsafe(32)
        with self.db.write() as conn:
            conn.execute(
                T.insert().values(
                    id=new_id("tk"),
                    name=name,
                    token_hash=hash_token(token),
                    scope=scope,
                    created_at=time.time(),
                    revoked=False,
                )
            )
        return token

    def scope_of(self, token: str) -> str | None:
        h = hash_token(token)
        if h in self._cache:
            return self._cache[h]
        with self.db.read() as conn:
            row = conn.execute(select(T.c.scope, T.c.revoked).where(T.c.token_hash == h)).first()
        scope = None if row is None or row[1] else row[0]
        if scope is not None:
            self._cache[h] = scope
        return scope

    def revoke_scope(self, scope: str) -> None:
        with self.db.write() as conn:
            conn.execute(T.update().where(T.c.scope == scope).values(revoked=True))
        self._cache = {k: v for k, v in self._cache.items() if v != scope}
